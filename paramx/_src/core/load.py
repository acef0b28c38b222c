"""`load_plain`: a plain model's weights into a parametrized tree, through right_inverse.

torch's ``model.load_state_dict(plain_state_dict)`` on a parametrized model assigns each
parametrized tensor (``module.weight = value`` runs the chain's ``right_inverse``) and copies
every other tensor. :func:`load_plain` does the same on a registered tree, in one call, and
reports what each parametrization made of the value it was given.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import checks, paths, tie
from paramx._src.core.assign import assign_tensor
from paramx._src.core.materialize import materialize_tensor
from paramx._src.core.node import Parametrized, is_node

Action = Literal["projected", "copied", "tied"]


@dataclasses.dataclass(frozen=True)
class LoadEntry:
    """What loading did at one path of the parametrized tree.

    Attributes:
      path: The tensor's path (``"params/Dense_0/kernel"``).
      action: ``"projected"`` (set through the chain's ``right_inverse``), ``"copied"`` (a
        plain leaf) or ``"tied"`` (a leaf tied to another, :func:`paramx.tie`, which reads
        its source: the plain value there is not loaded).
      distance: For ``"projected"``: ``‖forward(right_inverse(w)) − w‖ / ‖w‖`` (``‖·‖``
        over the whole tensor, a stack of layers included; the absolute distance when
        ``w`` is zero): 0 when ``w`` already satisfied the constraint. ``forward`` runs with
        the tensor's current state and no state update (the model's value in eval mode): for
        spectral norm, the division by the current power-iteration estimate of sigma.
        ``None`` otherwise.
      chain: The parametrizations' names, for ``"projected"``.
    """

    path: str
    action: Action
    distance: float | None = None
    chain: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """The report of :func:`paramx.load_plain` (and ``paramx.nnx.load_plain``).

    Attributes:
      entries: One :class:`LoadEntry` per loaded path, in the tree's order.
      missing: Paths of the parametrized tree with no value in the plain tree (kept as they
        were; only with ``strict=False``).
      unexpected: Paths of the plain tree with no place in the parametrized one (skipped;
        only with ``strict=False``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.orthogonal({"w": jnp.eye(2), "b": jnp.zeros(2)}, "w")
      >>> _, report = px.load_plain(tree, {"w": 2 * jnp.eye(2), "b": jnp.ones(2)})
      >>> print(report)
      load_plain: 1 projected, 1 copied
        w  projected by orthogonal, relative distance 0.5
      >>> report.projected
      {'w': 0.5}
    """

    entries: tuple[LoadEntry, ...]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    @property
    def projected(self) -> dict[str, float]:
        """``{path: relative distance}`` for each tensor set through ``right_inverse``."""
        return {e.path: float(e.distance or 0.0) for e in self.entries if e.action == "projected"}

    @property
    def copied(self) -> list[str]:
        """The paths of the plain leaves copied as they were."""
        return [e.path for e in self.entries if e.action == "copied"]

    def __str__(self) -> str:
        counts = [
            f"{sum(e.action == a for e in self.entries)} {a}"
            for a in ("projected", "copied", "tied")
            if any(e.action == a for e in self.entries)
        ]
        if self.missing:
            counts.append(f"{len(self.missing)} missing")
        if self.unexpected:
            counts.append(f"{len(self.unexpected)} unexpected")
        lines = [f"load_plain: {', '.join(counts) or 'nothing loaded'}"]
        for e in self.entries:
            if e.action == "projected":
                lines.append(
                    f"  {e.path}  projected by {' -> '.join(e.chain)}, relative distance "
                    f"{e.distance:.3g}"
                )
        lines += [f"  {p}  missing (kept)" for p in self.missing]
        lines += [f"  {p}  unexpected (skipped)" for p in self.unexpected]
        return "\n".join(lines)


def _is_leaf(x: Any) -> bool:
    return is_node(x) or paths.is_box(x) or tie.is_tied(x)


def _items(tree: Any) -> list[tuple[tuple[Any, ...], Any, Any]]:
    """``(keys, key path, leaf)`` per leaf; nodes, boxes (unboxed) and ties are leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
    return [(paths.path_keys(p), p, paths.unbox(x)[1]) for p, x in flat]


def relative_distance(value: Any, target: Any) -> float:
    """``‖value − target‖ / ‖target‖`` in float64 on the host (``‖value − target‖`` when
    ``target`` is zero)."""
    v = np.asarray(value)
    t = np.asarray(target)
    kind = np.complex128 if np.iscomplexobj(v) or np.iscomplexobj(t) else np.float64
    diff = float(np.linalg.norm((v.astype(kind) - t.astype(kind)).ravel()))
    norm = float(np.linalg.norm(t.astype(kind).ravel()))
    return diff / norm if norm > 0 else diff


def closest_text(wanted: str, pool: list[str]) -> str:
    close = difflib.get_close_matches(wanted, pool, n=3, cutoff=0.5)
    return f" (closest: {', '.join(repr(c) for c in close)})" if close else ""


def refuse_unmatched(
    missing: list[str], unexpected: list[str], have: list[str], given: list[str]
) -> None:
    """The strict-mode error naming every unmatched path and the closest on the other side."""
    if not missing and not unexpected:
        return
    lines = ["The plain tree does not match the parametrized one:"]
    lines += [
        f"  missing {p!r}: no value in the plain tree{closest_text(p, given)}" for p in missing
    ]
    lines += [
        f"  unexpected {p!r}: no such tensor in the parametrized tree{closest_text(p, have)}"
        for p in unexpected
    ]
    lines.append(
        "Give the plain tree of the same model (px.materialize(tree) has its structure), or "
        "pass strict=False to load what matches and get the rest in the report."
    )
    raise ValueError("\n".join(lines))


def copy_value(old: Any, value: Any, where: str) -> Any:
    """``value`` for a plain leaf ``old``: same shape, converted to ``old``'s dtype when the
    kind is the same (as torch's ``load_state_dict`` copies)."""
    if not checks.is_array(value):
        raise ValueError(
            f"The plain value at {where} is a {checks.type_name(value)}, not an array."
        )
    shape = tuple(getattr(old, "shape", ()))
    if tuple(np.shape(value)) != shape:
        raise ValueError(
            f"Shape mismatch at {where}: the tree holds {checks.describe(old)}, the plain tree "
            f"{checks.describe(value)}. Load weights of the same architecture."
        )
    dtype = getattr(old, "dtype", None)
    if dtype is None:
        return jnp.asarray(value)
    if np.dtype(dtype).kind != np.dtype(np.asarray(value).dtype).kind:
        raise ValueError(
            f"dtype mismatch at {where}: the tree holds {checks.describe(old)}, the plain tree "
            f"{checks.describe(value)}; only dtypes of one kind are converted."
        )
    return jnp.asarray(value, dtype=dtype)


def load_plain(tree: Any, plain: Any, *, strict: bool = True) -> tuple[Any, LoadReport]:
    """Loads a plain model's weights into a parametrized tree; returns ``(new_tree, report)``.

    torch's ``load_state_dict`` on a parametrized model, in one call: every parametrized
    tensor is set to the plain tree's value at its path through its chain's
    ``right_inverse`` (as :func:`paramx.assign`; a constraint the value does not satisfy is
    projected, e.g. orthogonal's ``right_inverse`` takes the nearest orthogonal matrix), and
    every other leaf is copied (converted to the tree's dtype when of the same kind). The
    report gives, per parametrized tensor, how far the loaded tensor is from the given value:
    ``‖forward(right_inverse(w)) − w‖ / ‖w‖``. Works on registered trees, linen variables and
    stacked layers (``nn.scan`` / ``nn.vmap``: the value carries the stack's leading axes). A
    leaf tied to another (:func:`paramx.tie`) reads its source, so its plain value is not
    loaded (reported as ``"tied"``).

    Args:
      tree: A registered tree holding its state (before :func:`paramx.split_state`, or
        ``px.merge_state(params, state)``): the parametrized model's tree or linen variables.
      plain: The plain model's tree with the same paths (``px.materialize(tree)`` has the
        structure), e.g. a pretrained checkpoint of the model without parametrizations.
      strict: If True, every tensor of ``tree`` must have a value in ``plain`` and every
        value of ``plain`` a tensor in ``tree``. If False, unmatched paths are kept (missing)
        or skipped (unexpected) and listed in the report.

    Returns:
      The new tree (``tree`` is not modified) and a :class:`LoadReport`.

    Raises:
      ValueError: On missing or unexpected paths (``strict=True``; each named with the
        closest path on the other side), on a shape or dtype mismatch, and on a ``plain`` that
        holds parametrizations (give ``px.materialize(plain)``).
      RuntimeError: If a chain has no ``right_inverse``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> model = nn.Dense(3)
      >>> pretrained = model.init(jax.random.key(0), jnp.ones((1, 3)))  # a plain checkpoint
      >>> tree = px.orthogonal(model.init(jax.random.key(1), jnp.ones((1, 3))), "params/kernel")
      >>> tree, report = px.load_plain(tree, pretrained)
      >>> report.copied, list(report.projected)
      (['params/bias'], ['params/kernel'])
      >>> k = px.materialize(tree)["params"]["kernel"]  # the orthogonal matrix nearest to it
      >>> bool(jnp.allclose(k.T @ k, jnp.eye(3), atol=1e-5))
      True
    """
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be a bool; got {strict!r}.")
    given = _items(plain)
    nodes = [paths.format_path(p) for _, p, x in given if is_node(x)]
    if nodes:
        raise ValueError(
            f"The plain tree holds parametrized tensors ({', '.join(nodes[:3])}); give its "
            f"plain values: px.materialize(plain)."
        )
    values = {keys: (p, x) for keys, p, x in given if not tie.is_tied(x)}
    have = _items(tree)
    entries: list[LoadEntry] = []
    missing: list[str] = []
    replacements: dict[int, Any] = {}
    used: set[tuple[Any, ...]] = set()
    for i, (keys, path, leaf) in enumerate(have):
        where = paths.format_path(path)
        if tie.is_tied(leaf):
            if keys in values:
                used.add(keys)
                entries.append(LoadEntry(where, "tied"))
            continue
        if keys not in values:
            missing.append(where)
            continue
        used.add(keys)
        value = values[keys][1]
        if is_node(leaf):
            node: Parametrized = leaf
            new = assign_tensor(node, jnp.asarray(value), label=where)
            loaded = materialize_tensor(new, label=where)
            dist = relative_distance(loaded, value)
            entries.append(LoadEntry(where, "projected", dist, tuple(node.chain_names())))
            replacements[i] = new
        else:
            replacements[i] = copy_value(leaf, value, where)
            entries.append(LoadEntry(where, "copied"))
    unexpected = [paths.format_path(p) for keys, (p, _) in values.items() if keys not in used]
    if strict:
        pool_have = [paths.format_path(p) for _, p, _ in have]
        pool_given = [paths.format_path(p) for p, _ in values.values()]
        refuse_unmatched(missing, unexpected, pool_have, pool_given)
    out = _replace(tree, replacements)
    return out, LoadReport(tuple(entries), tuple(missing), tuple(unexpected))


def _replace(tree: Any, replacements: dict[int, Any]) -> Any:
    """A new tree with leaves (indices of :func:`_items`) replaced; boxes are kept."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_leaf)
    new = [
        paths.rebox(paths.unbox(x)[0], replacements[i]) if i in replacements else x
        for i, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)
