"""Writing: a paramx tree (or an NNX module) as a torch ``state_dict`` of numpy arrays.

Every array of the tree goes to the torch key and layout its plan names (``plan.py``), the
inverse of reading.

Examples:
  >>> import jax.numpy as jnp
  >>> sorted(to_torch_state_dict({"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}))
  ['fc.bias', 'fc.weight']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from paramx._src.core import tie
from paramx._src.integrations.torch.keys import ModuleMap, Names
from paramx._src.integrations.torch.layouts import check_layouts
from paramx._src.integrations.torch.nnx import is_nnx, nnx_view
from paramx._src.integrations.torch.plan import plan, tensors


def to_torch_state_dict(
    tree: Any,
    *,
    modules: ModuleMap | None = None,
    layouts: Mapping[str, str] | None = None,
    legacy_weight_norm: bool = False,
) -> dict[str, np.ndarray]:
    """Writes a paramx tree (or an NNX module) as a torch ``state_dict`` (numpy arrays under
    torch's keys).

    The inverse of :func:`from_torch_state_dict`: each array goes to the torch key and layout
    that reading takes it from. A ``Parametrized`` node writes its originals and its links'
    state (``_u``/``_v``, ``base``), exactly what the torch model with the same
    parametrizations registered holds, so ``model.load_state_dict`` takes the result after
    ``torch.from_numpy`` on each array. An NNX module registered with ``paramx.nnx`` writes its
    parametrized tensors the same way (``parametrizations/kernel/original`` becomes torch's
    ``parametrizations.weight.original``, transposed for a Linear), its BatchStats as torch's
    ``running_mean`` / ``running_var``, and an ``nnx.Sequential``'s layers as ``0``, ``1``, ...
    The ``nnx.State`` of a registered module is refused: the parametrizations live in the
    module's graph, not in its state. A parameter shared by two modules (one Variable, one
    module at two paths, or a plain :func:`paramx.tie` / :func:`paramx.nnx.tie`) is written
    under each name, as torch's ``state_dict`` lists a shared ``nn.Parameter``; a tie through
    a transform, or to a parametrized tensor, has no torch form and is refused.

    Args:
      tree: A registered paramx tree (not a trainable half: state is written too), or an NNX
        module.
      modules: Maps torch module names to Flax paths, as in :func:`from_torch_state_dict`.
      layouts: Per torch module, the layout of its ``weight``, as in
        :func:`from_torch_state_dict`.
      legacy_weight_norm: Write a tensor whose only parametrization is ``weight_norm`` under
        the legacy ``<name>_g`` / ``<name>_v`` keys of ``torch.nn.utils.weight_norm`` (and one
        whose only parametrization declares ``torch_legacy_suffixes`` under its own).

    Returns:
      A dict from torch keys to numpy arrays (new, writable, C-contiguous), in tree order.

    Raises:
      ValueError: For a parametrization without a torch equivalent in that layout (orthogonal
        on a conv kernel), a tree without its state, a stacked tensor (``nn.scan``,
        ``nnx.vmap``; also a plain kernel, told by its bias of more than one axis or, in NNX,
        by its layer's own rank), the state of a ``paramx.nnx`` module without the module, a
        tie torch cannot hold, or two leaves with one torch name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.interop import to_torch_state_dict
      >>> tree = {"fc": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]]),
      ...                "bias": jnp.zeros(2)}}
      >>> tree = px.weight_norm(tree, "fc/kernel")
      >>> sd = to_torch_state_dict(tree)
      >>> {k: v.shape for k, v in sd.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'fc.bias': (2,), 'fc.parametrizations.weight.original0': (2, 1),
       'fc.parametrizations.weight.original1': (2, 3)}
      >>> sd["fc.parametrizations.weight.original0"][:, 0]
      array([5., 1.], dtype=float32)
      >>> sorted(to_torch_state_dict(tree, legacy_weight_norm=True))
      ['fc.bias', 'fc.weight_g', 'fc.weight_v']

      An NNX model with an ``nnx.Sequential`` gets torch's ``nn.Sequential`` names:

      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                      pnx.orthogonal(nnx.Linear(4, 4, rngs=nnx.Rngs(1))))
      >>> sorted(to_torch_state_dict(net))  # doctest: +NORMALIZE_WHITESPACE
      ['0.bias', '0.weight', '2.bias', '2.parametrizations.weight.0.base',
       '2.parametrizations.weight.original']
    """
    names_auto: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    renames = None
    if is_nnx(tree):
        view = nnx_view(tree, doing="to_torch_state_dict")
        names_auto, tree, renames = view.auto, view.tree, view.renames
    else:
        # A plain tie is torch's shared parameter, listed under each of its names.
        tree = tie.fill_shared(tree, "to_torch_state_dict")
    names = Names(modules, names_auto)
    out: dict[str, np.ndarray] = {}
    for t in tensors(tree, names, check_layouts(layouts), renames):
        legacy = legacy_weight_norm and t.declared_legacy is not None
        for e in plan(t, legacy=legacy):
            if isinstance(e.template, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"The array at {t.flax_path} ({e.label or 'value'}) is abstract "
                    f"(jax.ShapeDtypeStruct); to_torch_state_dict writes concrete arrays."
                )
            x = np.asarray(e.template)  # the tree's own array here
            out[e.torch_key] = np.array(e.to_torch(x), order="C", copy=True)
    return out
