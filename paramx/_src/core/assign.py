"""`assign`: torch's ``module.weight = value``, through the right_inverse chain."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.core import chain as ch
from paramx._src.core import checks, paths, sharding
from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized, is_node


def assign(tree: Any, where: paths.Where, value: Any) -> Any:
    """Sets a parametrized tensor to ``value``; returns a new tree.

    Runs every link's ``right_inverse`` in reverse order, as torch does on
    ``module.weight = value``, and stores the resulting originals (and any state a
    ``right_inverse`` returns, e.g. a new orthogonal base). The parametrizations' own
    learnable arrays are kept. Unless the tensor was registered with ``unsafe=True``, the
    originals must keep their shapes (torch does not check this; a silent shape change would
    break optimizer state), and they always keep their dtypes, as in torch.

    Args:
      tree: A registered tree.
      where: The path of one parametrized tensor (a string or a tuple of keys), or a
        predicate selecting several; each gets the same value.
      value: The new value of the tensor.

    Returns:
      The new tree.

    Raises:
      RuntimeError: If a link has no ``right_inverse``. A ``NotImplementedError`` raised by a
        ``right_inverse`` reaches you unchanged.
      ValueError: If the tensor is not parametrized, if ``value`` has the wrong shape or dtype,
        or if the chain returns something of the wrong type, length or dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> positive = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log)
      >>> tree = px.register_parametrization({"s": jnp.ones(2)}, "s", positive)
      >>> tree = px.assign(tree, "s", jnp.array([2.0, 3.0]))
      >>> px.materialize(tree)["s"]
      Array([2., 3.], dtype=float32)
    """
    paths.check_where(where)
    if not checks.is_array(value):
        raise ValueError(
            f"assign to {paths.describe_where(where)}: can only assign an array; got "
            f"{checks.type_name(value)}. Pass it as an array (jnp.asarray)."
        )
    value = jnp.asarray(value)
    replacements = {}
    for i, where_s, node in paths.select_parametrized(
        tree, where, doing="there is no right_inverse to run (replace the leaf directly)"
    ):
        replacements[i] = _assign_node(node, value, where_s)
    return paths.replace_leaves(tree, replacements)


def assign_tensor(node: Parametrized, value: Any, *, label: str = "<tensor>") -> Parametrized:
    """Sets one parametrized tensor to ``value``; returns the new node.

    The per-tensor form of :func:`paramx.assign` (torch's ``module.weight = value``): the
    chain's ``right_inverse`` runs in reverse and the node keeps its chain and learnable
    arrays. Errors name ``label``.

    Args:
      node: A :class:`paramx.Parametrized` node.
      value: The new value.
      label: How errors name the tensor.

    Returns:
      The new node.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> positive = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log)
      >>> node = px.tensor.register(jnp.ones(2), positive)
      >>> node = px.tensor.assign(node, jnp.array([2.0, 3.0]))
      >>> px.tensor.materialize(node)
      Array([2., 3.], dtype=float32)
    """
    if not is_node(node):
        raise ValueError(
            f"{label} is not parametrized (it is a {checks.type_name(node)}): there is no "
            f"right_inverse to run. Register a parametrization first, or replace the array."
        )
    if not checks.is_array(value):
        raise ValueError(
            f"assign to {label}: can only assign an array; got {checks.type_name(value)}. Pass "
            f"it as an array (jnp.asarray)."
        )
    return _assign_node(node, jnp.asarray(value), label)


def _tensor_shape(node: Parametrized, where_s: str) -> tuple[int, ...] | None:
    """The shape of the tensor a (safe) node holds, found abstractly; None if its chain cannot
    run here (a trainable half without its state)."""
    try:
        out = jax.eval_shape(lambda n: ch.node_value(n, update_state=False, where=where_s)[0], node)
    except Exception:  # the right_inverse below reports any real problem
        return None
    return tuple(out.shape)


def _assign_node(node: Parametrized, value: Any, where_s: str) -> Parametrized:
    checks.check_value(node.chain[-1], value, where_s, ch.stack_axes(node, where_s))
    inexact = [
        pz.display_name(p) for p in node.chain if getattr(p, "right_inverse_exact", True) is False
    ]
    if inexact:
        warnings.warn(
            f"Assigning to {where_s}: the right_inverse of {', '.join(inexact)} is an "
            f"initialization, not an inverse, so the tensor will not hold the assigned value "
            f"(materialize it to see what it holds).",
            stacklevel=3,
        )
    try:
        with checks.at_path(where_s):
            work = functools.partial(_assign_one, where_s=where_s)
            out: Parametrized = sharding.run_auto(work, node, value)
    except ValueError as e:
        note = _shape_note(node, value, where_s)
        if note is None:
            raise
        raise ValueError(f"{e}\n{note}") from e
    return out


def _shape_note(node: Parametrized, value: Any, where_s: str) -> str | None:
    """What to say when ``value`` does not have the shape of the tensor at ``where_s`` (a
    torch weight in Flax's place, say); None when it does, or the shape cannot be told."""
    want = None if node.unsafe else _tensor_shape(node, where_s)
    if want is None or tuple(value.shape) == want:
        return None
    hint = ""
    if value.ndim == len(want) >= 2 and tuple(value.shape) == (*want[:-2], want[-1], want[-2]):
        hint = (
            " It is the tensor's shape with the last two axes swapped: paramx keeps Flax's "
            "layout, a Dense kernel is (in, out) where torch's weight is (out, in); transpose "
            "a torch weight (`w.T`) first."
        )
    return (
        f"The tensor at {where_s} has shape {want}, the assigned value "
        f"{checks.describe(value)}.{hint} Pass a value of the tensor's shape."
    )


def _assign_one(node: Any, value: Any, *, where_s: str) -> Any:
    n_stack = ch.stack_axes(node, where_s)

    def one(
        originals: Any, params: dict[str, Any], state: dict[str, Any], value: Any
    ) -> tuple[Any, dict[str, Any]]:
        x: Any = value
        state = dict(state)
        for k in reversed(range(len(node.chain))):
            p = node.chain[k]
            try:
                x, state = ch.link_right_inverse(p, k, x, params, state)
            except ch.NoRightInverse:
                raise RuntimeError(
                    f"parametrization {pz.display_name(p)} does not implement right_inverse, so "
                    f"a value cannot be assigned to {where_s}. Give it a `right_inverse`, or "
                    f"remove the parametrizations and register them again on the new value."
                ) from None
        return checks.check_assigned(x, node, where=where_s), state

    if n_stack and tuple(value.shape[:n_stack]) != node.batch_shape:
        raise ValueError(
            f"The tensor at {where_s} is a stack of shape {list(node.batch_shape)}; the assigned "
            f"value {checks.describe(value)} must carry the same leading axes."
        )
    try:
        originals, state = ch.per_tensor(one, n_stack)(
            node.originals, node.params, node.state, value
        )
    except checks.NEEDS_CONCRETE:
        if not n_stack:
            raise
        raise ValueError(
            f"The tensor at {where_s} is a stack, so its right_inverse runs under jax.vmap, and "
            f"it needs concrete values. Assign each tensor of the stack separately, or write the "
            f"right_inverse with jnp operations only."
        ) from None
    if state and not node.state:
        _refuse_missing_state(node, state, where_s)
    if not node.unsafe:
        for k, (new, old) in enumerate(zip(originals, node.originals)):
            if new.shape != old.shape:
                name = f"original{k}" if node.multi else "original"
                raise ValueError(
                    f"Assigning a value may not change the shape of `{name}` unless the tensor "
                    f"was registered with `unsafe=True`. At {where_s}: `{name}` is "
                    f"{checks.describe(old)}, the assigned value {checks.describe(value)} gives "
                    f"{checks.describe(new)}. Pass a value of the tensor's shape."
                )
        _check_state(node.state, state, where_s)
    event_ndims = tuple(x.ndim - n_stack for x in originals)
    return node.replace(originals=originals, state=state, event_ndims=event_ndims)


def _refuse_missing_state(node: Parametrized, new: dict[str, Any], where_s: str) -> None:
    """A node without state whose right_inverse renews some is a trainable half: its new
    state would be dropped when the state half is merged back, and the value computed from
    the old state (with ``unsafe``), or the state check would suggest ``unsafe``."""
    links = ", ".join(pz.display_name(node.chain[int(k)]) for k in sorted(new))
    raise ValueError(
        f"The tensor at {where_s} holds no state, but assigning to it renews the state of "
        f"{links}: the tree is the trainable half from `split_state`, and the new state would "
        f"be lost (the value then computed from the old state). Assign on the whole tree and "
        f"split it again: `params, state = paramx.split_state(paramx.assign("
        f"paramx.merge_state(params, state), where, value))`."
    )


def _check_state(old: dict[str, Any], new: dict[str, Any], where_s: str) -> None:
    """A right_inverse may renew state (an orthogonal base) but not reshape it."""
    old_s = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), old)
    new_s = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), new)
    if old_s != new_s:
        raise ValueError(
            f"Assigning a value changed the structure, shapes or dtypes of the state of the "
            f"tensor at {where_s} (was {old_s}, now {new_s}). A right_inverse may renew the state "
            f"but must keep its layout; register with `unsafe=True` to allow this."
        )
