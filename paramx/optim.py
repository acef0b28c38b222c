"""Per-parameter optimizer metadata and optimizer state across model surgery, for optax.

- Tags: :func:`tags` names groups of parameters once (``"no_decay"``, ``"frozen"``, a
  learning-rate group) with paramx's selectors (path strings, key tuples, predicates over key
  paths; ``"encoder/..."`` for a whole subtree) and ready-made rules (:func:`biases`,
  :func:`norm_scales`, :func:`embeddings`, :func:`tokens`, :func:`named`), decided from the
  key paths of linen, NNX and paramx trees. :meth:`Tags.mask` gives masks for
  ``optax.masked`` and ``optax.adamw(mask=...)``, :meth:`Tags.labels` labels for
  ``optax.multi_transform``; both are shaped like the params, ``Parametrized`` nodes
  included. A parametrized tensor's tags go to its originals and its parametrizations' own
  arrays, never to its state.
- Carry-over: :func:`carry_state` maps an optax state over model surgery
  (:func:`paramx.remove_parametrizations`, registering a parametrization): moments follow the
  tensors by path, ``kernel.original`` and ``kernel`` being one tensor, as torch's optimizer
  state follows a Parameter that survives; new arrays get the optimizer's fresh init; counts
  are kept.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import optax
  >>> import paramx as px
  >>> from paramx import optim
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         return nn.Dense(2)(nn.LayerNorm()(nn.Dense(4)(x)))
  >>> params = Net().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  >>> params, state = px.split_state(px.orthogonal(params, "Dense_0/kernel"))
  >>> tags = optim.tags(params, {"no_decay": [optim.biases, optim.norm_scales]})
  >>> tx = optax.adamw(1e-3, weight_decay=0.1, mask=tags.mask("no_decay", invert=True))
  >>> opt_state = tx.init(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, opt_state = tx.update(grads, opt_state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> # surgery: make Dense_0/kernel plain again; Adam keeps its moments
  >>> plain = px.remove_parametrizations(px.merge_state(params, state), "Dense_0/kernel")
  >>> tx = optax.adamw(1e-3, weight_decay=0.1,
  ...                  mask=optim.tags(plain, {"no_decay": [optim.biases, optim.norm_scales]})
  ...                       .mask("no_decay", invert=True))
  >>> opt_state = optim.carry_state(tx, opt_state, params, plain)
  >>> bool(jnp.all(opt_state[0].mu["Dense_0"]["kernel"] != 0))
  True
"""

from paramx._src.integrations.optim import NORM_SCALE_NAMES as NORM_SCALE_NAMES
from paramx._src.integrations.optim import TOKEN_NAMES as TOKEN_NAMES
from paramx._src.integrations.optim import Tags as Tags
from paramx._src.integrations.optim import biases as biases
from paramx._src.integrations.optim import carry_state as carry_state
from paramx._src.integrations.optim import embeddings as embeddings
from paramx._src.integrations.optim import named as named
from paramx._src.integrations.optim import norm_scales as norm_scales
from paramx._src.integrations.optim import tags as tags
from paramx._src.integrations.optim import tokens as tokens

__all__ = [
    "NORM_SCALE_NAMES",
    "TOKEN_NAMES",
    "Tags",
    "biases",
    "carry_state",
    "embeddings",
    "named",
    "norm_scales",
    "tags",
    "tokens",
]
