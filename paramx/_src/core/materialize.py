"""Materialization: the registered tree becomes the plain tree that `model.apply` reads.

Sharding (keeping each value on its original's devices) lives in ``sharding.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.core import batching, checks, paths, sharding, tie
from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized, is_node
from paramx._src.core.state import merge_state, sparse_state


def materialize(
    tree: Any,
    state: Any = None,
    *,
    update_state: bool = False,
    shardings: Any = None,
    batch: bool | str = "auto",
) -> Any:
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
      shardings: Optional shardings to keep (see the module notes; needed only with auto
        sharding under ``jit``). A tree with ``tree``'s structure down to its parametrized
        tensors: at a plain leaf a ``jax.sharding.Sharding`` (or ``None``: no constraint); at a
        parametrized tensor either one sharding for its value, or a ``Parametrized`` node of
        shardings, as ``jax.tree.map(lambda x: x.sharding, tree)`` gives. From a node, the
        value gets the sharding of its original of the same shape (none if no original has
        that shape), and the originals and the links' ``params`` are constrained to theirs, so
        their gradients come back with those shardings. Nodes that hold state shardings (take
        the shardings of the merged tree) also keep them for the new state.
      batch: ``True``: parametrized tensors with equal chains and equal shapes and dtypes
        (the layers of a deep model) are stacked and computed in one vmapped call, traced
        once per group instead of once per tensor; values, state and gradients are those of
        the per-tensor computation (to rounding). Tensors with a sharding (``shardings=``, or
        sharded arrays) and links that cannot be vmapped are computed one by one. ``False``:
        every tensor separately. ``"auto"`` (default): batched on GPU and TPU, separately on
        CPU, where batching was measured to cost step time except for many small tensors.

    Returns:
      The plain tree; with ``update_state=True``, the pair ``(plain_tree, new_state)``, where
      ``new_state`` is a state half in :func:`paramx.split_state`'s layout.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"params": {"w": jnp.array([0.5, -0.5])}}, "params/w",
      ...     px.Parametrization(forward=jnp.tanh, right_inverse=jnp.arctanh))
      >>> jax.jit(px.materialize)(tree)
      {'params': {'w': Array([ 0.5, -0.5], dtype=float32)}}
      >>> shardings = jax.tree.map(lambda x: x.sharding, tree)  # outside jit
      >>> plain = jax.jit(lambda t: px.materialize(t, shardings=shardings))(tree)
      >>> plain["params"]["w"].sharding == tree["params"]["w"].original.sharding
      True
    """
    batch = batching.check_mode(batch)
    targets = None if shardings is None else sharding.targets(tree, shardings)
    if state is not None:
        tree = merge_state(tree, state)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    if targets is None:
        targets = [None] * len(with_paths)
    grouped = batching.batched_values(with_paths, targets, update_state, batch)
    values: list[Any] = []
    states: list[Any] = []
    for k, ((path, leaf), target) in enumerate(zip(with_paths, targets)):
        new: Any
        if k in grouped:
            value, new = grouped[k]
        elif is_node(leaf):
            where = paths.format_path(path)
            try:
                value, new = sharding.node_value(leaf, target, update_state, where)
            except (ValueError, TypeError) as e:
                if state is None:
                    raise
                _explain_state(leaf, where, e)
                raise
        else:
            value, new = sharding.constrain(leaf, target), None
        values.append(value)
        if new is not None:
            states.append(new)
    plain = jax.tree_util.tree_unflatten(treedef, values)
    plain = tie.fill(plain)  # tied leaves read the values computed above (paramx.tie)
    if not update_state:
        return plain
    # Filed at each node's path as `leaves_with_paths` gives it (a metadata box's path, not
    # the path inside the box), in the same order as the nodes above.
    node_paths = [p for p, x in paths.leaves_with_paths(tree) if is_node(x)]
    return plain, sparse_state(list(zip(node_paths, states)))


def _explain_state(node: Parametrized, where: str, error: Exception) -> None:
    """Raises a clearer error when the state given for ``node`` does not have the layout its
    chain creates (checked only after a failure, so the usual path pays nothing)."""
    if node.multi or node.batch_shape:
        return
    x = node.originals[0]
    value = jax.ShapeDtypeStruct(x.shape, x.dtype)
    expected: dict[str, Any] = {}
    for i, p in enumerate(node.chain):
        init = pz.init_fn(p)
        if init is None:
            continue
        try:
            _, s = jax.eval_shape(init, value, jax.random.key(0))
        except Exception:  # the explanation is best effort; the original error stands
            return
        if s is not None:
            expected[str(i)] = s

    def layout(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda a: f"{jnp.dtype(a.dtype).name}{list(a.shape)}", tree)

    want, got = layout(expected), layout(node.state)
    if want != got:
        raise ValueError(
            f"The state given for the parametrized tensor at {where} does not fit it: expected "
            f"{want}, got {got}. Give the state half that `split_state` or `materialize` "
            f"returned for this tree (a state from another model or another registration does "
            f"not fit). ({type(error).__name__}: {error})"
        ) from error


_materialize_jit = jax.jit(materialize)


def precompute(tree: Any, state: Any = None) -> Any:
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
      structure). When the tree's arrays span several devices, each value keeps the sharding
      of its original (``materialize``'s ``shardings=`` with the tree's own shardings).

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization({"w": jnp.eye(2)}, "w", jnp.tanh, unsafe=True)
      >>> weights = px.precompute(tree)          # once
      >>> outputs = [x @ weights["w"] for x in jnp.ones((3, 2))]  # many reads, no recompute
    """
    leaves = jax.tree_util.tree_leaves(tree)
    concrete = [isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves]
    if not any(c and len(x.sharding.device_set) > 1 for c, x in zip(concrete, leaves)):
        return _materialize_jit(tree, state)
    flat = tuple(x.sharding if c else None for c, x in zip(concrete, leaves))
    return _materialize_sharded_jit(tree, state, flat)


def _materialize_sharded(tree: Any, state: Any, flat_shardings: tuple[Any, ...]) -> Any:
    treedef: Any = jax.tree_util.tree_structure(tree)
    shardings = treedef.unflatten(flat_shardings)
    return materialize(tree, state, shardings=shardings)


_materialize_sharded_jit = jax.jit(_materialize_sharded, static_argnums=2)


def materialize_tensor(
    node: Parametrized, *, update_state: bool = False, label: str = "<tensor>"
) -> Any:
    """Computes one parametrized tensor; the per-tensor form of :func:`paramx.materialize`.

    Args:
      node: A :class:`paramx.Parametrized` node holding its state.
      update_state: Run ``update_state`` first (training mode) and return the new state.
      label: How errors name the tensor.

    Returns:
      The value; with ``update_state=True``, ``(value, new_state)`` where ``new_state`` is
      the node's state dict (``node.replace(state=new_state)`` keeps it).

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> node = px.tensor.register(jnp.array([[3.0, 0.0], [0.0, 1.0]]), px.SpectralNorm())
      >>> value, state = px.tensor.materialize(node, update_state=True)
      >>> value
      Array([[1.        , 0.        ],
             [0.        , 0.33333334]], dtype=float32)
      >>> sorted(state["0"])
      ['u', 'v']
    """
    if not is_node(node):
        raise ValueError(
            f"{label} is not parametrized (it is a {checks.type_name(node)}); only a "
            f"paramx.Parametrized node has a value to compute."
        )
    value, new = sharding.node_value(node, None, update_state, label)
    return (value, new) if update_state else value


cached = precompute
"""The earlier name of :func:`precompute` (kept as an alias). ``paramx.nnx.cached`` is torch's
context manager for NNX modules; the functional API's cache is the value ``precompute``
returns."""
