"""``remove_parametrizations(module, name, leave_parametrized=True)``: torch's function on an
NNX module, in place.

The value comes from the core (the per-tensor form of :func:`paramx.remove_parametrizations`,
through :mod:`.run`); then the attribute becomes a plain Variable again, the original
Variable itself whenever it can hold the value, so tied weights stay tied, and the module gets
its class back once nothing is parametrized.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from paramx._src.integrations.nnx import run
from paramx._src.integrations.nnx.classes import type_before_parametrizations
from paramx._src.integrations.nnx.container import CONTAINER, lookup
from paramx._src.integrations.nnx.register import check_module


def remove_parametrizations(
    module: nnx.Module, name: str, leave_parametrized: bool = True
) -> nnx.Module:
    """Removes the parametrizations on ``module.<name>``, in place; torch's
    ``remove_parametrizations``.

    With ``leave_parametrized=True`` the attribute becomes a plain Variable (of the
    original's type) holding the current constrained value, computed without a state
    update; with ``False`` it becomes the ``original`` Variable itself, which needs a single
    original. The computation is :func:`paramx.remove_parametrizations`. When no
    parametrization is left, ``module.parametrizations`` is deleted and the module gets its
    class back.

    Args:
      module: A module with a parametrization on ``name``.
      name: The attribute name.
      leave_parametrized: Keep the constrained value (True) or the raw original (False);
        positional as in torch.

    Returns:
      ``module`` (modified in place).

    Raises:
      ValueError: If ``name`` is not parametrized, or for ``leave_parametrized=False`` with
        several originals (weight norm's g and v), as in torch.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> q = layer.kernel
      >>> _ = pnx.remove_parametrizations(layer, "kernel")
      >>> type(layer).__name__, type(layer.kernel).__name__
      ('Linear', 'Param')
      >>> bool(jnp.array_equal(layer.kernel[...], q))
      True
    """
    check_module(module)
    plist = lookup(module, name)
    if plist is None:
        names = list(vars(module).get(CONTAINER, {}) or [])
        raise ValueError(
            f"Module {type(module).__name__} does not have a parametrization on {name!r}. "
            f"Parametrized names: {', '.join(map(repr, names)) or 'none'}."
        )
    nested = [n for n in plist._names() if lookup(plist, n) is not None]
    if nested:
        raise ValueError(
            f"The original {nested[0]!r} of {plist.label} has parametrizations of its own "
            f"(nested registration). Remove those first: "
            f"`paramx.nnx.remove_parametrizations(module.parametrizations[{name!r}], "
            f"{nested[0]!r})`, then remove {name!r}."
        )
    value, _ = run.remove(plist.node(), leave_parametrized, plist.label, plist.eager)
    originals = plist.originals
    if not leave_parametrized:
        restored = originals[0]
    elif (
        len(originals) == 1
        and jnp.shape(originals[0].get_value()) == jnp.shape(value)
        and jnp.result_type(originals[0].get_value()) == jnp.result_type(value)
    ):
        # torch sets the original Parameter to the value: the same object stays, so a
        # Variable shared with another module (tied weights) stays shared.
        restored = originals[0]
        restored.set_value(value)
    else:
        same = [v for v in originals if v.get_value().shape == value.shape]
        restored = same[0].copy(value) if same else type(originals[0])(value)
    container = vars(module)[CONTAINER]
    del container[name]
    if len(container) == 0:
        delattr(module, CONTAINER)
        object.__setattr__(module, "__class__", type_before_parametrizations(module))
    setattr(module, name, restored)
    return module
