"""Running a chain of parametrizations: forward, state updates and right inverses, per tensor
of a stack.

These functions are pure. The checks on what they return are in ``checks.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import numpy as np
from jax.custom_derivatives import SymbolicZero

from paramx._src.core import checks, stacks
from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized

PyTree = Any


class NoRightInverse(Exception):
    """Internal: a link has no ``right_inverse``."""


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
    """``fn`` mapped over ``n_axes`` leading axes of every argument and result (``jax.vmap``,
    kept under jaxlib's LAPACK thread-pool threshold on the CPU: ``stacks.per_tensor``)."""
    return stacks.per_tensor(fn, n_axes)


def node_value(
    node: Parametrized, *, update_state: bool = False, where: str = "<tensor>"
) -> tuple[Any, dict[str, Any]]:
    """The value of a node (and its new state), computed per tensor of a stack."""
    with checks.at_path(where):
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
            f"a pair (originals, state). Got {checks.type_name(out)}."
        )
    new_state = dict(state)
    if out[1] is not None:
        new_state[str(i)] = out[1]
    return out[0], new_state
