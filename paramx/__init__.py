"""paramx: PyTorch's parametrizations for JAX and Flax, functional and stateless.

torch's ``torch.nn.utils.parametrize`` (``register_parametrization``, ``orthogonal``,
``spectral_norm``, ``weight_norm``) on the parameter trees that ``model.init`` returns:

1. register a parametrization on a leaf (``register_parametrization`` or a built-in:
   ``orthogonal``, ``spectral_norm``, ``weight_norm``); this returns a new tree;
2. ``params, state = split_state(tree)``: the optimizer gets ``params`` (the raw originals),
   never ``state`` (spectral norm's u and v, orthogonal's base);
3. in each step, ``materialize(params, state, update_state=True)`` gives the plain tree that
   ``model.apply`` reads (and the new state); ``materialize(tree)`` for evaluation.

Examples:
  >>> import flax.linen as nn
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> model = nn.Dense(3)
  >>> x = jnp.ones((2, 3))
  >>> tree = px.orthogonal(model.init(jax.random.key(0), x), "params/kernel")
  >>> params, state = px.split_state(tree)  # params -> optax: tx.init(params)
  >>> variables = px.materialize(params, state)  # what model.apply reads
  >>> k = variables["params"]["kernel"]
  >>> bool(jnp.allclose(k.T @ k, jnp.eye(3), atol=1e-5))
  True
  >>> model.apply(variables, x).shape
  (2, 3)

Namespaces: ``paramx.linen`` (``Parametrize``, declared in a linen model), ``paramx.nnx``
(torch's in-place API on NNX modules), ``paramx.interop`` (PyTorch ``state_dict`` files),
``paramx.tensor`` (register / materialize / assign / remove on one array or node),
``paramx.lipschitz`` (Lipschitz and orthogonal convolutions, bounds),
``paramx.optim`` (optimizer tags for optax masks and labels; optimizer state across model
surgery),
``paramx.constraints`` (the catalogue of constraints beyond torch's three: symmetric, skew,
sphere, positive, simplex, special orthogonal, Cholesky, positive definite, ...). The
guides are ``README.md``, ``docs/design.md`` and ``docs/flax.md``; the API reference is built
from these docstrings with ``mkdocs build`` (``mkdocs.yml``).
"""

from paramx import constraints as constraints
from paramx import interop as interop
from paramx import linen as linen
from paramx import lipschitz as lipschitz
from paramx import nnx as nnx
from paramx import optim as optim
from paramx import tensor as tensor
from paramx._src.core.assign import assign as assign
from paramx._src.core.inspect import get_parametrized as get_parametrized
from paramx._src.core.inspect import is_parametrized as is_parametrized
from paramx._src.core.inspect import originals as originals
from paramx._src.core.inspect import summary as summary
from paramx._src.core.load import load_plain as load_plain
from paramx._src.core.manifold import sampler as sampler
from paramx._src.core.manifold import update_base as update_base
from paramx._src.core.materialize import cached as cached
from paramx._src.core.materialize import materialize as materialize
from paramx._src.core.materialize import precompute as precompute
from paramx._src.core.node import Parametrized as Parametrized
from paramx._src.core.parametrization import Parametrization as Parametrization
from paramx._src.core.paths import path_keys as path_keys
from paramx._src.core.register import register_parametrization as register_parametrization
from paramx._src.core.remove import remove_parametrizations as remove_parametrizations
from paramx._src.core.state import merge_state as merge_state
from paramx._src.core.state import split_state as split_state
from paramx._src.core.table import table as table
from paramx._src.core.tie import Tied as Tied
from paramx._src.core.tie import tie as tie
from paramx._src.core.tie import ties as ties
from paramx._src.core.tie import untie as untie
from paramx._src.core.transfer import (
    transfer_parametrizations_and_params as transfer_parametrizations_and_params,
)
from paramx._src.integrations import serialization as _serialization  # noqa: F401  (registers with flax)
from paramx._src.integrations.optax import param_labels as param_labels
from paramx._src.integrations.optax import param_mask as param_mask
from paramx._src.parametrizations.orthogonal import Orthogonal as Orthogonal
from paramx._src.parametrizations.orthogonal import orthogonal as orthogonal
from paramx._src.parametrizations.spectral_norm import SpectralNorm as SpectralNorm
from paramx._src.parametrizations.spectral_norm import spectral_norm as spectral_norm
from paramx._src.parametrizations.weight_norm import WeightNorm as WeightNorm
from paramx._src.parametrizations.weight_norm import weight_norm as weight_norm

__version__ = "0.1.0"

__all__ = [
    "Orthogonal",
    "Parametrization",
    "Parametrized",
    "SpectralNorm",
    "Tied",
    "WeightNorm",
    "assign",
    "get_parametrized",
    "is_parametrized",
    "load_plain",
    "materialize",
    "merge_state",
    "originals",
    "orthogonal",
    "param_labels",
    "param_mask",
    "path_keys",
    "precompute",
    "register_parametrization",
    "remove_parametrizations",
    "sampler",
    "spectral_norm",
    "split_state",
    "summary",
    "table",
    "tie",
    "ties",
    "transfer_parametrizations_and_params",
    "untie",
    "update_base",
    "weight_norm",
]


def __dir__() -> list[str]:
    # help(paramx) and dir(paramx) show the public surface, not the private modules.
    namespaces = ["constraints", "interop", "linen", "lipschitz", "nnx", "optim", "tensor"]
    return sorted([*__all__, "__version__", *namespaces])
