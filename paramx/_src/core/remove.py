"""`remove_parametrizations`: back to a plain leaf."""

from __future__ import annotations

from typing import Any

from paramx._src.core import chain as ch
from paramx._src.core import checks, paths, tie
from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized, is_node
from paramx._src.core.state import merge_state


def remove_parametrizations(
    tree: Any,
    where: paths.Where | None = None,
    leave_parametrized: bool = True,
    *,
    state: Any = None,
) -> Any:
    """Removes the parametrizations of one or more tensors; returns a new tree.

    With ``leave_parametrized=True`` the leaf becomes the current parametrized value (computed
    without a state update: torch's eval mode, so no extra power-iteration step). With
    ``False`` it becomes the raw original, which needs a single original. The leaf's state
    and the parametrizations' own arrays are dropped. Unlike torch, a chain that changed the
    dtype (``unsafe=True``) can be removed with ``leave_parametrized=True``: the leaf simply
    takes the parametrized value's dtype.

    Args:
      tree: A registered tree.
      where: A path, a tuple of keys, or a predicate; a predicate sees parametrized tensors
        only. ``None`` (the default) removes every parametrization of the tree, the meaning
        ``None`` has wherever ``where`` accepts it.
      leave_parametrized: Keep the parametrized value (True) or the original (False).
        A leaf tied to a tensor (:func:`paramx.tie`) stays tied and reads the new leaf.
      state: The state half, when ``tree`` is the trainable half from
        :func:`paramx.split_state` (stateful parametrizations need it to compute the value).

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not parametrized, or if ``leave_parametrized=False``
        for a tensor parametrized in terms of several originals.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"w": jnp.array([1.0, 2.0])}, "w",
      ...     px.Parametrization(forward=jnp.exp, right_inverse=jnp.log))
      >>> px.remove_parametrizations(tree, "w")["w"]
      Array([1., 2.], dtype=float32)
      >>> px.remove_parametrizations(tree, "w", leave_parametrized=False)["w"]
      Array([0.       , 0.6931472], dtype=float32)
    """
    _check_flag(leave_parametrized)
    if state is not None:
        tree = merge_state(tree, state)
    tie.refuse_tied(tree, where, "nothing to remove")  # ties stay: `paramx.untie` breaks them
    replacements = {}
    for i, where_s, node in paths.select_parametrized(tree, where, doing="nothing to remove"):
        replacements[i] = _remove_node(node, leave_parametrized, where_s)
    return paths.replace_leaves(tree, replacements)


def remove_tensor(
    node: Parametrized, leave_parametrized: bool = True, *, label: str = "<tensor>"
) -> Any:
    """Removes the parametrizations of one tensor; returns the plain array.

    The per-tensor form of :func:`paramx.remove_parametrizations`: the current value
    (``leave_parametrized=True``, computed without a state update) or the raw original.

    Args:
      node: A :class:`paramx.Parametrized` node (holding its state).
      leave_parametrized: Keep the parametrized value (True) or the original (False).
      label: How errors name the tensor.

    Returns:
      The array.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> positive = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log)
      >>> node = px.tensor.register(jnp.array([1.0, 2.0]), positive)
      >>> px.tensor.remove(node, leave_parametrized=False)
      Array([0.       , 0.6931472], dtype=float32)
    """
    _check_flag(leave_parametrized)
    if not is_node(node):
        raise ValueError(
            f"{label} is not parametrized (it is a {checks.type_name(node)}): nothing to remove."
        )
    return _remove_node(node, leave_parametrized, label)


def _check_flag(leave_parametrized: Any) -> None:
    if not isinstance(leave_parametrized, bool):
        raise TypeError(
            f"`leave_parametrized` must be a bool; got {type(leave_parametrized).__name__}."
        )


def _remove_node(node: Parametrized, leave_parametrized: bool, where_s: str) -> Any:
    if leave_parametrized:
        try:
            return ch.node_value(node, where=where_s)[0]
        except ValueError as e:
            if node.state or not any(pz.init_fn(p) for p in node.chain):
                raise
            raise ValueError(
                f"Cannot compute the parametrized value at {where_s} to leave in place: this "
                f"tree holds no state for it (the trainable half from `split_state`?). Pass "
                f"the state half: `paramx.remove_parametrizations(params, where, "
                f"state=state)`, or use `leave_parametrized=False` to keep the raw original. "
                f"({e})"
            ) from e
    elif node.multi:
        raise ValueError(
            f"Cannot leave unparametrized (`leave_parametrized=False`) a tensor that is "
            f"parametrized in terms of a sequence of tensors (at {where_s}: "
            f"{len(node.originals)} originals). Use `leave_parametrized=True`."
        )
    else:
        return node.originals[0]
