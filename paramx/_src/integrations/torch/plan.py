"""The plan: every array of a template tree with the torch key that holds it and its layout maps.

:func:`tensors` walks a tree into :class:`Tensor` records (Flax path, torch name, value shape,
layout); :func:`plan` lists a tensor's :class:`Entry` items: the plain array, or a
``Parametrized`` node's originals and its links' arrays as each parametrization declares them
through the torch protocol (``protocol.py``). Reading and writing both follow the plan.

Examples:
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> from paramx._src.integrations.torch.keys import Names
  >>> tree = px.spectral_norm({"fc": {"kernel": jnp.ones((3, 2))}}, "fc/kernel")
  >>> [t] = tensors(tree, Names(None), {})
  >>> for e in plan(t, legacy=False):
  ...     print(e.torch_key, e.torch_shape)
  fc.parametrizations.weight.original (2, 3)
  fc.parametrizations.weight.0._u (2,)
  fc.parametrizations.weight.0._v (3,)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from paramx._src.core import chain as ch
from paramx._src.core import paths
from paramx._src.core.node import is_node
from paramx._src.integrations.torch import protocol as proto
from paramx._src.integrations.torch.keys import (
    LEGACY_SUFFIXES,
    PARAMETRIZATIONS,
    Names,
    join,
    torch_name,
)
from paramx._src.integrations.torch.layouts import Layout, default_layout, make_layout
from paramx._src.integrations.torch.modules import listing


@dataclasses.dataclass(frozen=True)
class Entry:
    """One array of a template leaf and the torch key holding it."""

    torch_key: str
    label: str  # what it is inside the paramx leaf, for messages
    where: tuple[Any, ...]  # ("leaf",) | ("orig", i) | ("params" | "state", link, keys)
    template: Any
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    rule: str
    torch_shape: tuple[int, ...]  # the shape torch's array must have
    hint: str = ""  # for a generic entry: the hook that would declare it


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One template leaf: where it is, what torch calls it, and the keys it needs."""

    index: int
    flax_path: str
    module: tuple[str, ...]  # torch module components
    name: str  # torch tensor name
    leaf: Any
    shape: tuple[int, ...]  # the tensor's value (what torch calls `<module>.<name>`)
    layout: Layout
    keys: tuple[str, ...]  # the leaf's key path in the tree

    @property
    def plain_key(self) -> str:
        return join(self.module, self.name)

    @property
    def prefix(self) -> tuple[str, ...]:
        return (*self.module, PARAMETRIZATIONS, self.name)

    @property
    def declared_legacy(self) -> tuple[str, ...] | None:
        """The legacy suffixes the tensor's lone parametrization declares, or None."""
        if not is_node(self.leaf):
            return None
        return proto.legacy_suffixes(self.leaf.chain, len(self.leaf.originals))

    @property
    def legacy_keys(self) -> tuple[str, ...]:
        """The legacy keys this tensor reads (torch's ``weight_g``/``weight_v`` by default)."""
        suffixes = self.declared_legacy or LEGACY_SUFFIXES
        return tuple(join(self.module, self.name + s) for s in suffixes)


NNX_PARTS = ("original", "params", "state")


def refuse_nnx_layout(keys: tuple[str, ...], shown: str) -> None:
    """A plain tree laid out as a paramx.nnx module's state (``parametrizations/<name>/...``,
    from ``nnx.to_pure_dict`` say) would give keys torch rejects: refuse it."""
    for n in range(len(keys) - 2):
        if keys[n] == PARAMETRIZATIONS and keys[n + 2].startswith(NNX_PARTS):
            raise ValueError(
                f"The leaf at {shown} is laid out as the state of a paramx.nnx module "
                f"(parametrizations/<name>/original, .../state/<i>/...), which does not say "
                f"which parametrizations produced it. Pass the NNX module itself (or "
                f"nnx.merge(graphdef, state)) to the interop functions."
            )


def value_shape(leaf: Any, where: str) -> tuple[int, ...]:
    """The shape of the tensor a leaf stands for (a node's value, evaluated abstractly)."""
    if not is_node(leaf):
        if not hasattr(leaf, "shape"):
            raise ValueError(
                f"The leaf at {where} is a {type(leaf).__name__}, not an array; a tree for torch "
                f"interop holds arrays and paramx.Parametrized nodes only."
            )
        return tuple(leaf.shape)
    stack = tuple(getattr(leaf, "batch_shape", ()))
    if stack:
        raise ValueError(
            f"The tensor at {where} is a stack of {'x'.join(map(str, stack))} tensors (layers "
            f"from nn.scan, nn.vmap or nnx.vmap, or registered with batch_axes); a torch "
            f"state_dict holds one tensor per layer, so stacks have no torch keys. Convert one "
            f"layer at a time (index the stack: jax.tree.map(lambda x: x[i], ...)), with "
            f"`modules=` naming each layer's torch module."
        )
    try:
        return tuple(jax.eval_shape(lambda n: ch.node_value(n)[0], leaf).shape)
    except ValueError as e:
        raise ValueError(
            f"The tensor at {where} cannot be evaluated, and torch interop needs its shape: {e} "
            f"Pass the full registered tree (paramx.merge_state(params, state)), not the "
            f"trainable half from paramx.split_state."
        ) from e


def tensors(
    tree: Any,
    names: Names,
    layouts: Mapping[str, str],
    renames: Mapping[tuple[str, ...], str] | None = None,
) -> list[Tensor]:
    """One :class:`Tensor` per leaf of ``tree``; ``renames`` gives some leaves (by key path)
    their torch tensor name."""
    leaves = paths.leaves_with_paths(tree)
    out: list[Tensor] = []
    used_layouts: set[str] = set()
    owner: dict[str, str] = {}
    stacked = _stacked_modules(leaves)
    for i, (path, leaf) in enumerate(leaves):
        keys = tuple(str(k) for k in paths.path_keys(path))
        shown = paths.format_path(path)
        if not keys:
            raise ValueError("The tree is a single array; give a tree of modules, e.g. params.")
        refuse_nnx_layout(keys, shown)
        module = names.torch_module(keys[:-1])
        name = renames[keys] if renames and keys in renames else torch_name(keys[-1])
        tname = join(module, name)
        if tname in owner:
            raise ValueError(
                f"Two template leaves, {owner[tname]} and {shown}, both map to the torch tensor "
                f"{tname!r}; fix `modules=` so that each Flax module has its own torch name."
            )
        owner[tname] = shown
        shape = value_shape(leaf, shown)
        module_name = ".".join(module)
        if name == "weight" and module_name in layouts:
            layout_name = layouts[module_name]
            used_layouts.add(module_name)
        else:
            layout_name = default_layout(keys[-1], len(shape))
            if keys[:-1] in stacked and keys[-1] == "kernel":
                bias = stacked[keys[:-1]]
                raise ValueError(
                    f"The kernel at {shown} {shape} comes with a bias of shape {bias}, and a "
                    f"torch Linear or Conv bias has one axis: this is a stack of "
                    f"{'x'.join(map(str, bias[:-1]))} layers (nn.scan, nn.vmap, nnx.vmap), or a "
                    f"DenseGeneral with several feature axes, and has no torch keys (read as a "
                    f"conv weight, it would be transposed wrongly). Convert one layer at a time "
                    f"(index the stack: jax.tree.map(lambda x: x[i], ...)), with `modules=` "
                    f"naming each layer's torch module; or name the weight's layout in "
                    f"`layouts=` if it is one torch tensor."
                )
        layout = make_layout(layout_name, len(shape), shown)
        out.append(Tensor(i, shown, module, name, leaf, shape, layout, keys))
    unused = sorted(set(layouts) - used_layouts)
    if unused:
        known = sorted({".".join(t.module) for t in out if t.name == "weight"})
        raise ValueError(
            f"`layouts` names torch module(s) {unused} but no template tensor is their `weight`. "
            f"{listing('Modules with a weight', known)}"
        )
    return out


def _stacked_modules(leaves: list[tuple[Any, Any]]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Modules with a kernel whose plain ``bias`` has more than one axis (a layer stack, or
    a ``DenseGeneral`` with several feature axes): module keys -> the bias's shape."""
    by_module: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in leaves:
        keys = tuple(str(k) for k in paths.path_keys(path))
        by_module.setdefault(keys[:-1], {})[keys[-1]] = leaf
    return {
        module: tuple(members["bias"].shape)
        for module, members in by_module.items()
        if "kernel" in members
        and "bias" in members
        and not is_node(members["bias"])
        and len(getattr(members["bias"], "shape", ())) > 1
    }


def _link(t: Tensor, j: int) -> proto.TorchLink:
    leaf = t.leaf
    return proto.TorchLink(
        path=t.flax_path,
        module=".".join(t.module),
        tensor=t.name,
        index=j,
        parametrization=leaf.chain[j],
        shape=t.shape,
        layout=t.layout,
        originals=tuple(leaf.originals),
        original_names=tuple(leaf.original_names),
        params=leaf.params.get(str(j)),
        state=leaf.state.get(str(j)),
    )


def _torch_shape(a: proto.TorchArray, template: Any) -> tuple[int, ...]:
    # A zero-size stand-in of the template's shape: the maps only move axes and entries.
    stand_in = np.broadcast_to(np.zeros((), np.float32), tuple(template.shape))
    return tuple(np.shape(a.to_torch(stand_in)))


def _lookup(sub: Any, keys: tuple[str, ...]) -> Any:
    if sub is None:
        return None
    for path, x in jax.tree_util.tree_flatten_with_path(sub)[0]:
        if tuple(str(k) for k in paths.path_keys(path)) == keys:
            return x
    return None


def _declared(
    t: Tensor, link: proto.TorchLink, hook_name: str, arrays: Any, kinds: tuple[str, ...]
) -> list[proto.TorchArray]:
    """The hook's result, checked: TorchArrays whose sources cover the link's arrays once."""
    owner = type(link.parametrization).__name__
    arrays = list(arrays)
    wanted = {a.source for a in _generic(link, kinds)}
    got = []
    for a in arrays:
        if not isinstance(a, proto.TorchArray):
            raise TypeError(
                f"{owner}.{hook_name} returned a {type(a).__name__} for the tensor at "
                f"{t.flax_path}; build each entry with link.array(name, source, ...)."
            )
        got.append(a.source)
    extra = [s for s in got if s not in wanted]
    left = [s for s in wanted if s not in got]
    twice = sorted({s for s in got if got.count(s) > 1}, key=str)
    if extra or left or twice:
        raise ValueError(
            f"{owner}.{hook_name} does not declare the arrays of link {link.index} of the tensor "
            f"at {t.flax_path} exactly once: sources it has no array at {extra}, arrays it "
            f"leaves out {sorted(left, key=str)}, declared twice {twice}. Return one "
            f"link.array(name, source) per array ({sorted(wanted, key=str)})."
        )
    return arrays


def _generic(link: proto.TorchLink, kinds: tuple[str, ...]) -> list[proto.TorchArray]:
    if kinds == ("original",):
        return proto.generic_originals(link)
    return proto.generic_arrays(link)


def _arrays(t: Tensor, j: int, hook_name: str) -> list[proto.TorchArray]:
    link = _link(t, j)
    kinds = ("original",) if hook_name == proto.ORIGINALS_HOOK else ("params", "state")
    declare = proto.hook(link.parametrization, hook_name)
    if declare is None:
        return _generic(link, kinds)
    return _declared(t, link, hook_name, declare(link), kinds)


def plan(t: Tensor, *, legacy: bool) -> list[Entry]:
    """Every array of the template leaf with the torch key holding it and the layout maps."""
    leaf, layout = t.leaf, t.layout
    if not is_node(leaf):
        shape = layout.torch_shape(t.shape)
        return [Entry(t.plain_key, "", ("leaf",), leaf, layout.to_flax, layout.to_torch, "", shape)]
    entries: list[Entry] = []
    labels = leaf.original_names
    suffixes = t.declared_legacy if legacy else None
    if legacy and suffixes is None:
        raise ValueError(
            f"The legacy keys ({', '.join(t.legacy_keys)}) describe a tensor with one "
            f"parametrization that declares `{proto.LEGACY_HOOK}` (weight_norm), but the tensor "
            f"at {t.flax_path} has the chain [{', '.join(leaf.chain_names())}]. Use torch's "
            f"parametrization keys (legacy_weight_norm=False)."
        )
    for a in _arrays(t, 0, proto.ORIGINALS_HOOK):
        i = a.source[1]
        x = leaf.originals[i]
        if suffixes is not None:
            key = join(t.module, t.name + suffixes[i])
        else:
            key = join(t.prefix, a.name)
        entries.append(_entry(t, a, key, labels[i], ("orig", i), x, proto.ORIGINALS_HOOK))
    for j in range(len(leaf.chain)):
        link = _link(t, j)
        for a in _arrays(t, j, proto.ARRAYS_HOOK):
            kind, keys = a.source[0], tuple(str(k) for k in a.source[1:])
            x = _lookup(link.params if kind == "params" else link.state, keys)
            key = join(t.prefix, str(j), a.name) if a.name else join(t.prefix, str(j))
            label = f"{kind}['{j}']" + "".join(f"[{k!r}]" for k in keys)
            entries.append(_entry(t, a, key, label, (kind, j, keys), x, proto.ARRAYS_HOOK))
    return entries


def _entry(
    t: Tensor, a: proto.TorchArray, key: str, label: str, where: tuple, x: Any, hook_name: str
) -> Entry:
    hint = ""
    if not a.declared:
        owner = type(t.leaf.chain[where[1] if where[0] != "orig" else 0]).__name__
        hint = (
            f"{owner} declares no `{hook_name}` hook, so this array took the generic rule; if "
            f"torch keeps it under another name or layout, declare `{hook_name}` on {owner} "
            f"(see paramx._src.integrations.torch)"
        )
    if x is None:
        raise ValueError(f"The tensor at {t.flax_path} has no array at {label} ({key!r}).")
    try:
        torch_shape = _torch_shape(a, x)
    except (ValueError, IndexError, TypeError) as e:
        raise ValueError(
            f"The torch layout declared for {label} of the tensor at {t.flax_path} ({key!r}) "
            f"does not apply to its shape {tuple(x.shape)}: {e}. Fix the parametrization's "
            f"`{hook_name}` (like_weight=True only fits arrays of the tensor's rank)."
        ) from e
    return Entry(key, label, where, x, a.to_flax, a.to_torch, a.rule, torch_shape, hint)
