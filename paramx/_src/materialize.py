"""Materialization: the registered tree becomes the plain tree that `model.apply` reads."""

from __future__ import annotations

from typing import Any

import jax

from paramx._src import chain as ch
from paramx._src.node import is_node
from paramx._src.state import merge_state


def materialize(tree: Any, state: Any = None, *, update_state: bool = False) -> Any:
    """Computes every parametrized tensor; returns the plain tree ``model.apply`` expects.

    Pure and jit-able. The result has exactly the structure the tree had before
    registration. Gradients flow to the originals and to the parametrizations' own
    learnable arrays, never to state. Call it once per step, inside the jitted function and
    outside the model: every parametrized tensor is then computed once per step, however
    often the model reads it (this is what replaces torch's ``with cached():``).

    Args:
      tree: A registered tree (or its trainable half from :func:`paramx.split_state`).
      state: The state half, when the tree was split. ``None`` uses the state held in the
        tree's nodes.
      update_state: Run each stateful link's ``update_state`` before its ``forward`` (torch's
        training mode, e.g. a power-iteration step) and return the new state.

    Returns:
      The plain tree; with ``update_state=True``, the pair ``(plain_tree, new_state)``, where
      ``new_state`` is a state half as :func:`paramx.split_state` returns it.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"params": {"w": jnp.array([0.5, -0.5])}}, "params/w",
      ...     px.Parametrization(forward=jnp.tanh, right_inverse=jnp.arctanh))
      >>> jax.jit(px.materialize)(tree)
      {'params': {'w': Array([ 0.5, -0.5], dtype=float32)}}
    """
    if state is not None:
        tree = merge_state(tree, state)
    if not update_state:
        return jax.tree_util.tree_map(
            lambda x: ch.node_value(x)[0] if is_node(x) else x, tree, is_leaf=is_node
        )
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_node)
    values, states = [], []
    for leaf in leaves:
        value, new = ch.node_value(leaf, update_state=True) if is_node(leaf) else (leaf, None)
        values.append(value)
        states.append(new)
    plain = jax.tree_util.tree_unflatten(treedef, values)
    new_state = jax.tree_util.tree_unflatten(treedef, states)
    return plain, new_state


_materialize_jit = jax.jit(materialize)


def cached(tree: Any, state: Any = None) -> Any:
    """Computes every parametrized tensor once, compiled, for reuse across many calls.

    torch's ``with cached():`` block becomes a value: compute the plain tree once and pass it
    to as many ``model.apply`` calls as you like (an evaluation loop over batches, say). No
    global cache exists: the result is an ordinary tree you hold, and it does not change
    when you later train the originals, so compute it again after updates. Inside one
    jitted step you do not need it: calling :func:`materialize` once in the step already
    computes each tensor once. State is not updated (torch's eval mode).

    Args:
      tree: A registered tree (or its trainable half).
      state: The state half, when the tree was split.

    Returns:
      The plain tree, computed by a jit-compiled :func:`materialize` (compiled once per tree
      structure).

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization({"w": jnp.eye(2)}, "w", jnp.tanh, unsafe=True)
      >>> weights = px.cached(tree)              # once
      >>> outputs = [x @ weights["w"] for x in jnp.ones((3, 2))]  # many reads, no recompute
    """
    return _materialize_jit(tree, state)
