"""Selecting leaves of a pytree by path, and replacing them without touching the input.

A selector (``where``) is one of:

* a string in Flax's nested layout, keys joined by ``/``: ``"params/Dense_0/kernel"``;
* a tuple of keys: ``("params", "Dense_0", "kernel")`` (use this when a key contains ``/``);
* a predicate ``where(path, leaf) -> bool`` over ``jax.tree_util`` key paths, which selects
  every leaf for which it returns True. A parametrized tensor is one leaf here: the predicate
  sees the :class:`paramx.Parametrized` node.

Matching compares keys exactly, entry by entry; nothing is matched on a joined string.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from paramx._src.node import is_node

KeyPath = tuple[Any, ...]
Where = str | Sequence[Any] | Callable[[KeyPath, Any], bool]


def path_keys(path: KeyPath) -> tuple[Any, ...]:
    """The plain keys of a ``jax.tree_util`` key path, for writing predicates.

    Args:
      path: A key path as given by ``jax.tree_util.tree_flatten_with_path`` (and as passed
        to a selector predicate).

    Returns:
      A tuple of dict keys, sequence indices and attribute names.

    Examples:
      >>> import jax
      >>> import paramx as px
      >>> tree = {"params": {"Dense_0": {"kernel": 1.0}}}
      >>> [(path, _)] = jax.tree_util.tree_flatten_with_path(tree)[0]
      >>> px.path_keys(path)
      ('params', 'Dense_0', 'kernel')
      >>> is_kernel = lambda path, leaf: px.path_keys(path)[-1] == "kernel"
    """
    return tuple(_plain_key(k) for k in path)


def _plain_key(k: Any) -> Any:
    if isinstance(k, DictKey):
        return k.key
    if isinstance(k, SequenceKey):
        return k.idx
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, FlattenedIndexKey):
        return k.key
    return k


def format_path(path: KeyPath) -> str:
    """``"params/Dense_0/kernel"`` for display (never used for matching)."""
    return "/".join(str(k) for k in path_keys(path)) or "<root>"


def leaves_with_paths(tree: Any) -> list[tuple[KeyPath, Any]]:
    """Leaves of ``tree`` with their key paths; a ``Parametrized`` node counts as one leaf."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]


def _selector_keys(where: str | Sequence[Any]) -> tuple[Any, ...]:
    if isinstance(where, str):
        if where == "":
            raise ValueError(
                "An empty path selects nothing; give a path such as 'params/Dense_0/kernel'."
            )
        return tuple(where.split("/"))
    return tuple(where)


def _key_matches(wanted: Any, actual: Any) -> bool:
    if wanted == actual:
        return True
    # "layers/0/kernel" written as a string also addresses list index 0.
    return isinstance(wanted, str) and isinstance(actual, int) and wanted == str(actual)


def _path_matches(wanted: tuple[Any, ...], path: KeyPath) -> bool:
    keys = path_keys(path)
    return len(keys) == len(wanted) and all(_key_matches(w, a) for w, a in zip(wanted, keys))


def describe_where(where: Where) -> str:
    if callable(where) and not isinstance(where, str):
        return f"predicate {getattr(where, '__name__', repr(where))}"
    if isinstance(where, str):
        return repr(where)
    return repr("/".join(str(k) for k in where))


def select(
    tree: Any,
    where: Where,
    *,
    only_parametrized: bool = False,
    what: str = "leaf",
) -> list[int]:
    """Indices into ``leaves_with_paths(tree)`` of the leaves ``where`` selects.

    Raises ``ValueError`` naming the closest existing paths when nothing is selected.
    """
    leaves = leaves_with_paths(tree)
    if callable(where) and not isinstance(where, str):
        hits = [
            i
            for i, (path, leaf) in enumerate(leaves)
            if (not only_parametrized or is_node(leaf)) and where(path, leaf)
        ]
        if not hits:
            pool = [format_path(p) for p, leaf in leaves if not only_parametrized or is_node(leaf)]
            raise ValueError(
                f"The {describe_where(where)} selected no {what}. {_listing('Candidates', pool)}"
            )
        return hits

    wanted = _selector_keys(where)
    for i, (path, _) in enumerate(leaves):
        if _path_matches(wanted, path):
            return [i]

    # Nothing matched exactly: maybe the path names a subtree, maybe it is misspelled.
    shown = "/".join(str(k) for k in wanted)
    below = [format_path(p) for p, _ in leaves if _path_matches(wanted, p[: len(wanted)])]
    if below:
        raise ValueError(
            f"Path {shown!r} is a subtree, not a {what}: it holds {len(below)} leaves "
            f"({', '.join(below[:5])}{', ...' if len(below) > 5 else ''}). Give the path of one "
            f"leaf, or a predicate to select several."
        )
    existing = [format_path(p) for p, _ in leaves]
    close = difflib.get_close_matches(shown, existing, n=5, cutoff=0.5)
    hint = (
        _listing("Closest existing paths", close) if close else _listing("Existing paths", existing)
    )
    raise ValueError(f"No {what} at path {shown!r}. {hint}")


def select_parametrized(tree: Any, where: Where, *, doing: str) -> list[tuple[int, str, Any]]:
    """``(leaf index, path, node)`` for each parametrized tensor ``where`` selects.

    ``doing`` completes the error raised for a selected leaf that is not parametrized, e.g.
    "there is no right_inverse to run".
    """
    leaves = leaves_with_paths(tree)
    out = []
    for i in select(tree, where, only_parametrized=True, what="parametrized tensor"):
        path, node = leaves[i]
        shown = format_path(path)
        if not is_node(node):
            parametrized = [format_path(p) for p, leaf in leaves if is_node(leaf)]
            raise ValueError(
                f"The tensor at {shown} does not have a parametrization; {doing}. "
                f"{_listing('Parametrized tensors', parametrized) if parametrized else ''}".rstrip()
            )
        out.append((i, shown, node))
    return out


def _listing(label: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return "The tree has no leaves."
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{label}: {', '.join(repr(s) for s in items[:limit])}{more}."


def replace_leaves(tree: Any, replacements: dict[int, Any]) -> Any:
    """A new tree with the leaves at the given indices replaced; ``tree`` is not modified."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_node)
    new = list(leaves)
    for i, value in replacements.items():
        new[i] = value
    return jax.tree_util.tree_unflatten(treedef, new)
