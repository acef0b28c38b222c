"""Keeping state apart from the trainable tree: `split_state` and `merge_state`.

The state half mirrors the tree's containers: each parametrized leaf holds a dict of its
links' states keyed by link position (``{'0': {'u': ..., 'v': ...}}``), every other leaf is
``None``. It is a plain pytree of dicts, so it serializes like a Flax collection.
"""

from __future__ import annotations

from typing import Any

import jax

from paramx._src.node import is_node


def split_state(tree: Any) -> tuple[Any, Any]:
    """Splits a registered tree into its trainable half and its state half.

    Give the trainable half to the optimizer: it holds the originals and the
    parametrizations' own learnable arrays, never state, so no update (weight decay
    included) can reach state. Thread the state half through
    :func:`paramx.materialize` yourself.

    Args:
      tree: A registered tree.

    Returns:
      ``(params, state)``: the tree with every node's state emptied, and the state half.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> running_max = px.Parametrization(
      ...     forward=lambda x, *, params, state: x / state,
      ...     right_inverse=lambda y, *, params, state: (y * state, state),
      ...     init=lambda value, key: (None, jnp.max(jnp.abs(value))),
      ...     update_state=lambda x, *, params, state: jnp.maximum(state, jnp.max(jnp.abs(x))),
      ...     name="running_max")
      >>> tree = px.register_parametrization({"w": jnp.array([1.0, -4.0])}, "w", running_max)
      >>> params, state = px.split_state(tree)
      >>> state
      {'w': {'0': Array(4., dtype=float32)}}
      >>> params["w"].state
      {}
    """

    def strip(x: Any) -> Any:
        return x.replace(state={}) if is_node(x) else x

    def keep(x: Any) -> Any:
        return dict(x.state) if is_node(x) else None

    return (
        jax.tree_util.tree_map(strip, tree, is_leaf=is_node),
        jax.tree_util.tree_map(keep, tree, is_leaf=is_node),
    )


def merge_state(params: Any, state: Any) -> Any:
    """Puts a state half back into the trainable half; the inverse of :func:`split_state`.

    Args:
      params: The trainable half (or any registered tree).
      state: A state half, as returned by :func:`split_state` or :func:`paramx.materialize`.

    Returns:
      A registered tree whose nodes hold ``state``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization({"w": jnp.ones(2)}, "w", jnp.tanh)
      >>> params, state = px.split_state(tree)
      >>> px.merge_state(params, state)["w"].chain_names()
      ['tanh']
    """

    def put(x: Any, s: Any) -> Any:
        if not is_node(x):
            return x
        return x.replace(state=dict(s) if s else {})

    try:
        return jax.tree_util.tree_map(put, params, state, is_leaf=is_node)
    except ValueError as e:
        raise ValueError(
            "The state does not match the tree: give the state half that `split_state` or "
            f"`materialize` returned for a tree with these paths. ({e})"
        ) from None
