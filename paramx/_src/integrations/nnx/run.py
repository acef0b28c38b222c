"""Running the core's per-tensor functions for a module: compiled, inline or eager.

Every number of ``paramx.nnx`` comes from the core's per-tensor API
(:func:`paramx._src.core.register.register_tensor`, ``assign_tensor``, ``remove_tensor``,
``materialize_tensor``). Called eagerly (registering, reading ``module.kernel`` outside
``nnx.jit``), a call runs as one compiled program instead of one dispatch per operation; the
programs are the module-level constants below (``jax.jit`` of fixed functions, the chain and
the options static), so the only cache is jax's own. Inside a trace the call runs inline.

Which calls compile. A parametrization's functions are traced only when it declares
``traceable = True`` (the built-ins do): tracing a user's function that turns out to need
concrete values (numpy inside ``right_inverse``, say) would run part of it, fail, and run it
again eagerly, so side effects would happen twice. A chain with any undeclared link runs
eagerly, each function exactly once per call. A link that declares ``traceable`` but still
fails to trace falls back to eager once; the caller records that on the tensor
(``ParametrizationList.eager``), so later calls do not try again.

Each function returns ``(result, failed_trace)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from paramx._src.core import checks
from paramx._src.core.assign import assign_tensor
from paramx._src.core.chain import stack_axes
from paramx._src.core.checks import check_value
from paramx._src.core.materialize import materialize_tensor
from paramx._src.core.node import Parametrized
from paramx._src.core.register import check_input, register_tensor
from paramx._src.core.remove import remove_tensor


def is_traceable(p: Any) -> bool:
    """Whether ``p`` declares that its functions can be traced (``traceable = True``)."""
    return getattr(p, "traceable", False) is True


def needs_eager(chain: Sequence[Any]) -> bool:
    """Whether a chain must run operation by operation: some link does not declare
    ``traceable = True``."""
    return not all(is_traceable(p) for p in chain)


def _register(
    value: Any, key: Any, *, parametrization: Any, unsafe: bool, batch_axes: int, label: str
) -> Parametrized:
    return register_tensor(
        value, parametrization, unsafe=unsafe, key=key, batch_axes=batch_axes, label=label
    )


def _assign(node: Parametrized, value: Any, *, label: str) -> Parametrized:
    return assign_tensor(node, value, label=label)


def _remove(node: Parametrized, *, leave_parametrized: bool, label: str) -> Any:
    return remove_tensor(node, leave_parametrized, label=label)


def _materialize(node: Parametrized, *, update_state: bool, label: str) -> Any:
    return materialize_tensor(node, update_state=update_state, label=label)


_REGISTER = jax.jit(_register, static_argnames=("parametrization", "unsafe", "batch_axes", "label"))
_ASSIGN = jax.jit(_assign, static_argnames=("label",))
_REMOVE = jax.jit(_remove, static_argnames=("leave_parametrized", "label"))
_MATERIALIZE = jax.jit(_materialize, static_argnames=("update_state", "label"))


def _eager_only(args: Any, static: dict[str, Any]) -> bool:
    """Whether the call cannot be compiled: it runs inside a trace already, an argument is
    not an array, or jit could not cache on the static options (an unhashable chain)."""
    leaves = jax.tree_util.tree_leaves(args)
    if any(isinstance(x, jax.core.Tracer) or not checks.is_array(x) for x in leaves):
        return True
    try:
        hash((jax.tree_util.tree_structure(args), tuple(static.items())))
    except TypeError:
        return True
    return False


def _call(
    fn: Callable[..., Any], compiled: Callable[..., Any], args: tuple, static: dict, eager: bool
) -> tuple[Any, bool]:
    if eager or _eager_only(args, static):
        return fn(*args, **static), False
    try:
        return compiled(*args, **static), False
    except checks.NEEDS_CONCRETE:  # declared traceable, but is not: run it as it is written
        return fn(*args, **static), True


def register(
    value: Any,
    parametrization: Any,
    *,
    key: Any,
    unsafe: bool,
    batch_axes: int,
    label: str,
    eager: bool = False,
) -> tuple[Parametrized, bool]:
    """``register_tensor`` on an array or a node (appending); see the module docstring."""
    chain = (*(value.chain if isinstance(value, Parametrized) else ()), parametrization)
    # Value checks need concrete values, so they run here, before anything is traced.
    check_input(parametrization, value, label, batch_axes)
    static = dict(
        parametrization=parametrization, unsafe=unsafe, batch_axes=batch_axes, label=label
    )
    return _call(_register, _REGISTER, (value, key), static, eager or needs_eager(chain))


def assign(node: Parametrized, value: Any, label: str, eager: bool) -> tuple[Parametrized, bool]:
    """``assign_tensor``; see the module docstring."""
    check_value(node.chain[-1], value, label, stack_axes(node, label))
    return _call(_assign, _ASSIGN, (node, value), dict(label=label), eager)


def remove(
    node: Parametrized, leave_parametrized: bool, label: str, eager: bool
) -> tuple[Any, bool]:
    """``remove_tensor``; see the module docstring."""
    static = dict(leave_parametrized=leave_parametrized, label=label)
    return _call(_remove, _REMOVE, (node,), static, eager)


def materialize(
    node: Parametrized, label: str, update_state: bool, eager: bool
) -> tuple[Any, bool]:
    """``materialize_tensor``: the value, or ``(value, new state dict)`` with
    ``update_state``; see the module docstring."""
    static = dict(update_state=update_state, label=label)
    return _call(_materialize, _MATERIALIZE, (node,), static, eager)
