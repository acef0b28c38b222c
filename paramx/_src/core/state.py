"""Keeping state apart from the trainable tree: `split_state` and `merge_state`.

The state half has one layout everywhere (``split_state``, ``materialize(update_state=True)``,
``paramx.linen``'s ``'paramx_state'`` collection): a sparse nested dict, as a Flax collection
such as ``'batch_stats'`` is. It holds an entry only at the paths of parametrized tensors that
have state, and the entry is a dict of the links' states keyed by link position
(``{'Dense_0': {'kernel': {'0': {'u': ..., 'v': ...}}}}``). ``merge_state`` also accepts,
at the edge, the mirror layout of earlier versions (``None`` at every other leaf).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.tree_util import GetAttrKey

from paramx._src.core import paths
from paramx._src.core.node import is_node


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

    entries = [(p, x.state) for p, x in paths.leaves_with_paths(tree) if is_node(x)]
    return jax.tree_util.tree_map(strip, tree, is_leaf=is_node), sparse_state(entries)


def sparse_state(entries: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The state half from ``(key path, state dict)`` pairs: a nested dict keyed by each
    path's plain keys, with no entry for an empty state."""
    out: dict[str, Any] = {}
    for path, state in entries:
        if not state:
            continue
        keys = paths.path_keys(path)
        if not keys:
            raise ValueError(
                "The tree is itself a parametrized tensor (no path to file its state under). "
                "Put it in a dict ({'w': node}), or use paramx.tensor.materialize on the node."
            )
        level = out
        for k in keys[:-1]:
            level = level.setdefault(k, {})
        level[keys[-1]] = dict(state)
    return out


def merge_state(params: Any, state: Any) -> Any:
    """Puts a state half back into the trainable half; the inverse of :func:`split_state`.

    Each node takes the state found at its own path in ``state``, in the one layout of
    :func:`split_state`, :func:`paramx.materialize` and ``paramx.linen``'s
    ``'paramx_state'`` collection (a sparse nested dict). The mirror layout of earlier
    versions (``None`` at every plain leaf) is accepted too, for old checkpoints.

    Args:
      params: The trainable half (or any registered tree).
      state: A state half.

    Returns:
      A registered tree whose nodes hold ``state``.

    Raises:
      ValueError: If ``state`` has entries at paths where ``params`` has no parametrized
        tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization({"w": jnp.ones(2)}, "w", jnp.tanh)
      >>> params, state = px.split_state(tree)
      >>> px.merge_state(params, state)["w"].chain_names()
      ['tanh']
    """
    if state is None:
        return params
    _check_layout(params, state, ())

    def put(path: Any, x: Any) -> Any:
        box, node = paths.unbox(x)
        if not is_node(node):
            return x
        found = _lookup(state, path)
        if found is None and box is not None:  # a mirror of the box: state at `<path>/value`
            found = _lookup(state, (*path, GetAttrKey("value")))
        if paths.is_box(found):
            found = found.unbox()
        if found is not None and not isinstance(found, Mapping):
            raise ValueError(
                f"The state does not match the tree: at {paths.format_path(path)} it holds a "
                f"{type(found).__name__}, where the parametrized tensor's state is a dict keyed "
                f"by link position ({{'0': ...}}). Give the state half that `split_state` or "
                f"`materialize` returned for this tree."
            )
        return paths.rebox(box, node.replace(state=thaw(found) if found else {}))

    return jax.tree_util.tree_map_with_path(put, params, is_leaf=_node_or_box)


def _node_or_box(x: Any) -> bool:
    return is_node(x) or paths.is_box(x)


def thaw(x: Any) -> Any:
    """Plain dicts in place of frozen mappings (``FrozenDict`` freezes the dicts put in it, so a
    state half built inside a ``FrozenDict`` tree comes back frozen); a node's state is kept in
    plain dicts, so its structure is the same whichever container held it."""
    if isinstance(x, Mapping) and (type(x) is dict or callable(getattr(x, "unfreeze", None))):
        return {k: thaw(v) for k, v in x.items()}
    return x


_MISSING = object()


def _children(tree: Any) -> dict[Any, Any] | None:
    """A container's children by plain key (dict keys, indices, attribute names: the keys of
    the state half), or None for a leaf. Any pytree node counts: NamedTuples,
    ``flax.struct`` dataclasses, registered classes."""
    if isinstance(tree, Mapping):
        return dict(tree)
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return dict(enumerate(tree))
    if tree is None or hasattr(tree, "shape") or is_node(tree):
        return None
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    if len(flat) == 1 and not flat[0][0]:  # a leaf: its own only "child", at the empty path
        return None
    return {paths.path_keys(path[:1])[0]: child for path, child in flat}


def _child(tree: Any, key: Any) -> Any:
    """The child of ``tree`` at ``key``; an index also matches its string spelling and back
    (``1`` and ``"1"``), since a state half saved with ``flax.serialization`` or orbax comes
    back with string keys where the tree has list indices or integer dict keys."""
    found = _exact_child(tree, key)
    other = _other_spelling(key)
    if found is _MISSING and other is not None:
        found = _exact_child(tree, other)
    return found


def _other_spelling(key: Any) -> Any:
    """``"1"`` for ``1`` and ``1`` for ``"1"`` (as ``paths`` matches ``"layers/0"``); else None."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return str(key)
    if isinstance(key, str) and key.isdecimal() and str(int(key)) == key:
        return int(key)
    return None


def _exact_child(tree: Any, key: Any) -> Any:
    if isinstance(tree, Mapping):
        return tree.get(key, _MISSING)
    if isinstance(tree, list | tuple) and isinstance(key, int) and not hasattr(tree, "_fields"):
        return tree[key] if -len(tree) <= key < len(tree) else _MISSING
    children = _children(tree)
    return _MISSING if children is None else children.get(key, _MISSING)


def _lookup(state: Any, path: Any) -> Any:
    for k in path:
        if isinstance(k, GetAttrKey) and not isinstance(state, Mapping):
            state = getattr(state, k.name, None)
        else:
            found = _child(state, paths.path_keys((k,))[0])
            state = None if found is _MISSING else found
        if state is None:
            return None
    return state


def _check_layout(params: Any, state: Any, at: tuple[Any, ...]) -> None:
    if state is None or is_node(params):
        return
    if paths.is_box(params):  # a Flax metadata box: look inside it (the state may be boxed too)
        inner = state.unbox() if paths.is_box(state) else state
        if isinstance(inner, Mapping) and set(inner) == {"value"}:
            inner = inner["value"]
        return _check_layout(params.unbox(), inner, at)
    if isinstance(state, Mapping):
        items = list(state.items())
    elif isinstance(state, list | tuple):
        items = list(enumerate(state))
    elif hasattr(state, "shape"):
        items = None
    else:
        return  # another container type: matched by path in `merge_state`
    if items is None or _children(params) is None:
        where = "/".join(map(str, at)) or "<root>"
        raise ValueError(
            f"The state does not match the tree: it has an entry at {where}, where the tree has "
            f"no parametrized tensor. Give the state half that `split_state` or `materialize` "
            f"returned for this tree (or, with paramx.linen, its 'paramx_state' collection)."
        )
    for k, sub in items:
        child = _child(params, k)
        if child is _MISSING:
            if sub is None:
                continue
            where = "/".join(map(str, (*at, k)))
            near = sorted(map(str, _children(params) or ()))[:8]
            raise ValueError(
                f"The state does not match the tree: it has an entry at {where}, which the tree "
                f"does not have (the tree has {near} there). Give the state half that "
                f"`split_state` or `materialize` returned for this tree."
            )
        _check_layout(child, sub, (*at, k))
