"""Per-parameter optimizer metadata (tags -> optax masks and labels) and optimizer-state
carry-over after model surgery.

Tags. :func:`tags` names groups of parameters once (``"no_decay"``, ``"frozen"``, a
learning-rate group) with paramx's selectors (path strings, key tuples, predicates over key
paths; never substrings) and ready-made rules (:func:`biases`, :func:`norm_scales`,
:func:`embeddings`, :func:`tokens`, :func:`named`). The :class:`Tags` it returns gives optax
masks (``optax.masked``, ``optax.adamw(mask=...)``) and labels (``optax.multi_transform``) as
trees shaped like the params, ``Parametrized`` nodes included, as :func:`paramx.param_labels`
does. A parametrized tensor is one leaf for selection; its tags go to every trainable array it
holds (its originals and its parametrizations' own arrays), never to its state. A path string
or key tuple may also name one array inside a node (``"kernel/original0"``, weight norm's
magnitude) to tag that array alone.

Carry-over. :func:`carry_state` maps an optax state from the params before model surgery
(``remove_parametrizations``, ``register_parametrization``) to the params after it, by path:
moments follow the tensor, so ``kernel.original`` and ``kernel`` are the same tensor (torch's
Parameter surviving ``remove_parametrizations``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import GetAttrKey

from paramx._src.core import paths
from paramx._src.core.node import is_node
from paramx._src.core.table import plain_array_role, state_collections

Rule = str | Sequence[Any] | Callable[[tuple[Any, ...], Any], bool]

TOKEN_NAMES: tuple[str, ...] = (
    "cls",
    "cls_token",
    "class_token",
    "dist_token",
    "distillation_token",
    "mask_token",
    "reg_token",
    "reg_tokens",
    "register_tokens",
    "pos_embed",
    "pos_embedding",
    "pos_embeddings",
    "pos_emb",
    "position_embedding",
    "position_embeddings",
    "positional_embedding",
    "absolute_pos_embed",
    "relative_position_bias_table",
)
"""The leaf (or module) names :func:`tokens` selects: learnable tokens and positional
embeddings as ViT, DeiT, BEiT, Swin and CLIP implementations name them."""

NORM_SCALE_NAMES: tuple[str, ...] = ("scale",)
"""Flax's name for the learnable scale of ``LayerNorm``, ``BatchNorm``, ``GroupNorm``,
``RMSNorm`` and ``InstanceNorm`` (linen and NNX); no other Flax layer has a ``scale``."""

_NNX_CONTAINER = "parametrizations"


# ----- rules -------------------------------------------------------------------------------


def tensor_keys(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The keys naming a tensor, read off any key path of linen or NNX trees.

    An NNX Variable's trailing ``value`` and a paramx.nnx parametrized tensor's
    ``parametrizations/<name>/original`` both come down to ``(..., <name>)``; a paramx tree
    node is seen whole by the rules, so its path already ends with the tensor's name.
    """
    keys = list(paths.path_keys(path))
    while keys and keys[-1] in ("value", "raw_value") and isinstance(path[-1], GetAttrKey):
        keys.pop()
        path = path[:-1]
    for i in range(len(keys) - 1):  # the outermost: a registration on an original nests one
        if keys[i] == _NNX_CONTAINER:
            return (*keys[:i], keys[i + 1])
    return tuple(keys)


def named(*names: str, module: bool = False) -> Callable[[tuple[Any, ...], Any], bool]:
    """A rule selecting the tensors whose name is one of ``names``.

    The name is the last key of the tensor's path (an NNX Variable's attribute; for a tensor
    registered with ``paramx.nnx``, the parametrized attribute, not ``original``). Keys are
    compared whole: ``named("bias")`` never selects ``"bias_scale"``.

    Args:
      *names: Exact names.
      module: Also select every tensor below a module of one of these names (a linen
        ``nn.Embed`` named ``pos_embedding`` holds ``pos_embedding/embedding``).

    Returns:
      A predicate ``(key_path, leaf) -> bool`` for :func:`tags`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> params = {"head": {"kernel": jnp.ones((2, 2))}, "my_token": jnp.zeros(2)}
      >>> px.optim.tags(params, {"no_decay": px.optim.named("my_token")}).paths("no_decay")
      ['my_token']
    """
    wanted = frozenset(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad or not names:
        raise TypeError(f"`named` takes one or more names as strings; got {names!r}.")

    def rule(path: tuple[Any, ...], leaf: Any) -> bool:
        keys = tensor_keys(path)
        if not keys:
            return False
        if keys[-1] in wanted:
            return True
        return module and any(k in wanted for k in keys[:-1])

    rule.__name__ = f"named({', '.join(repr(n) for n in names)})"
    return rule


def biases(path: tuple[Any, ...], leaf: Any) -> bool:
    """Rule: every tensor named ``bias`` (Dense, Conv, attention, norms' offsets).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> params = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))
      >>> px.optim.tags(params, {"no_decay": px.optim.biases}).paths("no_decay")
      ['params/bias']
    """
    keys = tensor_keys(path)
    return bool(keys) and keys[-1] == "bias"


def norm_scales(path: tuple[Any, ...], leaf: Any) -> bool:
    """Rule: the scales of normalization layers (``LayerNorm``, ``BatchNorm``, ``GroupNorm``,
    ``RMSNorm``, ``InstanceNorm``; Flax names them ``scale``, see ``NORM_SCALE_NAMES``).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> params = nn.LayerNorm().init(jax.random.key(0), jnp.ones((1, 3)))
      >>> px.optim.tags(params, {"no_decay": px.optim.norm_scales}).paths("no_decay")
      ['params/scale']
    """
    keys = tensor_keys(path)
    return bool(keys) and keys[-1] in NORM_SCALE_NAMES


def embeddings(path: tuple[Any, ...], leaf: Any) -> bool:
    """Rule: embedding tables (``nn.Embed`` / ``nnx.Embed`` name theirs ``embedding``).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> params = nn.Embed(5, 2).init(jax.random.key(0), jnp.ones((1,), jnp.int32))
      >>> px.optim.tags(params, {"no_decay": px.optim.embeddings}).paths("no_decay")
      ['params/embedding']
    """
    keys = tensor_keys(path)
    return bool(keys) and keys[-1] == "embedding"


def tokens(path: tuple[Any, ...], leaf: Any) -> bool:
    """Rule: learnable tokens and positional embeddings, by name (``TOKEN_NAMES``: ``cls``,
    ``cls_token``, ``class_token``, ``dist_token``, ``mask_token``, ``reg_tokens``,
    ``register_tokens``, ``pos_embed``, ``pos_embedding``, ``position_embedding(s)``,
    ``positional_embedding``, ``absolute_pos_embed``, ``relative_position_bias_table``, ...),
    as a tensor's name, or as the name of an ``nn.Embed`` / ``nnx.Embed`` whose
    ``embedding`` it is (``pos_embedding/embedding``; other tensors below a module of such a
    name are not selected: BERT's ``cls`` module is a head). Other names: :func:`named`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> params = {"cls_token": jnp.zeros((1, 4)), "head": {"kernel": jnp.ones((4, 2))}}
      >>> px.optim.tags(params, {"no_decay": px.optim.tokens}).paths("no_decay")
      ['cls_token']
    """
    keys = tensor_keys(path)
    if not keys:
        return False
    # an nn.Embed named after a token: only its table (a module named "cls" may be a head)
    return keys[-1] in TOKEN_NAMES or (
        len(keys) >= 2 and keys[-1] == "embedding" and keys[-2] in TOKEN_NAMES
    )


# ----- tags --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Array:
    """One array of the tree: where it is, the tensor (selection leaf) it belongs to."""

    path: tuple[Any, ...]  # full key path of the array
    item: int  # index of its selection leaf in paths.leaves_with_paths
    state: bool  # a parametrization's state


def pure(tree: Any) -> Any:
    """``tree`` with each NNX Variable replaced by its value: what ``nnx.Optimizer`` gives optax."""
    return jax.tree_util.tree_map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _arrays(tree: Any) -> tuple[list[_Array], list[tuple[Any, Any]], Any]:
    tree = pure(tree)
    items = paths.leaves_with_paths(tree)
    boxed = jax.tree_util.tree_flatten_with_path(tree, is_leaf=paths._is_leaf)[0]
    arrays: list[_Array] = []
    held = state_collections(tree)
    for i, (item_path, item) in enumerate(boxed):
        node = is_node(paths.unbox(item)[1])
        for sub, _ in jax.tree_util.tree_flatten_with_path(item)[0]:
            path = tuple(item_path) + tuple(sub)
            if node:
                state = _under_state(sub)
            else:  # paramx.nnx's state arrays, a linen variables dict's state collection
                state = plain_array_role(paths.path_keys(path), held) == "state"
            arrays.append(_Array(path, i, state))
    treedef = jax.tree_util.tree_structure(tree)
    return arrays, items, treedef


def _under_state(sub: tuple[Any, ...]) -> bool:
    return any(isinstance(k, GetAttrKey) and k.name == "state" for k in sub)


@dataclasses.dataclass(frozen=True)
class Tags:
    """Tags on the arrays of a parameter tree, from :func:`tags`; gives optax masks and labels.

    Attributes:
      names: The tags, in the order given to :func:`tags` (the default priority of
        :meth:`labels`).
      table: For each array path (``"params/Dense_0/kernel/original"``), its tags.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> params = px.orthogonal({"kernel": jnp.eye(2), "bias": jnp.zeros(2)}, "kernel")
      >>> tags = px.optim.tags(params, {"no_decay": px.optim.biases, "frozen": "kernel"})
      >>> tags
      Tags(no_decay: 1 array, frozen: 1 array; 3 arrays, 1 of state)
      >>> tags.table["kernel/original"]
      ('frozen',)
    """

    names: tuple[str, ...]
    _treedef: Any = dataclasses.field(repr=False)
    _arrays: tuple[tuple[str, frozenset[str], bool], ...] = dataclasses.field(repr=False)

    @property
    def table(self) -> dict[str, tuple[str, ...]]:
        return {
            p: tuple(n for n in self.names if n in t) for p, t, state in self._arrays if not state
        }

    def paths(self, name: str) -> list[str]:
        """The paths of the arrays tagged ``name``.

        Examples:
          >>> import jax.numpy as jnp
          >>> import paramx as px
          >>> params = px.weight_norm({"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}, "w")
          >>> px.optim.tags(params, {"frozen": "w"}).paths("frozen")
          ['w/original0', 'w/original1']
        """
        self._check_names((name,))
        return [p for p, t, _ in self._arrays if name in t]

    def mask(self, *names: str, invert: bool = False) -> Any:
        """A tree of bools shaped like the params: True on the arrays with any of ``names``.

        For ``optax.masked(tx, mask)`` and ``mask=`` of optax's optimizers. ``invert=True``
        gives True on the arrays with none of them: ``adamw(mask=tags.mask("no_decay",
        invert=True))`` decays everything but the ``no_decay`` arrays. State arrays (present
        only in a tree that was not split with :func:`paramx.split_state`) are always False.

        Examples:
          >>> import jax.numpy as jnp
          >>> import optax
          >>> import paramx as px
          >>> params = px.orthogonal({"kernel": jnp.eye(2), "bias": jnp.zeros(2)}, "kernel")
          >>> params, state = px.split_state(params)
          >>> tags = px.optim.tags(params, {"no_decay": px.optim.biases})
          >>> decay = tags.mask("no_decay", invert=True)
          >>> decay
          {'bias': False, 'kernel': Parametrized(chain=[orthogonal], original=True)}
          >>> tx = optax.adamw(1e-3, weight_decay=0.1, mask=decay)
          >>> updates, _ = tx.update(params, tx.init(params), params)
        """
        if not names:
            raise ValueError("`mask` needs at least one tag name; the tags are " + self._known())
        self._check_names(names)
        wanted = frozenset(names)
        out = [(not state) and (bool(t & wanted) != invert) for _, t, state in self._arrays]
        return jax.tree_util.tree_unflatten(self._treedef, out)

    def labels(self, *priority: str, default: Hashable = "default") -> Any:
        """A tree of labels shaped like the params, for ``optax.multi_transform``.

        Each array gets the first tag of ``priority`` it has (all tags in the order given to
        :func:`tags` when ``priority`` is empty), or ``default``. State arrays get
        ``"state"`` (as in :func:`paramx.param_labels`: give the optimizer the trainable half
        from :func:`paramx.split_state`).

        Examples:
          >>> import jax.numpy as jnp
          >>> import optax
          >>> import paramx as px
          >>> params = {"enc": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
          >>> tags = px.optim.tags(params, {"frozen": "enc/..."})
          >>> tags.labels()
          {'enc': {'kernel': 'frozen'}, 'head': {'kernel': 'default'}}
          >>> tx = optax.multi_transform(
          ...     {"frozen": optax.set_to_zero(), "default": optax.sgd(0.1)}, tags.labels())
          >>> updates, _ = tx.update(params, tx.init(params), params)
          >>> updates["enc"]["kernel"][0, 0], updates["head"]["kernel"][0, 0]
          (Array(0., dtype=float32), Array(-0.1, dtype=float32))
        """
        self._check_names(priority)
        order = priority or self.names
        out: list[Hashable] = []
        for _, t, state in self._arrays:
            if state:
                out.append("state")
                continue
            out.append(next((n for n in order if n in t), default))
        return jax.tree_util.tree_unflatten(self._treedef, out)

    def _known(self) -> str:
        return ", ".join(repr(n) for n in self.names) + "."

    def _check_names(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(
                f"No tag named {', '.join(repr(n) for n in unknown)}; the tags are {self._known()}"
            )

    def __repr__(self) -> str:
        counts = [
            f"{n}: {sum(n in t for _, t, _ in self._arrays)} "
            f"array{'s' if sum(n in t for _, t, _ in self._arrays) != 1 else ''}"
            for n in self.names
        ]
        n_state = sum(s for _, _, s in self._arrays)
        total = f"{len(self._arrays)} arrays" + (f", {n_state} of state" if n_state else "")
        return f"Tags({', '.join(counts)}; {total})"


def tags(params: Any, rules: Mapping[str, Rule | Sequence[Rule]]) -> Tags:
    """Tags the arrays of a parameter tree once; the result gives optax masks and labels.

    Each tag is selected by one rule or a list of rules (their union). A rule is a selector as
    everywhere in paramx (see :func:`paramx.register_parametrization`): a ``/``-joined path
    string, a tuple of keys, or a predicate ``(key_path, leaf) -> bool`` (the ready-made
    :func:`biases`, :func:`norm_scales`, :func:`embeddings`, :func:`tokens`, :func:`named`).
    Keys are compared whole, never as substrings. A path ending in ``/...``
    (``"encoder/..."``) selects every array below it. A parametrized tensor is one leaf (its
    node): its tags go to its originals and to its parametrizations' own arrays, never to its
    state; a path may also name one array of a node (``"kernel/original0"``).

    A path that names nothing, and a tag none of whose rules selects anything, are errors
    naming the closest paths (a predicate alone may select nothing: ``no_decay`` on a model
    without tokens still works when another of its rules selects something).

    Args:
      params: A parameter tree: a registered tree or its trainable half, linen variables, an
        ``nnx.State`` (``nnx.state(model, nnx.Param)``), or any pytree. NNX Variables are
        read as their values, so masks and labels have the structure ``nnx.Optimizer`` gives
        optax (``nnx.Optimizer(model, optax.adamw(..., mask=tags.mask(...)), wrt=nnx.Param)``).
      rules: ``{tag: rule or [rules]}``.

    Returns:
      A :class:`Tags`.

    Raises:
      ValueError: On a path that names no array, or a tag that selects nothing.
      TypeError: On a rule that is not a selector.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.LayerNorm()(nn.Dense(4)(x))
      ...         return nn.Dense(2)(x)
      >>> params = Net().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> params = px.orthogonal(params, "Dense_0/kernel")
      >>> params, state = px.split_state(params)
      >>> o = px.optim
      >>> tags = o.tags(params, {"no_decay": [o.biases, o.norm_scales, o.tokens],
      ...                        "frozen": "Dense_0/..."})
      >>> tags.paths("frozen")
      ['Dense_0/bias', 'Dense_0/kernel/original']
      >>> tags.paths("no_decay")
      ['Dense_0/bias', 'Dense_1/bias', 'LayerNorm_0/bias', 'LayerNorm_0/scale']
    """
    if not isinstance(rules, Mapping) or not rules:
        raise TypeError(
            f"`rules` must be a non-empty dict {{tag: rule or [rules]}}; got {rules!r}."
        )
    arrays, items, treedef = _arrays(params)
    if not arrays:
        raise ValueError("The tree has no arrays to tag.")
    sets: list[set[str]] = [set() for _ in arrays]
    for name, rule in rules.items():
        if not isinstance(name, str):
            raise TypeError(f"Tag names must be strings; got {name!r}.")
        selected: set[int] = set()
        for one in _rule_list(rule):
            selected |= _select(one, arrays, items, tag=name)
        if not selected:
            pool = [paths.format_path(p) for p, _ in items]
            raise ValueError(
                f"Tag {name!r} selects no array: none of its rules "
                f"({', '.join(paths.describe_where(r) for r in _rule_list(rule))}) matched. "
                f"{paths._listing('Paths', pool)} Remove the tag, or fix its rules."
            )
        for j in selected:
            sets[j].add(name)
    table = tuple(
        (paths.format_path(a.path), frozenset(s), a.state)
        for a, s in zip(arrays, sets, strict=True)
    )
    return Tags(tuple(rules), treedef, table)


def _rule_list(rule: Any) -> list[Any]:
    if isinstance(rule, list):
        return rule
    if isinstance(rule, tuple) and any(not isinstance(k, (str, int)) for k in rule):
        return list(rule)  # a tuple of rules, not a tuple of keys
    return [rule]


def _select(rule: Any, arrays: list[_Array], items: list[tuple[Any, Any]], tag: str) -> set[int]:
    paths.check_where(rule)
    if callable(rule) and not isinstance(rule, str):
        hits = {i for i, (p, leaf) in enumerate(items) if paths._call_predicate(rule, p, leaf)}
        return {j for j, a in enumerate(arrays) if a.item in hits and not a.state}
    wanted = paths._selector_keys(rule)
    below = wanted[-1] == "..."
    if below:
        wanted = wanted[:-1]
    out = set()
    for j, a in enumerate(arrays):
        item_keys = paths.path_keys(items[a.item][0])
        keys = paths.path_keys(a.path)
        if a.state:
            continue
        if below:
            hit = _prefix(wanted, keys)
        else:
            # the tensor, one array of a node, or a paramx.nnx tensor by its attribute name
            hit = any(_same(wanted, k) for k in (item_keys, keys, tensor_keys(a.path)))
        if hit:
            out.add(j)
    if out:
        return out
    shown = "/".join(str(k) for k in wanted) + ("/..." if below else "")
    existing = [paths.format_path(p) for p, _ in items]
    if not below and any(_prefix(wanted, paths.path_keys(a.path)) for a in arrays):
        raise ValueError(
            f"Tag {tag!r}: path {shown!r} is a subtree; write {shown + '/...'!r} to tag every "
            f"array below it."
        )
    inner = [paths.format_path(a.path) for a in arrays if not a.state]
    candidates = list(dict.fromkeys(existing + inner))  # a node's own path is in both
    close = difflib.get_close_matches(shown, candidates, n=5, cutoff=0.5)
    hint = paths._listing("Closest paths", close) if close else paths._listing("Paths", existing)
    raise ValueError(f"Tag {tag!r}: no array at path {shown!r}. {hint}")


def _same(wanted: tuple[Any, ...], keys: tuple[Any, ...]) -> bool:
    return len(wanted) == len(keys) and _prefix(wanted, keys)


def _prefix(wanted: tuple[Any, ...], keys: tuple[Any, ...]) -> bool:
    return len(keys) >= len(wanted) and all(
        w == k or (isinstance(w, str) and isinstance(k, int) and w == str(k))
        for w, k in zip(wanted, keys)
    )


# ----- optimizer state carry-over ----------------------------------------------------------


def carry_state(tx: Any, opt_state: Any, old_params: Any, new_params: Any) -> Any:
    """The optax state for ``new_params``, carried over from ``opt_state`` (for ``old_params``).

    After model surgery mid-training (:func:`paramx.remove_parametrizations`, registering a
    new parametrization, adding or dropping a layer), the optimizer's moments follow the
    tensors, as torch's follow a Parameter object that survives:

    * every subtree of the state shaped like the params (Adam's ``mu`` / ``nu``, a momentum
      trace, ``optax.masked`` / ``multi_transform`` inner states) is rebuilt for
      ``new_params`` by path: an array at the same path, with the same shape and dtype, keeps
      its moments;
    * a tensor's single original and the tensor are the same path: ``kernel.original``
      becomes ``kernel`` when a parametrization is removed, and ``kernel`` becomes
      ``kernel.original`` when one is registered; the moments go along when the shape and
      dtype are unchanged (with ``leave_parametrized=True`` the plain kernel thus gets the
      original's moments, as torch's ``original.set_(value)`` keeps the Parameter and its
      state);
    * everything else (new arrays, changed shapes, weight norm's ``original0`` /
      ``original1`` becoming one ``kernel``, a parametrization's new own arrays, arrays
      another group's mask now covers) gets the fresh value of ``tx.init(new_params)``;
    * counters and other state outside the params-shaped subtrees are kept.

    NNX. Modules change in place, so take ``old_params = nnx.state(model, nnx.Param)``
    before the surgery; Variables are read as their values (what ``nnx.Optimizer`` gives
    optax), and the result is a tree of arrays to write into a new optimizer's state::

        old = nnx.state(model, nnx.Param)
        paramx.nnx.remove_parametrizations(model.lin, "kernel")
        new_opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        carried = carry_state(tx, opt.opt_state, old, nnx.state(model, nnx.Param))
        jax.tree.map(lambda v, x: v.set_value(x), new_opt.opt_state, carried,
                     is_leaf=lambda v: isinstance(v, nnx.Variable))
        new_opt.step.set_value(opt.step.get_value())

    Args:
      tx: The optimizer for ``new_params`` (the same as before, or one with masks and labels
        rebuilt for the new tree). Its ``init(new_params)`` gives the fresh values and the
        structure of the result.
      opt_state: The state of the optimizer for ``old_params``.
      old_params: The params ``opt_state`` belongs to (the trainable half given to optax).
      new_params: The params after surgery.

    Returns:
      A state with the structure of ``tx.init(new_params)``.

    Raises:
      ValueError: If ``opt_state`` does not have the structure ``tx.init(old_params)`` would
        (another optimizer, or the params it was built for are not ``old_params``), naming
        where they differ.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import paramx as px
      >>> params = px.orthogonal({"w": jnp.eye(2), "b": jnp.zeros(2)}, "w")
      >>> params, state = px.split_state(params)
      >>> tx = optax.adam(0.1)
      >>> opt_state = tx.init(params)
      >>> grads = {"w": params["w"].replace(originals=(jnp.ones((2, 2)),)), "b": jnp.ones(2)}
      >>> _, opt_state = tx.update(grads, opt_state, params)
      >>> plain = px.remove_parametrizations(px.merge_state(params, state), "w")
      >>> new_state = px.optim.carry_state(tx, opt_state, params, plain)
      >>> new_state[0].mu["w"]  # kernel.original's moments, now the plain kernel's
      Array([[0.1, 0.1],
             [0.1, 0.1]], dtype=float32)
      >>> int(new_state[0].count)
      1
    """
    opt_state, old_params, new_params = pure(opt_state), pure(old_params), pure(new_params)
    fresh = tx.init(new_params)
    old_def: Any = jax.tree_util.tree_structure(old_params)
    new_def: Any = jax.tree_util.tree_structure(new_params)
    if old_def.num_leaves == 0 or new_def.num_leaves == 0:
        raise ValueError("`old_params` and `new_params` must hold arrays.")
    old_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(old_params)[0]]
    new_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(new_params)[0]]
    mapping = _path_map(old_paths, new_paths)
    return _walk(opt_state, fresh, old_def, new_def, mapping, ())


def _canonical(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A tensor's single ``original`` is the tensor: ``kernel.original`` (a paramx tree) and
    ``parametrizations/kernel/original`` (a paramx.nnx module's state) both read ``kernel``."""
    if path and isinstance(path[-1], GetAttrKey) and path[-1].name == "original":
        path = path[:-1]
    keys = paths.path_keys(path)
    if len(keys) >= 3 and keys[-3] == _NNX_CONTAINER and keys[-1] == "original":
        path = (*path[:-3], path[-2])
    return tuple(paths._plain_key(k) for k in path)


def _path_map(old: list[Any], new: list[Any]) -> list[int | None]:
    """For each new leaf, the index of the old leaf it continues (or None)."""
    by_path = {_canonical(p): i for i, p in enumerate(old)}
    return [by_path.get(_canonical(p)) for p in new]


def _flatten_up_to(treedef: Any, tree: Any) -> list[Any] | None:
    if treedef.num_nodes == 1:  # a lone array as params: never mistaken for a counter
        return None
    try:
        flat = list(treedef.flatten_up_to(tree))
    except (ValueError, TypeError):
        return None
    # A params-shaped subtree holds one array (or an empty node: optax's MaskedNode) per
    # array of the params; a tuple of params would otherwise match `optax.chain`'s tuple of
    # states, whose entries are whole states.
    if any(_num_nodes(x) > 1 for x in flat):
        return None
    return flat


def _num_nodes(x: Any) -> int:
    treedef: Any = jax.tree_util.tree_structure(x)
    return int(treedef.num_nodes)


def _same_array(a: Any, b: Any) -> bool:
    return (
        hasattr(a, "shape")
        and hasattr(b, "shape")
        and tuple(a.shape) == tuple(b.shape)
        and jnp.dtype(a.dtype) == jnp.dtype(b.dtype)
    )


def _walk(
    old: Any, fresh: Any, old_def: Any, new_def: Any, mapping: list[int | None], at: tuple[Any, ...]
) -> Any:
    fresh_flat = _flatten_up_to(new_def, fresh)
    if fresh_flat is not None:
        old_flat = _flatten_up_to(old_def, old)
        if old_flat is None:
            raise ValueError(
                f"At {_where(at)} of the optimizer state, `tx.init(new_params)` holds a tree "
                f"shaped like the params, but `opt_state` holds no tree shaped like "
                f"`old_params`: the state was not built for `old_params` by this optimizer."
            )
        out = [
            old_flat[i] if i is not None and _same_array(old_flat[i], f) else f
            for i, f in zip(mapping, fresh_flat, strict=True)
        ]
        return new_def.unflatten(out)
    fresh_children, fresh_node = _one_level(fresh)
    old_children, old_node = _one_level(old)
    if fresh_node is None:  # a leaf: a counter, a hyperparameter, ...
        if old_node is None and _same_array(old, fresh):
            return old
        if old_node is None and not hasattr(fresh, "shape") and type(old) is type(fresh):
            return old
        return fresh
    if old_node != fresh_node:
        raise ValueError(
            f"At {_where(at)}, the optimizer state does not have the structure "
            f"`tx.init(new_params)` gives ({_node_text(fresh)} in the new state, "
            f"{_node_text(old)} in `opt_state`). Pass the state of the same optimizer, built "
            f"for `old_params`."
        )
    keys = [k for k, _ in jax.tree_util.tree_flatten_with_path(fresh, is_leaf=_child(fresh))[0]]
    new = [
        _walk(o, f, old_def, new_def, mapping, (*at, *k))
        for o, f, k in zip(old_children, fresh_children, keys, strict=True)
    ]
    return fresh_node.unflatten(new)


def _child(root: Any) -> Callable[[Any], bool]:
    return lambda x: x is not root


def _one_level(x: Any) -> tuple[list[Any], Any]:
    """The children of ``x`` and its one-level treedef; ``(…, None)`` for a leaf."""
    children, node_def = jax.tree_util.tree_flatten(x, is_leaf=_child(x))
    node: Any = node_def
    if node.num_nodes == 1 and node.num_leaves == 1:
        return [x], None
    return children, node


def _where(at: tuple[Any, ...]) -> str:
    return "".join(str(k) for k in at) or "the root"


def _node_text(x: Any) -> str:
    return type(x).__name__ if not isinstance(x, np.ndarray | jax.Array) else "an array"
