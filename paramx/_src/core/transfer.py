"""`transfer_parametrizations_and_params`: copy registrations from one tree to another."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import jax.numpy as jnp

from paramx._src.core import chain as ch
from paramx._src.core import checks, paths, tie
from paramx._src.core.node import is_node


def transfer_parametrizations_and_params(
    from_tree: Any, to_tree: Any, where: paths.Where | None = None
) -> Any:
    """Copies parametrizations, originals and state from one tree to another.

    The torch function of the same name re-registers the same parametrization objects on
    the target module and shares the originals. Here the parametrized tensors of
    ``from_tree`` (all of them, or those ``where`` selects) are placed at the same paths of
    ``to_tree``; arrays are immutable, so sharing them is safe. A target tensor that exists,
    plain or parametrized, must have the parametrized tensor's shape and dtype; one that does
    not exist is created (as torch creates it on the target module), with any missing dict
    levels on its way. Tied leaves (:func:`paramx.tie`) go along too (all of them with
    ``where=None``, or the one a path names), onto leaves of the same shape and dtype. Neither
    tree is modified.

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
    to_tree = tie.transfer_ties(from_tree, to_tree, where)  # ties (paramx.tie) go along
    if tie.tied_at(from_tree, where) is not None:
        return to_tree
    src_leaves = paths.leaves_with_paths(from_tree)
    if not any(is_node(leaf) for _, leaf in src_leaves):
        return to_tree
    if where is None:
        chosen = [i for i, (_, leaf) in enumerate(src_leaves) if is_node(leaf)]
    else:
        chosen = paths.select(from_tree, where, only_parametrized=True, what="parametrized tensor")
    dst_leaves = paths.leaves_with_paths(to_tree)
    dst_index = {paths.path_keys(p): j for j, (p, _) in enumerate(dst_leaves)}
    replacements, created = {}, []
    for i in chosen:
        path, node = src_leaves[i]
        where_s = paths.format_path(path)
        if not is_node(node):
            raise ValueError(f"The tensor at {where_s} of `from_tree` is not parametrized.")
        keys = paths.path_keys(path)
        want = ch.value_shape(node, where_s)
        j = dst_index.get(keys)
        if j is None:
            created.append((keys, node, where_s))
            continue
        target = dst_leaves[j][1]
        if is_node(target):
            got = ch.value_shape(target, where_s)
        else:
            got = target
        if not checks.is_array(got) or (
            tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype)
        ):
            shown = checks.describe(got) if checks.is_array(got) else f"a {checks.type_name(got)}"
            kind = "parametrized tensor" if is_node(target) else "tensor"
            raise ValueError(
                f"Cannot transfer the parametrization at {where_s}: the target's {kind} is "
                f"{shown}, the source's parametrized tensor is {checks.describe(want)}. Transfer "
                f"between trees of the same model (or matching layers)."
            )
        replacements[j] = node
    out = paths.replace_leaves(to_tree, replacements)
    for keys, node, where_s in created:
        out = _insert(out, keys, node, where_s)
    return out


def _insert(tree: Any, keys: tuple[Any, ...], value: Any, where_s: str) -> Any:
    """A copy of ``tree`` with ``value`` at ``keys``, creating missing dict levels (torch's
    transfer creates the tensor on a module that lacks it)."""
    if not keys:
        raise ValueError(f"Cannot create the tensor at {where_s}: the target is a leaf there.")
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"Cannot create the tensor at {where_s} in the target: on its way the target holds "
            f"a {type(tree).__name__}, and only dicts can gain a new entry. Add the tensor to "
            f"the target first (any array of its shape), then transfer."
        )
    head, rest = keys[0], keys[1:]
    items = dict(tree.items())
    items[head] = value if not rest else _insert(items.get(head), rest, value, where_s)
    # the same container type back (FrozenDict stays a FrozenDict)
    return items if type(tree) is dict else cast(Any, type(tree))(items)
