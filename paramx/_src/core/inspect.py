"""Looking at a registered tree: `is_parametrized`, `originals`, `summary`."""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp

from paramx._src.core import paths, tie
from paramx._src.core.node import Parametrized, is_node


def is_parametrized(tree: Any, where: paths.Where | None = None) -> bool:
    """Whether the tree (or the selected tensor) has a parametrization.

    Args:
      tree: Any pytree.
      where: ``None`` asks whether any tensor in the tree is parametrized. A path or a tuple of
        keys asks about that tensor (a missing path is an error, listing the closest ones). A
        predicate asks whether any tensor it selects is parametrized.

    Returns:
      A bool.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = {"a": jnp.ones(2), "b": jnp.ones(2)}
      >>> px.is_parametrized(tree)
      False
      >>> tree = px.register_parametrization(tree, "a", jnp.tanh)
      >>> px.is_parametrized(tree), px.is_parametrized(tree, "a"), px.is_parametrized(tree, "b")
      (True, True, False)
    """
    leaves = paths.leaves_with_paths(tree)
    if where is None:
        return any(is_node(leaf) for _, leaf in leaves)
    if callable(where) and not isinstance(where, str):
        return any(is_node(leaf) and where(path, leaf) for path, leaf in leaves)
    if tie.tied_at(tree, where) is not None:
        return False  # a tied leaf (paramx.tie) holds no parametrization of its own
    [i] = paths.select(tree, where)
    return is_node(leaves[i][1])


def get_parametrized(tree: Any, where: paths.Where) -> Parametrized:
    """The :class:`paramx.Parametrized` node of one tensor.

    Args:
      tree: A registered tree.
      where: The path of one parametrized tensor, or a tuple of keys.

    Returns:
      The node: its ``originals``, ``chain``, ``params`` and ``state``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization({"w": jnp.ones(2)}, "w", jnp.tanh)
      >>> px.get_parametrized(tree, "w").chain_names()
      ['tanh']
    """
    if callable(where) and not isinstance(where, str):
        raise ValueError("get_parametrized reads one tensor: give a path or a tuple of keys.")
    leaves = paths.leaves_with_paths(tree)
    [i] = paths.select(tree, where)
    path, leaf = leaves[i]
    if not is_node(leaf):
        raise ValueError(
            f"The tensor at {paths.format_path(path)} is not parametrized. "
            f"{_parametrized_listing(leaves)}"
        )
    return cast(Parametrized, leaf)


def originals(tree: Any, where: paths.Where) -> tuple[jax.Array, ...]:
    """The raw originals of one parametrized tensor (torch's ``original`` / ``original0``...).

    Args:
      tree: A registered tree.
      where: The path of one parametrized tensor, or a tuple of keys.

    Returns:
      A tuple with one array, or several when the first parametrization's ``right_inverse``
      returned a sequence.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"w": jnp.array([1.0, 2.0])}, "w",
      ...     px.Parametrization(forward=jnp.square, right_inverse=jnp.sqrt))
      >>> px.originals(tree, "w")
      (Array([1.       , 1.4142135], dtype=float32),)
    """
    return get_parametrized(tree, where).originals


def summary(tree: Any) -> str:
    """A readable table of what is parametrized: path, chain, originals, params and state.

    Tied leaves (:func:`paramx.tie`) are listed too, after the parametrized tensors, with the
    leaf they read and the transform (``tied to encoder/kernel (transpose)``).

    Args:
      tree: A registered tree.

    Returns:
      A multi-line string.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
      ...     "Dense_0/kernel", jnp.tanh)
      >>> print(px.summary(tree))
      path            chain  originals           params  state
      Dense_0/kernel  tanh   original=float32[2, 3]  -       -
    """
    rows = [("path", "chain", "originals", "params", "state")]
    for path, leaf in paths.leaves_with_paths(tree):
        if not is_node(leaf):
            continue
        names = leaf.original_names
        rows.append(
            (
                paths.format_path(path),
                " -> ".join(leaf.chain_names()),
                ", ".join(f"{n}={_describe(x)}" for n, x in zip(names, leaf.originals)),
                _describe_tree(leaf.params),
                _describe_tree(leaf.state),
            )
        )
    rows += [(p, f"tied to {source}", "-", "-", "-") for p, source in tie.describe(tree)]
    if len(rows) == 1:
        return "No parametrized tensors."
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows
    )


def _describe(x: Any) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return type(x).__name__
    return f"{jnp.dtype(dtype).name}{list(shape)}"


def _describe_tree(tree: dict[str, Any]) -> str:
    if not tree:
        return "-"
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ", ".join(f"{paths.format_path(p)}={_describe(x)}" for p, x in leaves)


def _parametrized_listing(leaves: list[tuple[Any, Any]]) -> str:
    found = [paths.format_path(p) for p, leaf in leaves if is_node(leaf)]
    if not found:
        return "Nothing in this tree is parametrized."
    return f"Parametrized tensors: {', '.join(repr(s) for s in found)}."
