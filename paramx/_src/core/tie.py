"""Tied and derived parameters: one trained array read at several paths.

``tie(tree, "decoder/kernel", "encoder/kernel", transform=jnp.transpose)`` replaces the leaf at
``decoder/kernel`` by a :class:`Tied` marker. The marker is a pytree node with no array leaves:
its static part (its pytree aux data) holds where the source is and the transform. So the
optimizer, the gradients, ``split_state`` and checkpoints all see one copy of the array, the
source's; :func:`paramx.materialize` computes every other leaf first, then fills each tied leaf
with ``transform(value at the source)``. Since the tied leaf reads the source's *computed*
value, gradients from every use of the array are summed into the source's original by
autodiff, and a tie composes with parametrizations (tie to an orthogonal kernel: the tied leaf
is the transpose of the orthogonal value).

The source is stored relative to the tied leaf (how many levels up from the leaf's dict, then
which keys down), so the tie still holds when the tree is put under another key
(``{"params": params}``), split with ``split_state``, or transferred to a fresh tree of the
same model.

A tied leaf with more leading axes than ``transform(source)`` reads the source broadcast along
them: a stacked kernel (``nn.scan`` / ``nnx.vmap`` layers) whose layers all share one array.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import chain as ch
from paramx._src.core import paths
from paramx._src.core.node import is_node

Keys = tuple[Any, ...]


class _TieAux(NamedTuple):
    """A tie's static part, compared and hashed by value under jit."""

    up: int  # levels up from the tied leaf's own container
    down: tuple[Any, ...]  # keys from there to the source
    transform: Callable[[Any], Any] | None
    shape: tuple[int, ...]  # the tied leaf's shape and dtype
    dtype: str
    broadcast: int = 0  # how many leading axes of `shape` the source's value is broadcast along


@jax.tree_util.register_pytree_with_keys_class
class Tied:
    """A leaf that reads another leaf's value (through a transform): a tied parameter.

    Put in the tree by :func:`paramx.tie`; it holds no array, so optimizers, gradients and
    checkpoints see only the source's array. :func:`paramx.materialize` replaces it by
    ``transform(value at the source)``, broadcast along extra leading (stack) axes.

    Attributes:
      source: The source's path relative to the tied leaf's container (``"../encoder/kernel"``:
        one level up, then ``encoder/kernel``; ``"kernel"``: a sibling).
      transform: The function applied to the source's value (``None``: the value itself).
      shape: The tied leaf's shape.
      dtype: The tied leaf's dtype.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = {"enc": {"w": jnp.ones((2, 3))}, "dec": {"w": jnp.zeros((3, 2))}}
      >>> tree = px.tie(tree, "dec/w", "enc/w", transform=jnp.transpose)
      >>> tree["dec"]["w"]
      Tied(source='../enc/w', transform=transpose, float32[3, 2])
      >>> len(jax.tree.leaves(tree))  # one array: the source
      1
    """

    __slots__ = ("_aux",)

    def __init__(
        self,
        up: int,
        down: Sequence[Any],
        transform: Callable[[Any], Any] | None,
        shape: Sequence[int],
        dtype: Any,
        broadcast: int = 0,
    ):
        self._aux = _TieAux(
            int(up),
            tuple(down),
            transform,
            tuple(int(d) for d in shape),
            jnp.dtype(dtype).name,
            int(broadcast),
        )

    @property
    def source(self) -> str:
        return "../" * self._aux.up + "/".join(str(k) for k in self._aux.down)

    @property
    def transform(self) -> Callable[[Any], Any] | None:
        return self._aux.transform

    @property
    def shape(self) -> tuple[int, ...]:
        return self._aux.shape

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self._aux.dtype)

    def target_shape(self, value_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape a value of ``value_shape`` (the transformed source) is broadcast to: the
        tied leaf's. Under ``jax.vmap`` over the tree's stack axis the value lacks that axis,
        and so must the result: only the axes the tie broadcasts along are added then."""
        n = self._aux.broadcast
        if len(self._aux.shape) - len(value_shape) > n:
            return (*self._aux.shape[:n], *value_shape)
        return self._aux.shape

    def source_keys(self, at: Keys) -> Keys:
        """The source's absolute keys, for a tied leaf at keys ``at``."""
        base = len(at) - 1 - self._aux.up
        if base < 0:
            raise ValueError(
                f"The tied leaf at {paths._show_keys(at)} reads {self.source!r}, which goes above "
                f"the root of this tree: give the tree the tie was made in (or one that holds it)."
            )
        return (*at[:base], *self._aux.down)

    def tree_flatten_with_keys(self) -> tuple[list[Any], _TieAux]:
        return [], self._aux

    def tree_flatten(self) -> tuple[tuple[()], _TieAux]:
        return (), self._aux

    @classmethod
    def tree_unflatten(cls, aux: _TieAux, children: Any) -> Tied:
        node = object.__new__(cls)
        node._aux = aux
        return node

    def __repr__(self) -> str:
        return (
            f"Tied(source={self.source!r}, transform={_fn_name(self.transform)}, "
            f"{self._aux.dtype}{list(self.shape)})"
        )

    def refusal(self, shown: str, what: str) -> str:
        """Why selection cannot give this leaf (read by ``paths.select``)."""
        return (
            f"The {what} at {shown!r} is tied to {self.source!r} (relative to its container; "
            f"paramx.tie) and holds no array of its own. `paramx.untie(tree, {shown!r})` gives "
            f"it its own array again."
        )

    def _not_an_array(self) -> TypeError:
        return TypeError(
            f"A paramx.Tied leaf (reading {self.source!r}) was used as an array. It holds no "
            f"array: `paramx.materialize(tree)` fills it with the source's value, and the "
            f"model reads that plain tree."
        )

    def __jax_array__(self) -> Any:
        raise self._not_an_array()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._not_an_array()


def is_tied(x: Any) -> bool:
    return isinstance(x, Tied)


def _fn_name(fn: Any) -> str:
    if fn is None:
        return "None"
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def _is_leaf(x: Any) -> bool:
    return is_tied(x) or is_node(x) or paths.is_box(x)


def _flat(tree: Any) -> tuple[list[tuple[Keys, Any, Any]], Any]:
    """``(keys, box, leaf)`` per leaf (a tie, a node and a box count as one), and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return [(paths.path_keys(p), *paths.unbox(x)) for p, x in flat], treedef


def has_ties(tree: Any) -> bool:
    """Whether ``tree`` holds a :class:`Tied` leaf (cheap: one flatten, no key paths)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: is_tied(x) or paths.is_box(x))
    return any(is_tied(paths.unbox(x)[1]) for x in leaves)


def _closest(wanted: Keys, existing: list[Keys]) -> str:
    shown = [paths._show_keys(k) for k in existing]
    close = difflib.get_close_matches(paths._show_keys(wanted), shown, n=5, cutoff=0.5)
    if close:
        return paths._listing("Closest existing paths", close)
    return paths._listing("Existing paths", shown)


def _spec(leaf: Any, where: str) -> jax.ShapeDtypeStruct:
    if is_tied(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    if is_node(leaf):
        return ch.value_shape(leaf, where)
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))


def _describe(spec: Any) -> str:
    return f"{jnp.dtype(spec.dtype).name}{list(spec.shape)}"


def _fits(value: Any, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether ``value`` (a value or a spec) is ``shape``/``dtype``, up to leading stack axes."""
    vshape = tuple(value.shape)
    n = len(shape) - len(vshape)
    return jnp.dtype(value.dtype) == jnp.dtype(dtype) and n >= 0 and shape[n:] == vshape


# ----- public --------------------------------------------------------------------------------


def tie(
    tree: Any,
    where: paths.Where,
    source: str | Sequence[Any],
    *,
    transform: Callable[[Any], Any] | None = None,
) -> Any:
    """Ties leaves to another leaf: they read its value (through ``transform``); returns a tree.

    The tied leaf is replaced by a :class:`paramx.Tied` marker that holds no array, so the
    optimizer, the gradients and checkpoints hold one copy, the source's, and the gradient from
    every use of the array is summed into it. :func:`paramx.materialize` fills the tied leaf
    with ``transform(value at source)``, computed after every parametrized tensor: a tie to a
    parametrized source reads the constrained value (the transpose of an orthogonal kernel).
    The tie is the tree analogue of assigning one ``nn.Parameter`` to two modules in torch
    (``decoder.weight = encoder.weight``), plus a transform; :func:`paramx.untie` breaks it.

    Args:
      tree: A tree (plain or registered). It is not modified.
      where: The leaf (or leaves, with a predicate) to tie: a path, a tuple of keys or a
        predicate ``(key_path, leaf) -> bool``. A selected leaf must be a plain array (not
        parametrized, not tied already).
      source: The path (or tuple of keys) of the leaf to read: a plain array, a parametrized
        tensor or a tied leaf (ties of ties are followed).
      transform: A function of the source's value giving the tied leaf's value (``None``: the
        value itself), e.g. ``jnp.transpose``. It must be hashable (functions are: define it
        once, not as a new lambda in each step) and give the tied leaf's dtype and shape, or
        that shape without some leading axes: the value is then broadcast along them (the
        layers of a stacked kernel sharing one array).

    Returns:
      The new tree.

    Raises:
      ValueError: If ``source`` is missing (naming the closest paths), the shapes do not match
        (naming both paths), a selected leaf is parametrized or tied, or the tie would make a
        cycle.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> params = {"encoder": {"kernel": jnp.eye(3)[:, :2]},
      ...           "decoder": {"kernel": jnp.zeros((2, 3))}}
      >>> params = px.orthogonal(params, "encoder/kernel")
      >>> params = px.tie(params, "decoder/kernel", "encoder/kernel", transform=jnp.transpose)
      >>> plain = px.materialize(params)
      >>> bool(jnp.allclose(plain["decoder"]["kernel"], plain["encoder"]["kernel"].T))
      True
      >>> # one trained array: the orthogonal original (plus orthogonal's state)
      >>> px.split_state(params)[0]["decoder"]["kernel"]
      Tied(source='../encoder/kernel', transform=transpose, float32[2, 3])
    """
    if transform is not None and not callable(transform):
        raise TypeError(f"`transform` must be a function or None; got {transform!r}.")
    if callable(source) or not isinstance(source, str | tuple | list):
        raise TypeError(
            f"`source` must be the path of one leaf (a '/'-joined string or a tuple of keys); "
            f"got {type(source).__name__}: {source!r}."
        )
    paths.check_where(where)
    try:
        hash(transform)
    except TypeError:
        raise TypeError(
            f"`transform` must be hashable (it is part of the tree's structure under jit); "
            f"{_fn_name(transform)} is not. Use a function or a functools.partial of hashable "
            f"arguments."
        ) from None
    flat, treedef = _flat(tree)
    index = {keys: i for i, (keys, _, _) in enumerate(flat)}
    src_keys = paths._selector_keys(source)
    src_keys = _find(flat, src_keys, "source")
    src_shown = paths._show_keys(src_keys)
    src_spec = _spec(flat[index[src_keys]][2], src_shown)
    try:
        out_spec = jax.eval_shape(transform or (lambda x: x), src_spec)
    except Exception as e:
        raise ValueError(
            f"Cannot tie to {src_shown}: the transform {_fn_name(transform)} fails on its value "
            f"({_describe(src_spec)}): {type(e).__name__}: {e}"
        ) from e

    if callable(where) and not isinstance(where, str):
        targets = [
            i
            for i, (keys, box, leaf) in enumerate(flat)
            if keys != src_keys
            and not is_tied(leaf)
            and not is_node(leaf)
            and paths._call_predicate(where, _key_path(tree, keys), leaf)
        ]
        if not targets:
            raise ValueError(f"The {paths.describe_where(where)} selected no plain leaf to tie.")
    else:
        targets = [index[_find(flat, paths._selector_keys(where), "leaf to tie")]]

    new = [paths.rebox(box, leaf) for _, box, leaf in flat]
    for i in targets:
        keys, box, leaf = flat[i]
        shown = paths._show_keys(keys)
        if keys == src_keys:
            raise ValueError(f"Cannot tie {shown} to itself.")
        if is_tied(leaf):
            now = paths._show_keys(leaf.source_keys(keys))
            raise ValueError(
                f"The leaf at {shown} is tied already (to {now}). Untie it first "
                f"(`paramx.untie(tree, {shown!r})`) to tie it elsewhere."
            )
        if is_node(leaf):
            raise ValueError(
                f"The leaf at {shown} is parametrized ({', '.join(leaf.chain_names())}); a tie "
                f"replaces its array, so its originals would be lost. Remove the parametrization "
                f"first (`paramx.remove_parametrizations`), or register it on the source "
                f"{src_shown}: the tied leaf then reads the constrained value."
            )
        _check_cycle(flat, index, src_keys, keys)
        spec = _spec(leaf, shown)
        if not _fits(out_spec, tuple(spec.shape), spec.dtype):
            raise ValueError(
                f"Cannot tie {shown} to {src_shown}: the leaf at {shown} is {_describe(spec)}, "
                f"but the transform {_fn_name(transform)} of the source "
                f"({_describe(src_spec)}) gives {_describe(out_spec)}. Give a transform that "
                f"maps the source to the leaf's shape and dtype (e.g. jnp.transpose); a value "
                f"without the leaf's leading stack axes is broadcast along them."
            )
        common = 0
        while common < min(len(keys), len(src_keys)) and keys[common] == src_keys[common]:
            common += 1
        up, down = len(keys) - 1 - common, src_keys[common:]
        broadcast = len(spec.shape) - len(out_spec.shape)
        tied = Tied(up, down, transform, spec.shape, spec.dtype, broadcast)
        new[i] = paths.rebox(box, tied)
    return jax.tree_util.tree_unflatten(treedef, new)


def _key_path(tree: Any, keys: Keys) -> Any:
    for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]:
        if paths.path_keys(path) == keys:
            return path
    return keys


def _find(flat: list[tuple[Keys, Any, Any]], wanted: Keys, what: str) -> Keys:
    """The keys of the leaf ``wanted`` names (a string key also names a list index)."""
    for keys, _, _ in flat:
        if len(keys) == len(wanted) and all(paths._key_matches(w, k) for w, k in zip(wanted, keys)):
            return keys
    shown = paths._show_keys(wanted)
    below = [
        paths._show_keys(k)
        for k, _, _ in flat
        if len(k) > len(wanted) and all(paths._key_matches(w, x) for w, x in zip(wanted, k))
    ]
    if below:
        raise ValueError(
            f"The {what} {shown!r} is a subtree, not a leaf: it holds {', '.join(below[:5])}"
            f"{', ...' if len(below) > 5 else ''}. Give the path of one leaf."
        )
    retyped = paths.retyped_keys(wanted, [k for k, _, _ in flat], what)
    if retyped:
        raise ValueError(retyped)
    raise ValueError(f"No {what} at path {shown!r}. {_closest(wanted, [k for k, _, _ in flat])}")


def _check_cycle(
    flat: list[tuple[Keys, Any, Any]], index: dict[Keys, int], start: Keys, target: Keys
) -> None:
    """Follows the ties from ``start``; raises if they reach ``target`` (or loop)."""
    seen = [target]
    keys = start
    while True:
        if keys in seen:
            chain = " -> ".join(paths._show_keys(k) for k in (*seen, keys))
            raise ValueError(f"Tying would make a cycle of ties: {chain}. A tie needs a source.")
        seen.append(keys)
        leaf = flat[index[keys]][2] if keys in index else None
        if not isinstance(leaf, Tied):
            return
        keys = leaf.source_keys(keys)


def fill(plain: Any, value_of: Callable[[Keys, Any], Any] | None = None) -> Any:
    """``plain`` with each tied leaf replaced by the transformed value of its source.

    Called by :func:`paramx.materialize` after every other leaf is computed (``plain`` is then
    a plain tree but for its ties). ``value_of(keys, leaf)`` gives a non-tied source's value
    (default: the leaf itself). Ties of ties are followed; a missing source or a cycle raises.
    """
    if not has_ties(plain):
        return plain
    flat, treedef = _flat(plain)
    index = {keys: i for i, (keys, _, _) in enumerate(flat)}
    values: dict[Keys, Any] = {}

    def resolve(keys: Keys, stack: tuple[Keys, ...]) -> Any:
        if keys in values:
            return values[keys]
        leaf = flat[index[keys]][2]
        if not is_tied(leaf):
            value = leaf if value_of is None else value_of(keys, leaf)
        else:
            if keys in stack:
                chain = " -> ".join(paths._show_keys(k) for k in (*stack, keys))
                raise ValueError(f"The ties form a cycle: {chain}. Untie one of them.")
            src = leaf.source_keys(keys)
            if src not in index:
                raise ValueError(
                    f"The tied leaf at {paths._show_keys(keys)} reads {paths._show_keys(src)}, "
                    f"which this tree does not have. "
                    f"{_closest(src, [k for k, _, x in flat if not is_tied(x)])} Give the tree "
                    f"the tie was made in (the same root and layout)."
                )
            source_value = resolve(src, (*stack, keys))
            value = source_value if leaf.transform is None else leaf.transform(source_value)
            if not _fits(value, leaf.shape, leaf.dtype):
                raise ValueError(
                    f"The tied leaf at {paths._show_keys(keys)} is {leaf.dtype.name}"
                    f"{list(leaf.shape)}, but the transform {_fn_name(leaf.transform)} of its "
                    f"source {paths._show_keys(src)} ({_describe(source_value)}) now gives "
                    f"{_describe(value)}. The source changed since the tie was made; tie again."
                )
            if tuple(value.shape) != leaf.shape:
                value = jnp.broadcast_to(value, leaf.target_shape(value.shape))
        values[keys] = value
        return value

    out = []
    for keys, box, leaf in flat:
        out.append(paths.rebox(box, resolve(keys, ()) if is_tied(leaf) else leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def fill_shared(tree: Any, doing: str) -> Any:
    """``tree`` with each tied leaf replaced by its source's own array, when every tie is a
    plain share (no transform, a source that is an array, not a parametrized tensor): torch's
    shared ``nn.Parameter``, which its ``state_dict`` lists under each name. Else a ValueError
    naming the tied leaf, for ``doing``."""
    if not has_ties(tree):
        return tree
    for keys, _, leaf in _flat(tree)[0]:
        if is_tied(leaf) and leaf.transform is not None:
            raise ValueError(
                f"{doing}: the leaf at {paths._show_keys(keys)} is tied to "
                f"{paths._show_keys(leaf.source_keys(keys))} through {_fn_name(leaf.transform)}; "
                f"torch shares parameters, not values through a transform. Untie it first "
                f"(`paramx.untie(tree, {paths._show_keys(keys)!r})`) to give it its own array."
            )

    def value_of(keys: Keys, leaf: Any) -> Any:
        if is_node(leaf):
            raise ValueError(
                f"{doing}: a leaf is tied to the parametrized tensor at {paths._show_keys(keys)}, "
                f"whose value is computed; torch shares raw parameters. Untie the tied leaf "
                f"first (`paramx.untie`) to give it its own array."
            )
        return leaf

    return fill(tree, value_of)


def restore_ties(template: Any, filled: Any, read: Any, doing: str) -> Any:
    """The ties of ``template`` put back into ``read``: ``filled`` is ``template`` after
    :func:`fill_shared`, ``read`` that tree with the arrays a reader replaced. A tied leaf whose
    array was read must hold its source's (torch's shared parameter); else a ValueError."""
    if not has_ties(template):
        return read
    t_flat, treedef = _flat(template)
    f_flat, r_flat = _flat(filled)[0], _flat(read)[0]
    index = {keys: i for i, (keys, _, _) in enumerate(t_flat)}
    out = []
    for i, (keys, box, leaf) in enumerate(t_flat):
        if not is_tied(leaf):
            out.append(paths.rebox(r_flat[i][1], r_flat[i][2]))
            continue
        src, seen = leaf.source_keys(keys), {keys}
        while is_tied(t_flat[index[src]][2]) and src not in seen:
            seen.add(src)
            src = t_flat[index[src]][2].source_keys(src)
        value, source_value = r_flat[i][2], r_flat[index[src]][2]
        if value is not f_flat[i][2] and not np.array_equal(
            np.asarray(value), np.asarray(source_value)
        ):
            raise ValueError(
                f"{doing}: the leaf at {paths._show_keys(keys)} is tied to "
                f"{paths._show_keys(src)} (paramx.tie), but the checkpoint holds other values for "
                f"them. Untie the template (`paramx.untie`) to read them apart."
            )
        out.append(paths.rebox(box, leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def untie(tree: Any, where: paths.Where | None = None) -> Any:
    """Gives tied leaves their own array again: the current tied value; returns a new tree.

    The torch analogue is giving a module its own ``nn.Parameter`` back
    (``decoder.weight = nn.Parameter(encoder.weight.detach().clone())``): from then on the two
    arrays train apart. The value is ``transform(value at the source)`` as
    :func:`paramx.materialize` would compute it (a parametrized source's state is read as it
    is, not updated).

    Args:
      tree: A tree with ties (a registered tree, holding its state if parametrized sources
        need it). It is not modified.
      where: A path, a tuple of keys or a predicate over tied leaves; ``None`` (the default)
        unties every tied leaf.

    Returns:
      The new tree.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.tie({"a": jnp.arange(2.0), "b": jnp.zeros(2)}, "b", "a", transform=jnp.exp)
      >>> px.untie(tree)["b"]
      Array([1.       , 2.7182817], dtype=float32)
      >>> len(jax.tree.leaves(px.untie(tree)))
      2
    """
    flat, treedef = _flat(tree)
    tied = [i for i, (_, _, leaf) in enumerate(flat) if is_tied(leaf)]
    if where is None:
        chosen = tied
    elif callable(where) and not isinstance(where, str):
        chosen = [
            i for i in tied if paths._call_predicate(where, _key_path(tree, flat[i][0]), flat[i][2])
        ]
        if not chosen:
            raise ValueError(f"The {paths.describe_where(where)} selected no tied leaf.")
    else:
        paths.check_where(where)
        keys = _find(flat, paths._selector_keys(where), "tied leaf")
        chosen = [i for i in tied if flat[i][0] == keys]
        if not chosen:
            found = [paths._show_keys(flat[i][0]) for i in tied]
            raise ValueError(
                f"The leaf at {paths._show_keys(keys)} is not tied; nothing to untie. "
                f"{paths._listing('Tied leaves', found) if found else 'The tree has no ties.'}"
            )

    filled = fill(tree, _value_of)
    new_flat, _ = _flat(filled)
    out = [paths.rebox(box, leaf) for _, box, leaf in flat]
    for i in chosen:
        out[i] = paths.rebox(flat[i][1], new_flat[i][2])
    return jax.tree_util.tree_unflatten(treedef, out)


def ties(tree: Any) -> dict[str, str]:
    """Each tied leaf's path and the path of the leaf it reads, for looking at a tree.

    Args:
      tree: Any pytree.

    Returns:
      ``{tied path: source path}`` (absolute paths, ``/``-joined), in tree order.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.tie({"a": jnp.ones(2), "b": jnp.ones(2)}, "b", "a")
      >>> px.ties(tree)
      {'b': 'a'}
    """
    return {
        paths._show_keys(keys): paths._show_keys(leaf.source_keys(keys))
        for keys, _, leaf in _flat(tree)[0]
        if is_tied(leaf)
    }


def describe(tree: Any) -> list[tuple[str, str]]:
    """``(path, "source (transform)")`` for each tied leaf, for tables."""
    out = []
    for keys, _, leaf in _flat(tree)[0]:
        if is_tied(leaf):
            how = "" if leaf.transform is None else f" ({_fn_name(leaf.transform)})"
            out.append((paths._show_keys(keys), paths._show_keys(leaf.source_keys(keys)) + how))
    return out


def tied_at(tree: Any, where: Any) -> Keys | None:
    """The keys of the tied leaf that ``where`` names exactly (a path), or None."""
    if where is None or (callable(where) and not isinstance(where, str)):
        return None
    try:
        wanted = paths._selector_keys(where)
    except Exception:
        return None
    for keys, _, leaf in _flat(tree)[0]:
        if is_tied(leaf) and len(keys) == len(wanted):
            if all(paths._key_matches(w, k) for w, k in zip(wanted, keys)):
                return keys
    return None


def refuse_tied(tree: Any, where: Any, doing: str) -> None:
    """Raises a clear error when ``where`` (a path) names a tied leaf, for functions that work
    on parametrized tensors (their selection does not see ties)."""
    keys = tied_at(tree, where)
    if keys is None:
        return
    [leaf] = [x for k, _, x in _flat(tree)[0] if k == keys]
    shown = paths._show_keys(keys)
    raise ValueError(
        f"The leaf at {shown} is tied to {paths._show_keys(leaf.source_keys(keys))} "
        f"(paramx.tie), not parametrized; {doing}. `paramx.untie(tree, {shown!r})` gives it its "
        f"own array again."
    )


def transfer_ties(from_tree: Any, to_tree: Any, where: Any) -> Any:
    """``to_tree`` with the ties of ``from_tree`` (all, or the one ``where`` names) at the same
    paths; each target leaf must exist and have the tied leaf's shape and dtype."""
    src = [(k, leaf) for k, _, leaf in _flat(from_tree)[0] if is_tied(leaf)]
    if where is not None:
        keys = tied_at(from_tree, where)
        src = [(k, leaf) for k, leaf in src if k == keys]
    if not src:
        return to_tree
    flat, treedef = _flat(to_tree)
    index = {keys: i for i, (keys, _, _) in enumerate(flat)}
    out = [paths.rebox(box, leaf) for _, box, leaf in flat]
    for keys, leaf in src:
        shown = paths._show_keys(keys)
        if keys not in index:
            raise ValueError(
                f"Cannot transfer the tie at {shown}: the target has no leaf there. "
                f"{_closest(keys, list(index))}"
            )
        target = flat[index[keys]][2]
        if not is_tied(target):
            spec = _spec(target, shown)
            if tuple(spec.shape) != leaf.shape or jnp.dtype(spec.dtype) != leaf.dtype:
                raise ValueError(
                    f"Cannot transfer the tie at {shown}: the target's leaf is {_describe(spec)}, "
                    f"the tied leaf is {leaf.dtype.name}{list(leaf.shape)}."
                )
        out[index[keys]] = paths.rebox(flat[index[keys]][1], leaf)
    result = jax.tree_util.tree_unflatten(treedef, out)
    check(result)
    return result


def check(tree: Any) -> None:
    """Raises if a tie of ``tree`` reads a missing leaf, makes a cycle or no longer fits."""
    if has_ties(tree):
        jax.eval_shape(lambda t: fill(t, _value_of), tree)


def _value_of(keys: Keys, leaf: Any) -> Any:
    """A source's value: a parametrized tensor's computed value, or the leaf itself."""
    return ch.node_value(leaf, where=paths._show_keys(keys))[0] if is_node(leaf) else leaf
