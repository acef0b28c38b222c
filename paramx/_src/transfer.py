"""`transfer_parametrizations_and_params`: copy registrations from one tree to another."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from paramx._src import chain as ch
from paramx._src import paths
from paramx._src.node import is_node


def transfer_parametrizations_and_params(
    from_tree: Any, to_tree: Any, where: paths.Where | None = None
) -> Any:
    """Copies parametrizations, originals and state from one tree to another.

    The torch function of the same name re-registers the same parametrization objects on
    the target module and shares the originals. Here the parametrized tensors of
    ``from_tree`` (all of them, or those ``where`` selects) are placed at the same paths of
    ``to_tree``; arrays are immutable, so sharing them is safe. A target leaf that exists
    must have the tensor's shape and dtype. Neither tree is modified.

    Args:
      from_tree: The registered tree to copy from.
      to_tree: The tree to copy into, with the same paths (e.g. a fresh ``model.init``).
      where: Which parametrized tensors to copy; ``None`` copies all of them.

    Returns:
      The new ``to_tree``. If ``from_tree`` has no parametrization, ``to_tree`` unchanged.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> src = px.register_parametrization({"w": jnp.ones(2), "b": jnp.ones(2)}, "w", jnp.tanh)
      >>> dst = px.transfer_parametrizations_and_params(src, {"w": jnp.zeros(2), "b": jnp.zeros(2)})
      >>> px.is_parametrized(dst, "w"), px.is_parametrized(dst, "b")
      (True, False)
    """
    src_leaves = paths.leaves_with_paths(from_tree)
    if not any(is_node(leaf) for _, leaf in src_leaves):
        return to_tree
    if where is None:
        chosen = [i for i, (_, leaf) in enumerate(src_leaves) if is_node(leaf)]
    else:
        chosen = paths.select(from_tree, where, only_parametrized=True, what="parametrized tensor")
    dst_leaves = paths.leaves_with_paths(to_tree)
    replacements = {}
    for i in chosen:
        path, node = src_leaves[i]
        where_s = paths.format_path(path)
        if not is_node(node):
            raise ValueError(f"The tensor at {where_s} of `from_tree` is not parametrized.")
        [j] = paths.select(to_tree, paths.path_keys(path))
        target = dst_leaves[j][1]
        value = ch.node_value(node)[0]
        if not is_node(target):
            if not ch.is_array(target) or (
                tuple(target.shape) != tuple(value.shape)
                or jnp.dtype(target.dtype) != jnp.dtype(value.dtype)
            ):
                got = ch.describe(target) if ch.is_array(target) else ch.type_name(target)
                raise ValueError(
                    f"Cannot transfer the parametrization at {where_s}: the target holds {got}, "
                    f"the parametrized tensor is {ch.describe(value)}."
                )
        replacements[j] = node
    return paths.replace_leaves(to_tree, replacements)
