"""The parameter table: every array of a tree with its path, shape, dtype, size, role, chain and,
for constrained tensors, health figures; `table`.

Roles. Every array of a registered tree has one of four roles (the same as
:func:`paramx.param_labels`, which reads them from :func:`label_node`):

* ``"original"``: a raw original of a parametrized tensor (``.original``, ``.original0``, ...);
* ``"parametrization"``: a learnable array owned by a link (``.params['<i>']``);
* ``"state"``: a link's non-trainable state (``.state['<i>']``);
* ``"plain"``: every other leaf.

Health. A parametrization may declare ``health(value, inputs, *, params, state) -> dict`` (read
by ``getattr``, like ``distance``): ``value`` is the link's output, ``inputs`` the tuple of what
the link received (the originals for the first link), ``params`` / ``state`` its own arrays or
``None``. It returns named figures as arrays (jit-able), one number per tensor. A link without
``health`` but with ``distance`` (:mod:`paramx._src.core.manifold`) reports
``{"distance": distance(value)}``. A figure with axes left (a batch of matrices in one tensor)
is reduced to its largest entry; a stack of layers keeps one figure per layer.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import chain as ch
from paramx._src.core import checks, paths, sharding
from paramx._src.core import parametrization as pz
from paramx._src.core.manifold import distance_fn
from paramx._src.core.node import Parametrized, is_node
from paramx._src.core.state import merge_state
from paramx._src.core.tie import is_tied

ROLES = ("original", "parametrization", "plain", "state")
"""The roles of a tree's arrays, in the order totals list them."""

ROOT = "<root>"
"""The module of arrays that sit at the top of the tree (no enclosing module)."""

_STATE_COLLECTION = "paramx_state"  # paramx.linen's default state collection
_NNX_CONTAINER = "parametrizations"  # paramx.nnx's attribute (documented layout of nnx.state)
_NNX_ROLES = {"params": "parametrization", "state": "state"}
_ORIGINAL = re.compile(r"original\d*")


def label_node(node: Parametrized, names: Mapping[str, Any]) -> Parametrized:
    """``node`` with each array replaced by the label of its role.

    ``names`` maps each role of :data:`ROLES` to a label; for a node with several originals it
    may also name ``"original0"``, ``"original1"``, ... to label them separately.
    """
    originals = tuple(
        names.get(n, names["original"]) if node.multi else names["original"]
        for n in node.original_names
    )
    params = jax.tree_util.tree_map(lambda _: names["parametrization"], node.params)
    state = jax.tree_util.tree_map(lambda _: names["state"], node.state)
    return node.replace(originals=originals, params=params, state=state)


def health_fn(p: Any) -> Callable[..., Mapping[str, Any]] | None:
    """A parametrization's ``health`` method, or None."""
    fn = getattr(p, "health", None)
    return fn if callable(fn) and callable(getattr(p, "forward", None)) else None


# ----- the value -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Total:
    """How many arrays, entries and bytes a group of rows holds."""

    arrays: int = 0
    size: int = 0
    nbytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"arrays": self.arrays, "size": self.size, "nbytes": self.nbytes}


@dataclasses.dataclass(frozen=True)
class Row:
    """One array of the tree.

    Attributes:
      path: Where the array is, as :func:`paramx.path_keys` keys joined by ``/``.
      shape, dtype, size, nbytes: The array's.
      role: ``"original"``, ``"parametrization"``, ``"state"`` or ``"plain"``; ``"tied"``
        for a leaf tied to another by :func:`paramx.tie` (it holds no array: ``size`` and
        ``nbytes`` are 0, ``shape`` and ``dtype`` are those of the value it reads).
      chain: The names of the parametrizations of its tensor (empty for a plain array; for a
        tied leaf, ``"tied to <source path> (<transform>)"``).
      tensor: The path of the parametrized tensor it belongs to (``""`` for a plain array).
      collection: A Flax collection (``"params"``, ``"batch_stats"``, ...) or NNX Variable
        type (``"Param"``, ``"ParametrizationState"``, ...); ``""`` for a plain tree.
      module: The top-level module (the first key below the collection; ``"<root>"`` for an
        array at the top of the tree).
      health: The tensor's health figures (arrays; on its first original's row only).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    nbytes: int
    role: str
    chain: tuple[str, ...] = ()
    tensor: str = ""
    collection: str = ""
    module: str = ROOT
    health: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["shape"], out["chain"] = list(self.shape), list(self.chain)
        out["health"] = {k: _plain_number(v) for k, v in self.health.items()}
        return out


@dataclasses.dataclass(frozen=True)
class Table:
    """The parameter table :func:`paramx.table` returns.

    ``str(table)`` is a text table; ``table.to_dict()`` plain Python values for logging (JSON
    serialisable); ``table.health`` the health figures as arrays (return it from ``jax.jit``);
    treescope (``nnx.display``) renders it richly.

    Attributes:
      rows: One :class:`Row` per array.
      by_role: A :class:`Total` per role present, in the order of :data:`ROLES`.
      by_module: A :class:`Total` per top-level module.
      total: The :class:`Total` of every row.
    """

    rows: tuple[Row, ...]
    by_role: Mapping[str, Total]
    by_module: Mapping[str, Total]
    total: Total

    @property
    def health(self) -> dict[str, dict[str, Any]]:
        """``{tensor path: {figure: array}}`` for every tensor with health figures."""
        return {r.tensor: dict(r.health) for r in self.rows if r.health}

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, ints, floats, strs), serialisable with ``json``."""
        return {
            "rows": [r.to_dict() for r in self.rows],
            "by_role": {k: t.to_dict() for k, t in self.by_role.items()},
            "by_module": {k: t.to_dict() for k, t in self.by_module.items()},
            "total": self.total.to_dict(),
        }

    def __str__(self) -> str:
        return "\n".join(_text_lines(self))

    def _repr_html_(self) -> str:
        """The table in HTML (notebooks; treescope shows it too), colored by role."""
        return _html(self)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        """treescope (``nnx.display``): a foldable view, one line per array, then the totals.
        The core imports no treescope: the view is plain values, rendered by treescope's own
        renderer, which also shows :meth:`_repr_html_` in notebooks."""
        return subtree_renderer(_treescope_view(self), path=path)


# ----- building it ----------------------------------------------------------------------------


def table(tree: Any, state: Any = None, *, health: bool = True) -> Table:
    """Every array of a tree: path, shape, dtype, size, role, chain and health, with totals.

    Works on any pytree: a registered tree, its trainable half with its state half
    (:func:`paramx.split_state`), a Flax linen variables dict (``{'params': ...,
    'batch_stats': ...}``; ``paramx.linen``'s ``'paramx_state'``, or the collection its
    ``state_collection`` names, is put back into the nodes it belongs to), an ``nnx.State``,
    or a plain tree. Roles are those of :func:`paramx.param_labels`: ``"original"``,
    ``"parametrization"``, ``"state"``, ``"plain"``. For an NNX module with its chains and
    health figures, use :func:`paramx.nnx.table`.

    Each parametrized tensor gets the health figures its links declare (see the module notes):
    ``orth_error`` (``‖QᴴQ − I‖``) for :class:`paramx.Orthogonal`, ``sigma`` (the estimate the
    state holds) and ``sigma_true`` (the largest singular value) for
    :class:`paramx.SpectralNorm`, ``v_norm_min`` for :class:`paramx.WeightNorm`, and
    ``distance`` to the set for every constraint with a ``distance``. They are arrays, so
    ``table`` also runs inside ``jax.jit`` (return ``table(...).health``).

    Args:
      tree: The tree (or the trainable half, with ``state``).
      state: The state half, when the tree was split. Without it, a trainable half's tensors
        whose links need state get no health figures (with a warning).
      health: Compute the health figures (SVDs and a forward pass per tensor); ``False``
        reads shapes only, and also works on ``jax.eval_shape`` output.

    Returns:
      A frozen dataclass: ``rows``, ``by_role``, ``by_module``, ``total``; ``str()`` gives a
      text table, ``.to_dict()`` plain Python values.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = {"dense": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}}
      >>> tree = px.orthogonal(tree, "dense/kernel")
      >>> t = px.table(tree)
      >>> [(r.path, r.role) for r in t.rows]  # doctest: +NORMALIZE_WHITESPACE
      [('dense/bias', 'plain'), ('dense/kernel/original', 'original'),
       ('dense/kernel/state/0/base', 'state')]
      >>> t.by_role["original"].size, t.total.size
      (9, 21)
      >>> float(t.health["dense/kernel"]["orth_error"]) < 1e-5
      True
      >>> print(px.table(tree, health=False))  # doctest: +NORMALIZE_WHITESPACE
      path                       shape   dtype    size  role      chain
      dense/bias                 (3,)    float32     3  plain
      dense/kernel/original      (3, 3)  float32     9  original  orthogonal
      dense/kernel/state/0/base  (3, 3)  float32     9  state     orthogonal
      <BLANKLINE>
      role      arrays  size  bytes
      original       1     9   36 B
      plain          1     3   12 B
      state          1     9   36 B
      <BLANKLINE>
      module    arrays  size  bytes
      dense          3    21   84 B
      <BLANKLINE>
      total          3    21   84 B
    """
    return finish(rows(entries(tree, state), health=health))


class Entry(NamedTuple):
    """A leaf to tabulate: its key path, the array or node, and its collection."""

    path: tuple[Any, ...]
    leaf: Any
    collection: str = ""
    below_collection: bool = False
    state_collection: str = ""  # the collection a node's state was merged from, if another


def entries(tree: Any, state: Any = None) -> list[Entry]:
    """The leaves of ``tree`` as :class:`Entry` values (nodes, boxes and Variables as one)."""
    if state is not None:
        tree = merge_state(tree, state)
    if is_variables(tree):
        out: list[Entry] = []
        # paramx.linen's state collections, put back into the nodes of 'params': their rows
        # name them. A registered tree ({'params': ...} from model.init) holds its state in
        # 'params'.
        names = state_collections(tree) if state is None else ()
        merged = with_state_collection(tree, names)
        source = _state_sources(tree, names)
        for name, coll in merged.items():
            for e in _flat(coll, (jax.tree_util.DictKey(name),)):
                held = source.get(paths.path_keys(e.path)[1:], "") if name == "params" else ""
                out.append(
                    e._replace(
                        collection=e.collection or str(name),
                        below_collection=True,
                        state_collection=held,
                    )
                )
        return out
    return _flat(tree, ())


def _flat(tree: Any, prefix: tuple[Any, ...]) -> list[Entry]:
    def is_leaf(x: Any) -> bool:
        return is_node(x) or is_tied(x) or paths.is_box(x) or _is_variable(x)

    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        collection = ""
        if _is_variable(leaf):
            collection, leaf = type(leaf).__name__, leaf.get_value()
        leaf = paths.unbox(leaf)[1]
        if _is_variable(leaf):
            collection, leaf = type(leaf).__name__, leaf.get_value()
        out.append(Entry((*prefix, *path), leaf, collection))
    return out


def rows(items: Iterable[Entry], *, health: bool = True) -> list[Row]:
    """The rows of the entries, in order; a node gives one row per array."""
    out: list[Row] = []
    items = list(items)
    failed: list[str] = []
    all_figures: dict[str, dict[str, Any]] = {}
    if health:
        nodes = {paths.format_path(e.path): e.leaf for e in items if is_node(e.leaf)}
        all_figures = _health(nodes, failed)
    for e in items:
        keys = paths.path_keys(e.path)
        if is_tied(e.leaf):
            out.append(_tied_row(e, keys))
            continue
        if not is_node(e.leaf):
            role, tensor = layout_role(keys)
            module = _module(tensor or keys, e.below_collection)
            r = _row(e.path, e.leaf, role, (), "/".join(map(str, tensor)), e.collection, module)
            if r is not None:
                out.append(r)
            continue
        node: Parametrized = e.leaf
        where = paths.format_path(e.path)
        chain = tuple(node.chain_names())
        module = _module(keys, e.below_collection)
        labels = label_node(node, {r: r for r in ROLES})
        arrays = jax.tree_util.tree_flatten_with_path(node)[0]
        roles = jax.tree_util.tree_leaves(labels)
        figures = all_figures.get(where, {})
        first = True
        for (sub, x), role in zip(arrays, roles):
            collection = e.collection
            if role == "state" and e.state_collection:
                collection = e.state_collection
            r = _row((*e.path, *sub), x, role, chain, where, collection, module)
            if r is None:
                continue
            if first and role == "original":
                r, first = dataclasses.replace(r, health=figures), False
            out.append(r)
    if failed:
        warnings.warn(
            f"paramx.table: no health figures for {len(failed)} tensor(s), whose forward "
            f"failed: {'; '.join(failed)}. A trainable half from split_state holds no state: "
            f"give the state half too, table(params, state).",
            stacklevel=3,
        )
    return out


def finish(items: Sequence[Row]) -> Table:
    """The table of the rows, with its totals."""
    by_role: dict[str, Total] = {}
    by_module: dict[str, Total] = {}
    total = Total()
    for r in items:
        if r.role == "tied":  # holds no array: listed, not counted
            continue
        by_role[r.role] = _add(by_role.get(r.role, Total()), r)
        by_module[r.module] = _add(by_module.get(r.module, Total()), r)
        total = _add(total, r)
    ordered = {k: by_role[k] for k in ROLES if k in by_role}
    return Table(
        rows=tuple(items),
        by_role=types.MappingProxyType(ordered),
        by_module=types.MappingProxyType(by_module),
        total=total,
    )


def _add(t: Total, r: Row) -> Total:
    return Total(t.arrays + 1, t.size + r.size, t.nbytes + r.nbytes)


def _row(
    path: tuple[Any, ...],
    x: Any,
    role: str,
    chain: tuple[str, ...],
    tensor: str,
    collection: str,
    module: str,
) -> Row | None:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        if not isinstance(x, (bool, int, float, complex, np.generic)):
            return None  # not an array (a string, an object in a pytree)
        shape, dtype = np.shape(x), np.result_type(x)
    shape = tuple(int(d) for d in shape)
    try:
        name, itemsize = np.dtype(dtype).name, np.dtype(dtype).itemsize
    except TypeError:  # an extended dtype (a PRNG key array's key<fry>)
        name, itemsize = str(dtype), int(getattr(dtype, "itemsize", 0) or 0)
    size = math.prod(shape)
    return Row(
        path=paths.format_path(path),
        shape=shape,
        dtype=name,
        size=size,
        nbytes=size * itemsize,
        role=role,
        chain=chain,
        tensor=tensor,
        collection=collection,
        module=module,
    )


def _tied_row(e: Entry, keys: tuple[Any, ...]) -> Row:
    """The row of a tied leaf: the value's shape and dtype, no storage of its own."""
    tied = e.leaf
    source = tied.source_keys(keys)
    fn = tied.transform
    how = "" if fn is None else f" ({getattr(fn, '__name__', None) or type(fn).__name__})"
    return Row(
        path=paths.format_path(e.path),
        shape=tuple(tied.shape),
        dtype=tied.dtype.name,
        size=0,
        nbytes=0,
        role="tied",
        chain=(f"tied to {'/'.join(map(str, source))}{how}",),
        tensor=paths.format_path(e.path),
        collection=e.collection,
        module=_module(keys, e.below_collection),
    )


def _module(keys: Sequence[Any], below_collection: bool) -> str:
    keys = tuple(keys[1:]) if below_collection else tuple(keys)
    return str(keys[0]) if len(keys) >= 2 else ROOT


def layout_role(keys: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """The role of a plain array from paramx.nnx's layout in an ``nnx.State``
    (``.../parametrizations/<name>/original``, ``.../params/...``, ``.../state/...``), with
    the path of its tensor; ``("plain", ())`` for anything else."""
    for j in range(len(keys) - 2):
        if keys[j] != _NNX_CONTAINER:
            continue
        field = keys[j + 2]
        if isinstance(field, str) and (_ORIGINAL.fullmatch(field) or field in _NNX_ROLES):
            role = _NNX_ROLES.get(field, "original")
            return role, (*keys[:j], keys[j + 1])
    return "plain", ()


def state_collections(tree: Any) -> tuple[str, ...]:
    """The collections of a linen variables dict that hold paramx.linen's state:
    ``'paramx_state'``, and any other whose arrays fit the nodes of ``'params'`` (a
    ``Parametrize(..., state_collection=...)``); ``()`` for a tree that is not a variables dict."""
    if not is_variables(tree):
        return ()
    out = []
    for name, coll in tree.items():
        if name == "params" or not jax.tree_util.tree_leaves(coll):
            continue
        if name != _STATE_COLLECTION:
            try:
                merge_state(tree["params"], coll)
            except (ValueError, TypeError):
                continue  # batch_stats, intermediates, ...: not paramx state
        out.append(name)
    return tuple(out)


def with_state_collection(
    variables: Mapping[str, Any], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """A linen variables dict with paramx.linen's state collections (``names``, by default
    :func:`state_collections`) merged into ``'params'`` (the nodes then hold their state), as a
    new dict."""
    merged = dict(variables)
    names = state_collections(variables) if names is None else names
    if names:
        held: Any = {}
        for name in names:  # merge_state gives every node the state it finds, or none
            held = _union(held, merged.pop(name))
        merged["params"] = merge_state(merged["params"], held)
    return merged


def _union(a: Any, b: Any) -> Any:
    """Two state collections as one nested dict (they hold the state of different nodes)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = _union(out[k], v) if k in out else v
        return out
    return b


def _state_sources(
    variables: Mapping[str, Any], names: Sequence[str]
) -> dict[tuple[Any, ...], str]:
    """For each node of ``'params'`` whose state one of the collections ``names`` holds, that
    collection."""
    if "params" not in variables or not names:
        return {}
    flat = jax.tree_util.tree_flatten_with_path(variables["params"], is_leaf=paths._is_leaf)[0]
    nodes = {paths.path_keys(p) for p, x in flat if is_node(paths.unbox(x)[1])}
    out: dict[tuple[Any, ...], str] = {}
    for name in names:
        for p, _ in jax.tree_util.tree_flatten_with_path(variables[name])[0]:
            keys = paths.path_keys(p)
            for k in range(len(keys)):
                if keys[:k] in nodes:
                    out[keys[:k]] = name
    return out


def plain_array_role(keys: tuple[Any, ...], state_names: Sequence[str] = ()) -> str:
    """The role of an array that is not inside a node: ``"state"`` in one of paramx.linen's
    state collections (``state_names``, from :func:`state_collections`), else the role of
    paramx.nnx's layout (:func:`layout_role`), ``"plain"`` for anything else."""
    if keys and keys[0] in state_names:
        return "state"
    return layout_role(keys)[0]


def is_variables(tree: Any) -> bool:
    """A Flax linen variables dict: a mapping of collections, ``'params'`` among them."""
    if not isinstance(tree, Mapping) or "params" not in tree or _is_variable(tree):
        return False
    if type(tree).__name__ == "State":  # an nnx.State: its keys are attribute names
        return False
    return all(isinstance(v, Mapping) for v in tree.values())


def _is_variable(x: Any) -> bool:
    """An NNX Variable (read by protocol: the core imports no Flax)."""
    return (
        callable(getattr(x, "get_value", None))
        and callable(getattr(x, "get_metadata", None))
        and not is_node(x)
    )


# ----- health ---------------------------------------------------------------------------------


def _health(nodes: Mapping[str, Parametrized], failed: list[str]) -> dict[str, dict[str, Any]]:
    """The health figures of every node, by path. The chains that declare ``traceable = True``
    (the built-ins) run as one compiled program (an SVD or a matrix exponential is much
    faster compiled than operation by operation; the program is cached for the tree's
    structure), the others eagerly. A node whose forward fails (no state in a trainable half)
    gets none, and its path and error go to ``failed``."""
    wanted = {w: n for w, n in nodes.items() if _has_health(n)}
    traced = {w: n for w, n in wanted.items() if all(_traceable(p) for p in n.chain)}
    out: dict[str, dict[str, Any]] = {}
    if traced:
        try:
            out.update(_compiled_health(traced, tuple(traced)))
        except (ValueError, TypeError):
            pass  # one of them cannot run: find which, one by one, below
    for where, node in wanted.items():
        if where in out:
            continue
        try:
            if where in traced:
                out.update(_compiled_health({where: node}, (where,)))
            else:
                out[where] = _node_health(node, where)
        except (ValueError, TypeError) as err:
            failed.append(f"{where} ({err})")
    return out


def _all_health(nodes: Mapping[str, Parametrized], order: tuple[str, ...]) -> dict[str, Any]:
    return {w: _node_health(nodes[w], w) for w in order}


_compiled_health = jax.jit(_all_health, static_argnums=1)


def _traceable(p: Any) -> bool:
    return getattr(p, "traceable", False) is True


def _has_health(node: Parametrized) -> bool:
    fns = [health_fn(p) or distance_fn(p) for p in node.chain]
    return any(fns) and all(_holds_values(x) for x in node.originals)


def _holds_values(x: Any) -> bool:
    """An array with values: a JAX array (or tracer), or the NumPy array a checkpoint restores
    (``flax.serialization``); not a ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``."""
    return isinstance(x, jax.Array | np.ndarray)


def _node_health(node: Parametrized, where: str) -> dict[str, Any]:
    """The health figures of a node's links (see the module notes)."""
    fns = [health_fn(p) or _distance_health(p) for p in node.chain]
    if not any(fns) or not all(_holds_values(x) for x in node.originals):
        return {}
    last = max(i for i, f in enumerate(fns) if f is not None)
    counts: dict[str, int] = {}

    def one(originals: Any, params: dict[str, Any], state: dict[str, Any]) -> list[Any]:
        xs = tuple(originals)
        out = []
        for i, p in enumerate(node.chain[: last + 1]):
            kw = ch.link_kwargs(params, state, i, p)
            value = pz.forward_fn(p)(*xs, **kw)
            fn = fns[i]
            if fn is not None:
                figures = fn(value, xs, params=kw.get("params"), state=kw.get("state"))
                out.append({str(k): _scalar(v) for k, v in dict(figures).items()})
            xs = (value,)
        return out

    def replicated(shapes: Any, replicated: Any) -> Any:  # the figures: a number per tensor
        return jax.tree_util.tree_map(lambda _: replicated, shapes)

    with checks.at_path(where):
        n_axes = ch.stack_axes(node, where)
        # Explicitly sharded originals: the forward and the figures run in auto mode, as in
        # `materialize` (an SVD or `A - A^T` of a sharded matrix does not type-check).
        per_link = sharding.run_auto(
            ch.per_tensor(one, n_axes),
            node.originals,
            node.params,
            node.state,
            out_sharding=replicated,
        )
    for figures in per_link:
        for k in figures:
            counts[k] = counts.get(k, 0) + 1
    out: dict[str, Any] = {}
    for i, figures in zip((i for i, f in enumerate(fns) if f is not None), per_link):
        for k, v in figures.items():
            out[k if counts[k] == 1 else f"{i}:{k}"] = v
    return out


def _distance_health(p: Any) -> Callable[..., Mapping[str, Any]] | None:
    fn = distance_fn(p)
    if fn is None:
        return None
    distance = fn

    def health(value: Any, inputs: Any, *, params: Any, state: Any) -> dict[str, Any]:
        return {"distance": distance(value)}

    return health


def _scalar(x: Any) -> jax.Array:
    a: jax.Array = jnp.asarray(x)
    if a.ndim == 0:
        return a
    if a.size == 0:
        return jnp.zeros((), a.dtype)
    largest: jax.Array = jnp.max(a)
    return largest


def _plain_number(x: Any) -> Any:
    a = np.asarray(x)
    return a.item() if a.ndim == 0 else a.tolist()


# ----- text -----------------------------------------------------------------------------------


def _fmt_number(x: Any) -> str:
    try:
        a = np.asarray(x)
    except Exception:  # a tracer: the table was built under jit
        return "<traced>"
    if a.ndim == 0:
        return f"{a.item():.3g}"
    return f"{a.min():.3g}..{a.max():.3g}"  # a stack of layers: the range


def _fmt_health(h: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_number(v)}" for k, v in h.items())


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _columns(t: Table) -> list[tuple[str, Callable[[Row], str], bool]]:
    """(header, cell, right-aligned) for each column the table needs."""
    cols: list[tuple[str, Callable[[Row], str], bool]] = [
        ("path", lambda r: r.path, False),
        ("shape", lambda r: str(r.shape), False),
        ("dtype", lambda r: r.dtype, False),
        ("size", lambda r: f"{r.size:,}", True),
        ("role", lambda r: r.role, False),
    ]
    if any(r.collection for r in t.rows):
        cols.append(("collection", lambda r: r.collection, False))
    if any(r.chain for r in t.rows):
        cols.append(("chain", lambda r: " -> ".join(r.chain), False))
    if any(r.health for r in t.rows):
        cols.append(("health", lambda r: _fmt_health(r.health), False))
    return cols


def _aligned(lines: list[list[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(line[c]) for line in lines) for c in range(len(right))]
    return [
        "  ".join(
            cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(line, widths, right)
        ).rstrip()
        for line in lines
    ]


def _text_lines(t: Table) -> list[str]:
    if not t.rows:
        return ["No arrays."]
    cols = _columns(t)
    grid = [[h for h, _, _ in cols]] + [[cell(r) for _, cell, _ in cols] for r in t.rows]
    out = _aligned(grid, [right for _, _, right in cols])

    def totals(header: str, groups: Mapping[str, Total]) -> list[list[str]]:
        lines = [[header, "arrays", "size", "bytes"]]
        for k, g in groups.items():
            lines.append([k, str(g.arrays), f"{g.size:,}", _fmt_bytes(g.nbytes)])
        return lines

    blocks = [totals("role", t.by_role), totals("module", t.by_module)]
    total = [["total", str(t.total.arrays), f"{t.total.size:,}", _fmt_bytes(t.total.nbytes)]]
    aligned = _aligned([*blocks[0], *blocks[1], *total], [False, True, True, True])
    n_role = len(blocks[0])
    out += ["", *aligned[:n_role], "", *aligned[n_role:-1], "", aligned[-1]]
    return out


# ----- notebooks: HTML and treescope -----------------------------------------------------------

_ROLE_COLORS = {
    "original": "#1f77b4",
    "parametrization": "#9467bd",
    "state": "#7f7f7f",
    "plain": "#2ca02c",
}


def _html(t: Table) -> str:
    cols = _columns(t)
    esc = html.escape
    head = "".join(f"<th style='text-align:left'>{esc(h)}</th>" for h, _, _ in cols)
    body = []
    for r in t.rows:
        color = _ROLE_COLORS.get(r.role, "inherit")
        cells = "".join(
            f"<td style='text-align:{'right' if right else 'left'}'>{esc(cell(r))}</td>"
            for _, cell, right in cols
        )
        body.append(f"<tr style='color:{color}'>{cells}</tr>")

    def totals(title: str, groups: Mapping[str, Total]) -> str:
        lines = "".join(
            f"<tr><td>{esc(k)}</td><td style='text-align:right'>{g.arrays}</td>"
            f"<td style='text-align:right'>{g.size:,}</td>"
            f"<td style='text-align:right'>{_fmt_bytes(g.nbytes)}</td></tr>"
            for k, g in groups.items()
        )
        return (
            f"<table><tr><th style='text-align:left'>{esc(title)}</th><th>arrays</th>"
            f"<th>size</th><th>bytes</th></tr>{lines}</table>"
        )

    return (
        f"<div><table><tr>{head}</tr>{''.join(body)}</table>"
        f"{totals('role', t.by_role)}{totals('module', t.by_module)}"
        f"{totals('', {'total': t.total})}</div>"
    )


def _fmt_total(g: Total) -> str:
    return f"{g.arrays} array{'s' if g.arrays != 1 else ''}, {g.size:,} ({_fmt_bytes(g.nbytes)})"


def _treescope_view(t: Table) -> dict[str, Any]:
    cols = _columns(t)[1:]

    def line(r: Row) -> str:
        return "  ".join(c for c in (cell(r) for _, cell, _ in cols) if c)

    def totals(groups: Mapping[str, Total]) -> dict[str, str]:
        return {k: _fmt_total(g) for k, g in groups.items()}

    return {
        "rows": {r.path: line(r) for r in t.rows},
        "by_role": totals(t.by_role),
        "by_module": totals(t.by_module),
        "total": _fmt_total(t.total),
    }
