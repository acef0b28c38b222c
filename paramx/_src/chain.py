"""Running a chain of parametrizations: forward, state updates and right inverses.

These functions are pure. Errors mirror PyTorch's ``ParametrizationList`` checks and add the
path of the tensor; see ``shared/reference/torch-parametrize.md`` for torch's texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from paramx._src import parametrization as pz
from paramx._src.node import Parametrized

PyTree = Any


class NoRightInverse(Exception):
    """Internal: a link has no ``right_inverse``."""


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def type_name(x: Any) -> str:
    return type(x).__name__


def describe(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def link_kwargs(node_params: dict, node_state: dict, i: int, p: Any) -> dict[str, Any]:
    if not pz.has_arrays(p):
        return {}
    return {"params": node_params.get(str(i)), "state": node_state.get(str(i))}


def run_forward(
    chain: Sequence[Any],
    originals: Sequence[Any],
    params: dict,
    state: dict,
    *,
    update_state: bool = False,
) -> tuple[Any, dict]:
    """Applies the chain to the originals; returns the value and the (maybe updated) state."""
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
        xs = (pz.forward_fn(p)(*xs, **kw),)
    return xs[0], new_state


def node_value(node: Parametrized, *, update_state: bool = False) -> tuple[Any, dict]:
    return run_forward(
        node.chain, node.originals, node.params, node.state, update_state=update_state
    )


def link_right_inverse(p: Any, i: int, value: Any, params: dict, state: dict) -> tuple[Any, dict]:
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
    mesh, used = None, []
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
        x.sharding.mesh
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
