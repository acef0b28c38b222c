"""Validation shared by the tree transforms: what counts as an array, torch's checks on what a
chain returns (shape, dtype, sequence of originals), and errors that name the tensor's path.

Texts follow PyTorch's ``ParametrizationList`` checks (``shared/reference/torch-parametrize.md``)
and add the path and what to do.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core.node import Parametrized

try:  # JAX's public handles on the current trace (recent versions)
    from jax.extend.core import find_top_trace, get_opaque_trace_state
except ImportError:  # pragma: no cover - older JAX: a value holding tracers is never reused
    find_top_trace = get_opaque_trace_state = None  # type: ignore[assignment]

NEEDS_CONCRETE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)
"""What a function raises under tracing when it needs concrete values (Python validation)."""


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def current_trace() -> Any:
    """The JAX trace that values are computed in now (compared with ``==``); None where JAX
    does not say."""
    if get_opaque_trace_state is None:
        return None
    return get_opaque_trace_state(convention="paramx")


def reusable(trace: Any, value: Any) -> bool:
    """Whether ``value`` (a pytree), computed in ``trace`` (a :func:`current_trace`), can be
    used in the current trace: always in the same trace, and elsewhere when each of its
    tracers belongs to a trace the current one runs inside (a value computed before a
    ``jax.lax.scan`` read in its body). A tracer of a trace that has ended (a scan body's
    value read after the scan) has escaped it: ``False``, so the caller computes again.
    Where the nesting cannot be told, the answer is ``False`` (computing again is safe)."""
    tracers = [x for x in jax.tree_util.tree_leaves(value) if isinstance(x, jax.core.Tracer)]
    if not tracers:
        return True
    if trace is None or find_top_trace is None:
        return False
    if trace == current_trace():
        return True
    enclosing: list[Any] = []
    t = find_top_trace(())
    while t is not None:
        enclosing.append(t)
        t = getattr(t, "parent_trace", None)
    return all(any(getattr(x, "_trace", None) is e for e in enclosing) for x in tracers)


def type_name(x: Any) -> str:
    return type(x).__name__


def describe(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


_PLAIN_ERRORS = (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError)


_PLAIN_INITS = tuple(t.__init__ for t in _PLAIN_ERRORS)


@contextlib.contextmanager
def at_path(where: str) -> Iterator[None]:
    """Adds ``(at <where>)`` to errors raised inside a parametrization's functions.

    Errors that already name the path pass through unchanged. The builtin exception types are
    re-raised as the same type with the path in the message; other types (JAX's own errors,
    a user's exception classes) get the path as a note.
    """
    try:
        yield
    except _PLAIN_ERRORS as e:
        message = str(e)
        if re.search(rf"(?i)\bat {re.escape(where)}(?![\w/])", message):
            raise
        if type(e).__init__ in _PLAIN_INITS:  # the constructor takes one message
            new = type(e)(f"{message} (at {where})")
            raise new.with_traceback(e.__traceback__) from e.__cause__
        if sys.version_info >= (3, 11):  # Python 3.10 has no exception notes
            e.add_note(f"(raised for the parametrized tensor at {where})")
        raise


def abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def check_same(got: Any, want: Any, *, producer: str, what: str, where: str, hint: str) -> None:
    """Raises ValueError unless ``got`` is an array of ``want``'s dtype and shape."""
    if not is_array(got):
        raise ValueError(f"{producer} must return a tensor. Got {type_name(got)}. (at {where})")
    for attr in ("dtype", "shape"):
        g, w = getattr(got, attr), getattr(want, attr)
        if (jnp.dtype(g) != jnp.dtype(w)) if attr == "dtype" else (tuple(g) != tuple(w)):
            raise ValueError(
                f"{what} may not change the {attr} of the tensor, unless the `unsafe` flag is "
                f"enabled. At {where}: expected {describe(want)}, got {describe(got)}. {hint}"
            )


def as_originals(new: Any, original: Any, *, where: str) -> tuple[tuple[Any, ...], bool]:
    """Validates what the right-inverse chain produced at registration.

    Returns the originals as a tuple and whether they came from a sequence.
    """
    if is_array(new):
        if jnp.dtype(new.dtype) != jnp.dtype(original.dtype):
            raise ValueError(
                f"When `right_inverse` outputs one tensor, it may not change the dtype (this holds "
                f"even with `unsafe=True`). At {where}: the tensor is {describe(original)}, "
                f"`right_inverse` returned {describe(new)}. Cast inside `forward` instead."
            )
        return (jnp.asarray(new),), False
    if isinstance(new, (tuple, list)):
        for i, x in enumerate(new):
            if not is_array(x):
                raise ValueError(
                    f"'right_inverse' must return a tensor or a sequence of tensors (list, "
                    f"tuple...). Got element {i} of the sequence with type {type_name(x)}. "
                    f"(at {where})"
                )
        return tuple(jnp.asarray(x) for x in new), True
    raise ValueError(
        f"'right_inverse' must return a tensor or a sequence of tensors (list, tuple...). "
        f"Got {type_name(new)}. (at {where})"
    )


def check_assigned(new: Any, node: Parametrized, *, where: str) -> tuple[Any, ...]:
    """Validates the result of the right-inverse chain on assignment against the originals."""
    if not node.multi:
        if not is_array(new):
            raise ValueError(
                f"`right_inverse` should return a tensor. Got {type_name(new)}. (at {where})"
            )
        if jnp.dtype(new.dtype) != jnp.dtype(node.originals[0].dtype):
            raise ValueError(
                f"The tensor returned by `right_inverse` has dtype {jnp.dtype(new.dtype).name} "
                f"while `original` has dtype {jnp.dtype(node.originals[0].dtype).name}. "
                f"(at {where})"
            )
        return (jnp.asarray(new),)
    n = len(node.originals)
    if not isinstance(new, (tuple, list)):
        raise ValueError(
            f"'right_inverse' must return a sequence of tensors. Got {type_name(new)}. (at {where})"
        )
    if len(new) != n:
        raise ValueError(
            f"'right_inverse' must return a sequence of tensors of length {n}. Got a sequence of "
            f"length {len(new)}. (at {where})"
        )
    for i, (x, orig) in enumerate(zip(new, node.originals)):
        if not is_array(x):
            raise ValueError(
                f"'right_inverse' must return a sequence of tensors. Got element {i} of type "
                f"{type_name(x)}. (at {where})"
            )
        if jnp.dtype(x.dtype) != jnp.dtype(orig.dtype):
            raise ValueError(
                f"Tensor {i} returned by `right_inverse` has dtype {jnp.dtype(x.dtype).name} while "
                f"`original{i}` has dtype {jnp.dtype(orig.dtype).name}. (at {where})"
            )
    return tuple(jnp.asarray(x) for x in new)


def check_value(p: Any, value: Any, where: str, batch_axes: int | None = None) -> None:
    """Runs a link's declared ``check_value(value)`` on a concrete value, eagerly.

    A parametrization whose set is open (positive, an interval, strictly increasing) cannot
    map a value outside it anywhere sensible, and the check needs concrete values: under
    ``jit`` or ``vmap`` (stacks, compiled registration) it cannot run. Callers run this before
    they trace, so the value a user gives is checked whatever runs next. ``batch_axes``, when
    the caller knows it, is how many leading axes of ``value`` are a stack; it is passed on to a
    ``check_value`` that takes a ``batch_axes`` keyword (one whose options count axes without
    the stack, such as ``Ordered(axis=0)``), so that it checks each tensor of the stack.
    """
    fn = getattr(p, "check_value", None)
    if not (callable(fn) and callable(getattr(p, "forward", None))):
        return
    if isinstance(value, jax.core.Tracer) or not isinstance(value, (jax.Array, np.ndarray)):
        return
    with at_path(where):
        if batch_axes is not None and takes_batch_axes(fn):
            fn(value, batch_axes=batch_axes)
        else:
            fn(value)


def takes_batch_axes(fn: Any) -> bool:
    """Whether ``fn`` (a ``check_value``) takes a ``batch_axes`` keyword."""
    try:
        return "batch_axes" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin, a C extension)
        return False
