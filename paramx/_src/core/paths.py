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
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from paramx._src.core.node import is_node

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
    """``"params/Dense_0/kernel"`` for display (never used for matching).

    When a key itself contains ``/`` (haiku's ``"mlp/~/linear_1"``), the joined string would
    name another path, so the tuple of keys is shown instead: the form to pass back.
    """
    return _show_keys(path_keys(path))


def _show_keys(keys: Sequence[Any]) -> str:
    if any(isinstance(k, str) and ("/" in k or k == "") for k in keys):
        return repr(tuple(keys))
    return "/".join(str(k) for k in keys) or "<root>"


def is_box(x: Any) -> bool:
    """Whether ``x`` is a Flax metadata box (``nn.Partitioned``, any ``AxisMetadata``).

    Boxes are recognized by their protocol (``unbox`` and ``replace_boxed``), so the core
    needs no Flax import. They are transparent to selection: a rule on ``"kernel"`` selects the
    boxed value, and the box is kept around whatever replaces it.
    """
    return callable(getattr(x, "unbox", None)) and callable(getattr(x, "replace_boxed", None))


def _is_leaf(x: Any) -> bool:
    return is_node(x) or is_box(x)


def unbox(x: Any) -> tuple[Any, Any]:
    """``(box, content)`` for a box, ``(None, x)`` for anything else."""
    if is_box(x):
        return x, x.unbox()
    return None, x


def rebox(box: Any, value: Any) -> Any:
    return value if box is None else box.replace_boxed(value)


def leaves_with_paths(tree: Any) -> list[tuple[KeyPath, Any]]:
    """Leaves of ``tree`` with their key paths; a ``Parametrized`` node counts as one leaf, and
    a metadata box counts as the leaf it holds (at the box's path)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
    return [(path, unbox(leaf)[1]) for path, leaf in flat]


WHERE_FORMS = (
    "a '/'-joined path string ('params/Dense_0/kernel'), a tuple of keys "
    "(('params', 'Dense_0', 'kernel'), for keys that contain '/'), or a predicate "
    "(key_path, leaf) -> bool"
)


def check_where(where: Any) -> None:
    """Raises ``TypeError`` unless ``where`` is one of the selector forms."""
    if isinstance(where, str) or (callable(where) and not isinstance(where, type)):
        return
    if isinstance(where, (tuple, list)):
        bad = [k for k in where if not isinstance(k, (str, int)) or isinstance(k, bool)]
        if not bad:
            return
        raise TypeError(
            f"`where` is a sequence of keys, so each key must be a str (dict key or attribute) "
            f"or an int (list index); got {bad[0]!r} ({type(bad[0]).__name__}) in {where!r}."
        )
    hint = ""
    if isinstance(where, (set, frozenset)):
        hint = " A set has no order; to select several leaves, use a predicate."
    elif where is None:
        hint = (
            " None (every parametrized tensor, where a function accepts it: is_parametrized, "
            "remove_parametrizations, transfer_parametrizations_and_params) is not a selection "
            "for a function that sets values; give the path of the tensor, or a predicate."
        )
    raise TypeError(f"`where` must be {WHERE_FORMS}; got {type(where).__name__}: {where!r}.{hint}")


def _selector_keys(where: str | Sequence[Any]) -> tuple[Any, ...]:
    if isinstance(where, str):
        if where == "":
            raise ValueError(
                "An empty path selects nothing; give a path such as 'params/Dense_0/kernel'."
            )
        return tuple(where.split("/"))
    if len(where) == 0:
        raise ValueError("An empty tuple of keys selects nothing; give the keys of one leaf.")
    return tuple(where)


def _call_predicate(where: Callable[..., Any], path: KeyPath, leaf: Any) -> bool:
    out = where(path, leaf)
    if isinstance(out, (bool, np.bool_)):
        return bool(out)
    raise TypeError(
        f"The {describe_where(where)} returned {type(out).__name__} {out!r} for the leaf at "
        f"{format_path(path)}; a selector predicate must return a Python bool (True selects "
        f"the leaf)."
    )


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
    return (
        _show_keys(tuple(where))
        if any("/" in str(k) for k in where)
        else repr("/".join(str(k) for k in where))
    )


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
    check_where(where)
    leaves = leaves_with_paths(tree)
    if callable(where) and not isinstance(where, str):
        hits = [
            i
            for i, (path, leaf) in enumerate(leaves)
            if (not only_parametrized or is_node(leaf)) and _call_predicate(where, path, leaf)
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
    shown = _show_keys(wanted)
    below = [format_path(p) for p, _ in leaves if _path_matches(wanted, p[: len(wanted)])]
    if below:
        raise ValueError(
            f"Path {shown!r} is a subtree, not a {what}: it holds {len(below)} leaves "
            f"({', '.join(below[:5])}{', ...' if len(below) > 5 else ''}). Give the path of one "
            f"leaf, or a predicate to select several."
        )
    joined = "/".join(str(k) for k in wanted)
    slashed = [
        format_path(p)
        for p, _ in leaves
        if "/".join(str(k) for k in path_keys(p)) == joined and format_path(p).startswith("(")
    ]
    if slashed:
        raise ValueError(
            f"No {what} at path {joined!r}: a key of the tree contains '/', so this string "
            f"splits differently. Give the keys as a tuple: {slashed[0]}."
        )
    for path, marker in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_marker)[0]:
        if _is_marker(marker) and _path_matches(wanted, path):
            # A leaf that holds no array (a tie) says itself why it cannot be selected.
            raise ValueError(marker.refusal(shown, what))
    retyped = retyped_keys(wanted, [path_keys(p) for p, _ in leaves], what)
    if retyped:
        raise ValueError(retyped)
    # Only what the caller can take is suggested: a parametrized tensor for `assign`, say.
    existing = [format_path(p) for p, leaf in leaves if not only_parametrized or is_node(leaf)]
    if only_parametrized and not existing:
        raise ValueError(f"No {what} at path {shown!r}. Nothing in this tree is parametrized.")
    close = difflib.get_close_matches(shown, existing, n=5, cutoff=0.5)
    hint = (
        _listing("Closest existing paths", close) if close else _listing("Existing paths", existing)
    )
    raise ValueError(f"No {what} at path {shown!r}. {hint}")


def retyped_keys(wanted: Sequence[Any], existing: Sequence[Sequence[Any]], what: str) -> str | None:
    """The error for keys that read like a leaf's but differ in type (the int ``0`` where the
    tree has the string ``"0"``), else None: the closest paths would list the path as given."""
    for keys in existing:
        if len(keys) == len(wanted) and all(str(w) == str(k) for w, k in zip(wanted, keys)):
            return (
                f"No {what} at keys {tuple(wanted)!r}: the tree's keys there are "
                f"{tuple(keys)!r}, of another type (keys are compared exactly; only a string "
                f"such as '0' also names a list index or an integer key). Give the keys as the "
                f"tree has them: {tuple(keys)!r}."
            )
    return None


def select_parametrized(
    tree: Any, where: Where | None, *, doing: str
) -> list[tuple[int, str, Any]]:
    """``(leaf index, path, node)`` for each parametrized tensor ``where`` selects.

    ``where=None`` selects every parametrized tensor (possibly none): the one meaning of
    ``None`` in every function that takes it. ``doing`` completes the error raised for a
    selected leaf that is not parametrized, e.g. "there is no right_inverse to run".
    """
    leaves = leaves_with_paths(tree)
    if where is None:
        return [(i, format_path(p), x) for i, (p, x) in enumerate(leaves) if is_node(x)]
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


def _is_marker(x: Any) -> bool:
    return callable(getattr(type(x), "refusal", None))


def _listing(label: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return "The tree has no leaves."
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{label}: {', '.join(repr(s) for s in items[:limit])}{more}."


def replace_leaves(tree: Any, replacements: dict[int, Any]) -> Any:
    """A new tree with the leaves at the given indices replaced; ``tree`` is not modified.

    Indices are those of :func:`leaves_with_paths`; a replaced leaf that was boxed stays in its
    box (a value that is itself a box replaces the box).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_leaf)
    new = list(leaves)
    for i, value in replacements.items():
        new[i] = value if is_box(value) else rebox(unbox(leaves[i])[0], value)
    return jax.tree_util.tree_unflatten(treedef, new)
