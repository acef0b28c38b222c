"""Running a chain of parametrizations: forward, state updates and right inverses.

These functions are pure. Errors mirror PyTorch's ``ParametrizationList`` checks and add the
path of the tensor; see ``shared/reference/torch-parametrize.md`` for torch's texts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import NamedSharding, PartitionSpec

from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized

PyTree = Any


NEEDS_CONCRETE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)
"""What a function raises under tracing when it needs concrete values (Python validation)."""


class NoRightInverse(Exception):
    """Internal: a link has no ``right_inverse``."""


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def type_name(x: Any) -> str:
    return type(x).__name__


def describe(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def link_kwargs(
    node_params: dict[str, Any], node_state: dict[str, Any], i: int, p: Any
) -> dict[str, Any]:
    if not pz.has_arrays(p):
        return {}
    return {"params": node_params.get(str(i)), "state": node_state.get(str(i))}


def run_forward(
    chain: Sequence[Any],
    originals: Sequence[Any],
    params: dict[str, Any],
    state: dict[str, Any],
    *,
    update_state: bool = False,
    where: str = "<tensor>",
) -> tuple[Any, dict[str, Any]]:
    """Applies the chain to the originals; returns the value and the (maybe updated) state."""
    if state:
        state = _refuse_state_tangents(dict(state), where)
    new_state = dict(state)
    xs: tuple[Any, ...] = tuple(originals)
    for i, p in enumerate(chain):
        kw = link_kwargs(params, new_state, i, p)
        if kw:  # state is never differentiated, whoever holds it
            kw["state"] = jax.lax.stop_gradient(kw["state"])
        update = pz.update_state_fn(p)
        if update_state and update is not None and str(i) in new_state:
            sg = jax.lax.stop_gradient
            new_state[str(i)] = sg(update(*sg(xs), params=sg(kw["params"]), state=kw["state"]))
            kw["state"] = new_state[str(i)]
        fwd = pz.forward_fn(p)
        try:
            out = fwd(*xs, **kw)
        except TypeError as e:
            if not _binds(fwd, len(xs), kw):
                raise TypeError(
                    f"The forward of parametrization {pz.display_name(p)} (link {i} of the "
                    f"chain) cannot be called with {len(xs)} tensor(s)"
                    f"{' and the keywords params=, state=' if kw else ''} ({e}). The first "
                    f"link of a chain receives every original (weight norm's g and v: two); "
                    f"later links receive one tensor; a parametrization with `init` also "
                    f"receives `params=` and `state=`."
                ) from e
            raise
        xs = (out,)
    return xs[0], new_state


def _binds(fn: Callable[..., Any], n: int, kw: dict[str, Any]) -> bool:
    """Whether ``fn`` accepts ``n`` positional arguments and the keywords ``kw``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*range(n), **kw)
    except TypeError:
        return False
    return True


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _refuse_state_tangents(state: dict[str, Any], where: str) -> dict[str, Any]:
    return state


@functools.partial(_refuse_state_tangents.defjvp, symbolic_zeros=True)
def _refuse_state_tangents_jvp(where: str, primals: Any, tangents: Any) -> Any:
    (state,), (tangent,) = primals, tangents
    leaves = jax.tree_util.tree_leaves(tangent, is_leaf=lambda t: isinstance(t, SymbolicZero))
    if not all(isinstance(t, SymbolicZero) for t in leaves):
        raise ValueError(
            f"The tree being differentiated holds the state of the parametrized tensor at "
            f"{where} (power-iteration vectors, an orthogonal base, ...). State is not "
            f"trainable: an optimizer given this tree would change it (weight decay shrinks it) "
            f"and break the constraint silently. Split it off and differentiate the trainable "
            f"half only: `params, state = paramx.split_state(tree)`, then `tx.init(params)` and "
            f"`jax.grad(lambda p: loss(paramx.materialize(p, state)))(params)`. With "
            f"paramx.linen, differentiate `variables['params']` and keep 'paramx_state' apart, "
            f"as with 'batch_stats'."
        )
    return state, tangent


def stack_axes(node: Parametrized, where: str) -> int:
    """How many leading stack axes ``node`` has; raises if its arrays disagree."""
    extra = [np.ndim(x) - d for x, d in zip(node.originals, node.event_ndims)]
    if any(e != extra[0] for e in extra) or extra[0] < 0:
        raise ValueError(
            f"The originals of the parametrized tensor at {where} have shapes "
            f"{[tuple(np.shape(x)) for x in node.originals]}, but were registered with "
            f"{list(node.event_ndims)} dimensions each: they must all carry the same leading "
            f"stack axes (or none). Restore them from a tree with the same registrations."
        )
    batch = node.batch_shape
    if not batch:
        return 0
    for x in jax.tree_util.tree_leaves((node.originals, node.params, node.state)):
        if tuple(np.shape(x))[: len(batch)] != batch:
            raise ValueError(
                f"The parametrized tensor at {where} is a stack of shape {list(batch)} (the "
                f"leading axes of its originals), but one of its originals, params or state "
                f"arrays has shape {list(np.shape(x))}. Every array of a stacked tensor carries "
                f"the stack axes first, as nn.scan, nn.vmap and nnx.vmap lay them out."
            )
    return len(batch)


def per_tensor(fn: Callable[..., Any], n_axes: int) -> Callable[..., Any]:
    """``fn`` mapped over ``n_axes`` leading axes of every argument and result."""
    for _ in range(n_axes):
        fn = jax.vmap(fn)
    return fn


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


def node_value(
    node: Parametrized, *, update_state: bool = False, where: str = "<tensor>"
) -> tuple[Any, dict[str, Any]]:
    """The value of a node (and its new state), computed per tensor of a stack."""
    with at_path(where):
        n_axes = stack_axes(node, where)

        def run(
            originals: Any, params: dict[str, Any], state: dict[str, Any]
        ) -> tuple[Any, dict[str, Any]]:
            return run_forward(
                node.chain, originals, params, state, update_state=update_state, where=where
            )

        value_and_state = per_tensor(run, n_axes)(node.originals, node.params, node.state)
        return cast(tuple[Any, dict[str, Any]], value_and_state)


def value_shape(node: Parametrized, where: str) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a node's value, computed abstractly."""
    shape = jax.eval_shape(lambda n: node_value(n, where=where)[0], node)
    return cast(jax.ShapeDtypeStruct, shape)


def link_right_inverse(
    p: Any, i: int, value: Any, params: dict[str, Any], state: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Runs one link's ``right_inverse``; returns (originals-like, new state dict)."""
    fn = pz.right_inverse_fn(p)
    if fn is None:
        raise NoRightInverse
    if not pz.has_arrays(p):
        return fn(value), state
    out = fn(value, **link_kwargs(params, state, i, p))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"Parametrization {pz.display_name(p)} has `init`, so its `right_inverse` must return "
            f"a pair (originals, state). Got {type_name(out)}."
        )
    new_state = dict(state)
    if out[1] is not None:
        new_state[str(i)] = out[1]
    return out[0], new_state


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


# ----- explicit sharding -----------------------------------------------------------------------


def explicit_axes(tree: Any) -> tuple[Any, tuple[str, ...]]:
    """The mesh, and the explicit mesh axes, along which some array of ``tree`` is sharded.

    With explicit sharding the sharding is part of an array's type (``jax.typeof(x).sharding``),
    also under ``jit``. Returns ``(None, ())`` when no array is sharded along an explicit axis.
    """
    mesh: Any = None
    used: list[str] = []
    for x in jax.tree_util.tree_leaves(tree):
        try:
            s = jax.typeof(x).sharding
        except TypeError:
            continue
        m = getattr(s, "mesh", None)
        if m is None or m.empty or not m.explicit_axes:
            continue
        for entry in s.spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            used.extend(n for n in names if n in m.explicit_axes and n not in used)
        mesh = mesh or m
    return (mesh, tuple(used)) if used else (None, ())


def same_shape_shardings(inputs: Any) -> Callable[[Any, Any], Any]:
    """An ``out_sharding`` rule for :func:`run_auto`: each output array gets the sharding of the
    first array of ``inputs`` with its shape, or ``default`` (replicated) if there is none."""
    leaves = jax.tree_util.tree_leaves(inputs)
    by_shape: dict[tuple[int, ...], Any] = {}
    for x in leaves:
        by_shape.setdefault(tuple(np.shape(x)), jax.typeof(x).sharding)

    def rule(shapes: Any, default: Any) -> Any:
        return jax.tree_util.tree_map(lambda sd: by_shape.get(tuple(sd.shape), default), shapes)

    return rule


def run_auto(
    fn: Callable[..., Any],
    *args: Any,
    out_sharding: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """``fn(*args)``, run in auto sharding mode when ``args`` are sharded along explicit axes.

    Under explicit sharding, operations such as ``A - A^T`` on a sharded matrix or a QR of
    one do not type-check. Inside ``jax.sharding.auto_axes`` over the axes in use, the compiler
    lays them out freely; the outputs are then resharded by ``out_sharding(shapes, replicated)``,
    which maps the tree of output shapes to a tree of shardings (default:
    :func:`same_shape_shardings` of ``args``). Without explicit sharding this is ``fn(*args)``.
    """
    mesh, axes = explicit_axes(args)
    if not axes:
        return fn(*args)
    replicated = NamedSharding(mesh, PartitionSpec())
    rule = out_sharding or same_shape_shardings(args)
    concrete = [
        cast(Any, x.sharding).mesh
        for x in jax.tree_util.tree_leaves(args)
        if isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and isinstance(getattr(x.sharding, "mesh", None), jax.sharding.Mesh)
    ]

    def call() -> Any:
        probe = jax.sharding.auto_axes(fn, axes=axes, out_sharding=replicated)
        shapes = jax.eval_shape(probe, *args)
        return jax.sharding.auto_axes(fn, axes=axes, out_sharding=rule(shapes, replicated))(*args)

    if not concrete:
        return call()
    with jax.set_mesh(concrete[0]):  # eager: ops on concrete arrays need the concrete mesh
        return call()
