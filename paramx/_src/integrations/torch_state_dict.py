"""PyTorch ``state_dict`` interop: a parametrized torch model's arrays to a paramx tree and back.

torch stores a parametrized tensor ``<module>.<name>`` under these keys (torch 2.13):

* ``<module>.parametrizations.<name>.original`` (or ``original0``, ``original1``, ... when the
  first parametrization's ``right_inverse`` returned several tensors, as ``weight_norm`` does);
* ``<module>.parametrizations.<name>.<i>.<buffer>`` for the buffers of link ``i`` of the chain:
  ``_u`` and ``_v`` for ``spectral_norm``, ``base`` for ``orthogonal`` with trivialization;
* ``<module>.<name>_g`` and ``<module>.<name>_v`` for the legacy hook-based
  ``torch.nn.utils.weight_norm`` (read here, and written with ``legacy_weight_norm=True``);
* ``<module>.<name>`` for a plain tensor.

A state_dict alone does not say which parametrization, with which options, produced it, so
reading takes a *template*: a paramx tree with the same parametrizations registered (e.g.
``model.init(...)["params"]`` passed through ``px.spectral_norm`` and friends). The template
gives the structure, shapes and dtypes; the state_dict gives the values.

Names. A torch module ``encoder.layers.0`` is the Flax path ``encoder/layers/0`` unless
``modules`` maps it elsewhere (``{"encoder.layers.0": "encoder/layers_0"}``; entries map whole
dotted components, longest prefix first). torch's ``weight`` is Flax's ``kernel``, ``scale``
(norm layers) or ``embedding``, whichever the template's module holds; other names are kept.

Layouts (of the tensor torch calls ``weight``; see ``LAYOUTS``). A 2-D ``kernel`` is a Dense
kernel (in, out), the transpose of torch's Linear weight (out, in); a kernel of 3 or more axes
is a Conv kernel (*k, in, out) for torch's (out, in, *k). ``layouts`` overrides this per torch
module, e.g. ``"conv_transpose"`` for a Flax ``ConvTranspose`` (whose default
``transpose_kernel=False`` also reverses the spatial axes). Every other tensor is copied as is.
How each parametrization's arrays follow:

* ``weight_norm``: g and v take the weight's layout (torch's g (out, 1) is paramx's (1, out)).
* ``spectral_norm``: paramx's ``dim`` axis of the Flax kernel is torch's ``dim`` axis of the
  weight; u is the same vector and v the same up to the order of the flattened axes (for conv
  kernels torch flattens (in, *k), paramx (*k, in)), which is permuted here.
* ``orthogonal``: paramx computes ``torch(Kᵀ)ᵀ`` on a Dense kernel K, so the original is
  transposed and ``base`` (which lives in the tall orientation) is copied as is. A conv kernel
  has no orthogonal equivalent (torch orthogonalizes the spatial slices, paramx the channel
  matrices) and raises.
* A parametrization paramx does not know: the originals take the weight's layout when they
  have its rank, and its own ``params`` / ``state`` arrays are copied as is under
  ``<module>.parametrizations.<name>.<i>.<key>``.

torch is never imported: state_dict values may be torch tensors (read with
``.detach().cpu().numpy()``) or numpy arrays, and :func:`to_torch_state_dict` returns numpy
arrays (``torch.from_numpy`` each, then ``model.load_state_dict``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import chain as ch
from paramx._src.core import paths
from paramx._src.core.node import Parametrized, is_node
from paramx._src.parametrizations.numerics import normalize_axis
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.spectral_norm import SpectralNorm
from paramx._src.parametrizations.weight_norm import WeightNorm

LAYOUTS: Mapping[str, str] = types.MappingProxyType(
    {
        "dense": "torch Linear weight (out, in) <-> Flax Dense kernel (in, out)",
        "conv": "torch ConvNd weight (out, in, *k) <-> Flax Conv kernel (*k, in, out); also torch "
        "ConvTransposeNd weight (in, out, *k) <-> Flax ConvTranspose(transpose_kernel=True) "
        "kernel (*k, out, in)",
        "conv_transpose": "torch ConvTransposeNd weight (in, out, *k) <-> Flax ConvTranspose "
        "kernel (*k, in, out) with the spatial axes reversed (transpose_kernel=False, Flax's "
        "default)",
        "identity": "the same array in both",
    }
)
"""The layouts ``layouts=`` accepts, with what each maps."""

_WEIGHT_NAMES = ("kernel", "scale", "embedding")  # Flax's names for torch's `weight`
_PARAMETRIZATIONS = "parametrizations"

ModuleMap = Mapping[str, "str | Sequence[Any]"]


# ----- layouts ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Flax array = ``flip(transpose(torch array, perm), flip)``."""

    name: str
    perm: tuple[int, ...]
    flip: tuple[int, ...] = ()

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        y = np.transpose(x, self.perm)
        return np.flip(y, self.flip) if self.flip else y

    def to_torch(self, y: np.ndarray) -> np.ndarray:
        if self.flip:
            y = np.flip(y, self.flip)
        return np.transpose(y, np.argsort(self.perm))

    def torch_shape(self, flax_shape: Sequence[int]) -> tuple[int, ...]:
        out = [0] * len(flax_shape)
        for flax_axis, torch_axis in enumerate(self.perm):
            out[torch_axis] = flax_shape[flax_axis]
        return tuple(out)

    def rule(self) -> str:
        return f"layout {self.name!r}: {LAYOUTS[self.name]}"


def _make_layout(name: str, ndim: int, where: str) -> _Layout:
    if name == "identity" or ndim == 0:
        return _Layout("identity", tuple(range(ndim)))
    if name == "dense":
        if ndim != 2:
            raise ValueError(
                f"The tensor at {where} has {ndim} axes; layout 'dense' ({LAYOUTS['dense']}) "
                f"needs 2. Name another layout in `layouts=`."
            )
        return _Layout("dense", (1, 0))
    if ndim < 3:
        raise ValueError(
            f"The tensor at {where} has {ndim} axes; layout {name!r} ({LAYOUTS[name]}) needs at "
            f"least 3. Name another layout in `layouts=`."
        )
    spatial = tuple(range(2, ndim))
    if name == "conv":
        return _Layout("conv", (*spatial, 1, 0))
    return _Layout("conv_transpose", (*spatial, 0, 1), tuple(range(ndim - 2)))


# ----- names --------------------------------------------------------------------------------------
def _flax_keys(value: str | Sequence[Any], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split("/")) if value else ()
    if isinstance(value, Sequence):
        return tuple(str(k) for k in value)
    raise TypeError(
        f"modules[{what!r}] must be a Flax path ('encoder/layers_0') or a tuple of keys; got "
        f"{type(value).__name__}."
    )


def _torch_comps(name: str) -> tuple[str, ...]:
    return tuple(name.split(".")) if name else ()


class _Names:
    """torch module names <-> Flax module paths, entry by entry, longest prefix first."""

    def __init__(
        self,
        modules: ModuleMap | None,
        auto: Sequence[tuple[tuple[str, ...], tuple[str, ...]]] = (),
    ):
        if modules is not None and not isinstance(modules, Mapping):
            raise TypeError(
                "`modules` must be a mapping from torch module names to Flax paths, e.g. "
                f"{{'encoder.layers.0': 'encoder/layers_0'}}; got {type(modules).__name__}."
            )
        pairs = [(_torch_comps(str(t)), _flax_keys(f, str(t))) for t, f in (modules or {}).items()]
        seen: dict[tuple[str, ...], tuple[str, ...]] = {}
        for t, f in pairs:
            if f in seen:
                raise ValueError(
                    f"`modules` maps two torch modules, {'.'.join(seen[f])!r} and "
                    f"{'.'.join(t)!r}, to the same Flax path {'/'.join(f)!r}; the mapping must "
                    f"be one to one."
                )
            seen[f] = t
        # Automatic pairs (nnx.Sequential's `layers` level) yield to the user's entries.
        torch_given = {t for t, _ in pairs}
        pairs += [(t, f) for t, f in auto if t not in torch_given and f not in seen]
        self.pairs = pairs
        self.given = dict(modules or {})

    @staticmethod
    def _swap(
        keys: tuple[str, ...], pairs: list[tuple[tuple[str, ...], tuple[str, ...]]]
    ) -> tuple[str, ...]:
        best = None
        for src, dst in pairs:
            if keys[: len(src)] == src and (best is None or len(src) > len(best[0])):
                best = (src, dst)
        if best is None:
            return keys
        return best[1] + keys[len(best[0]) :]

    def torch_module(self, flax_keys: tuple[str, ...]) -> tuple[str, ...]:
        return self._swap(flax_keys, [(f, t) for t, f in self.pairs])

    def flax_module(self, torch_comps: tuple[str, ...]) -> tuple[str, ...]:
        return self._swap(torch_comps, self.pairs)


def _join(*parts: Sequence[str] | str) -> str:
    out: list[str] = []
    for p in parts:
        out.extend([p] if isinstance(p, str) else p)
    return ".".join(out)


# ----- the plan: which torch key holds which array of a template leaf --------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    torch_key: str
    label: str  # what it is inside the paramx leaf, for messages
    where: tuple[Any, ...]  # ("leaf",) | ("orig", i) | ("params" | "state", link, key(s))
    template: Any
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    rule: str
    torch_shape: tuple[int, ...]  # the shape torch's array must have


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One template leaf: where it is, what torch calls it, and the keys it needs."""

    index: int
    flax_path: str
    module: tuple[str, ...]  # torch module components
    name: str  # torch tensor name
    leaf: Any
    shape: tuple[int, ...]  # the tensor's value (what torch calls `<module>.<name>`)
    layout: _Layout
    keys: tuple[str, ...]  # the leaf's key path in the tree

    @property
    def plain_key(self) -> str:
        return _join(self.module, self.name)

    @property
    def prefix(self) -> tuple[str, ...]:
        return (*self.module, _PARAMETRIZATIONS, self.name)

    @property
    def legacy_keys(self) -> tuple[str, str]:
        return _join(self.module, self.name + "_g"), _join(self.module, self.name + "_v")


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _tensors(
    tree: Any,
    names: _Names,
    layouts: Mapping[str, str],
    renames: Mapping[tuple[str, ...], str] | None = None,
) -> list[_Tensor]:
    """One :class:`_Tensor` per leaf of ``tree``; ``renames`` gives some leaves (by key path)
    their torch tensor name."""
    leaves = paths.leaves_with_paths(tree)
    out: list[_Tensor] = []
    used_layouts: set[str] = set()
    owner: dict[str, str] = {}
    for i, (path, leaf) in enumerate(leaves):
        keys = tuple(str(k) for k in paths.path_keys(path))
        shown = paths.format_path(path)
        if not keys:
            raise ValueError("The tree is a single array; give a tree of modules, e.g. params.")
        _refuse_nnx_layout(keys, shown)
        module = names.torch_module(keys[:-1])
        if renames and keys in renames:
            name = renames[keys]
        else:
            name = "weight" if keys[-1] in _WEIGHT_NAMES else keys[-1]
        tname = _join(module, name)
        if tname in owner:
            raise ValueError(
                f"Two template leaves, {owner[tname]} and {shown}, both map to the torch tensor "
                f"{tname!r}; fix `modules=` so that each Flax module has its own torch name."
            )
        owner[tname] = shown
        shape = _value_shape(leaf, shown)
        ndim = len(shape)
        module_name = ".".join(module)
        if name == "weight" and module_name in layouts:
            layout_name = layouts[module_name]
            used_layouts.add(module_name)
        elif keys[-1] == "kernel":
            layout_name = "dense" if ndim == 2 else "conv" if ndim >= 3 else "identity"
        else:
            layout_name = "identity"
        layout = _make_layout(layout_name, ndim, shown)
        out.append(_Tensor(i, shown, module, name, leaf, shape, layout, keys))
    unused = sorted(set(layouts) - used_layouts)
    if unused:
        known = sorted({".".join(t.module) for t in out if t.name == "weight"})
        raise ValueError(
            f"`layouts` names torch module(s) {unused} but no template tensor is their `weight`. "
            f"{_listing('Modules with a weight', known)}"
        )
    return out


_NNX_PARTS = ("original", "params", "state")


def _refuse_nnx_layout(keys: tuple[str, ...], shown: str) -> None:
    """A plain tree laid out as a paramx.nnx module's state (``parametrizations/<name>/...``,
    from ``nnx.to_pure_dict`` say) would give keys torch rejects: refuse it."""
    for n in range(len(keys) - 2):
        if keys[n] == _PARAMETRIZATIONS and keys[n + 2].startswith(_NNX_PARTS):
            raise ValueError(
                f"The leaf at {shown} is laid out as the state of a paramx.nnx module "
                f"(parametrizations/<name>/original, .../state/<i>/...), which does not say "
                f"which parametrizations produced it. Pass the NNX module itself (or "
                f"nnx.merge(graphdef, state)) to the interop functions."
            )


def _check_layouts(layouts: Mapping[str, str] | None) -> dict[str, str]:
    layouts = dict(layouts or {})
    for module, name in layouts.items():
        if name not in LAYOUTS:
            raise ValueError(
                f"layouts[{module!r}] = {name!r} is not a layout; use one of "
                f"{', '.join(repr(n) for n in LAYOUTS)}."
            )
    return layouts


def _value_shape(leaf: Any, where: str) -> tuple[int, ...]:
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


def _plan(t: _Tensor, *, legacy: bool) -> list[_Entry]:
    """Every array of the template leaf with the torch key holding it and the layout maps."""
    leaf, layout = t.leaf, t.layout
    if not is_node(leaf):
        shape = layout.torch_shape(t.shape)
        return [
            _Entry(t.plain_key, "", ("leaf",), leaf, layout.to_flax, layout.to_torch, "", shape)
        ]
    ndim = len(t.shape)
    entries: list[_Entry] = []
    if legacy:
        if not (len(leaf.chain) == 1 and isinstance(leaf.chain[0], WeightNorm)):
            raise ValueError(
                f"The legacy weight_norm keys (weight_g, weight_v) describe a tensor with "
                f"weight_norm alone, but the tensor at {t.flax_path} has the chain "
                f"[{', '.join(leaf.chain_names())}]. Use torch's parametrization keys "
                f"(legacy_weight_norm=False)."
            )
        names = ["original0", "original1"]
        keys = list(t.legacy_keys)
    else:
        names = leaf._original_names()
        keys = [_join(t.prefix, n) for n in names]
    for i, (n, key, x) in enumerate(zip(names, keys, leaf.originals)):
        same_rank = len(x.shape) == ndim
        to_f, to_t = (layout.to_flax, layout.to_torch) if same_rank else (_identity, _identity)
        rule = layout.rule() if same_rank and layout.name != "identity" else ""
        shape = layout.torch_shape(x.shape) if same_rank else tuple(x.shape)
        entries.append(_Entry(key, n, ("orig", i), x, to_f, to_t, rule, shape))

    for j, link in enumerate(leaf.chain):
        entries.extend(_link_entries(t, j, link, ndim))
    return entries


def _need_state(t: _Tensor, j: int, link: Any, what: str) -> Any:
    state = t.leaf.state.get(str(j))
    if state is None:
        raise ValueError(
            f"The tensor at {t.flax_path} has {type(link).__name__} as link {j} but no state for "
            f"it ({what}); is this the trainable half from paramx.split_state? Pass the full "
            f"registered tree (paramx.merge_state(params, state))."
        )
    return state


def _link_entries(t: _Tensor, j: int, link: Any, ndim: int) -> list[_Entry]:
    leaf, layout = t.leaf, t.layout
    key = lambda name: _join(t.prefix, str(j), name)
    if isinstance(link, WeightNorm):
        return []
    if isinstance(link, Orthogonal):
        if layout.name != "dense":
            raise ValueError(
                f"The tensor at {t.flax_path} is orthogonal in paramx, in {layout.rule()}. Only "
                f"the 'dense' layout has a torch equivalent: paramx's orthogonal on a Flax kernel "
                f"K computes torch's orthogonal on Kᵀ, transposed (for conv kernels, torch "
                f"orthogonalizes the trailing spatial matrices of (out, in, *k) and paramx the "
                f"(in, out) matrix of each tap). Store the matrix as a Dense kernel, or pass "
                f"layouts={{{'.'.join(t.module)!r}: 'dense'}} if it is one."
            )
        if not link.use_trivialization:
            return []
        state = _need_state(t, j, link, "the orthogonal base")
        rule = "the base is the same in both (it lives in the tall orientation)"
        label = f"state['{j}']['base']"
        base = state["base"]
        where = ("state", j, "base")
        shape = tuple(base.shape)
        return [_Entry(key("base"), label, where, base, _identity, _identity, rule, shape)]
    if isinstance(link, SpectralNorm):
        if ndim == 1:
            return []
        state = _need_state(t, j, link, "u and v")
        flax_shape = t.shape
        axis = normalize_axis(-1 if link.dim is None else link.dim, ndim)
        u_idx, v_idx = _spectral_indices(layout, flax_shape, axis)
        torch_dim = layout.perm[axis]
        rule = (
            f"paramx's spectral_norm dim={link.dim} on the Flax array {tuple(flax_shape)} is "
            f"torch's dim={torch_dim} on the torch array {layout.torch_shape(flax_shape)} "
            f"({layout.rule()})"
        )
        out = []
        for name, idx in (("u", u_idx), ("v", v_idx)):
            if tuple(state[name].shape) != idx.shape:
                raise ValueError(
                    f"The spectral_norm state {name} at {t.flax_path} has shape "
                    f"{tuple(state[name].shape)}, expected {idx.shape} for the tensor's "
                    f"{tuple(flax_shape)}; a chain that changes the shape before spectral_norm "
                    f"is not supported by torch interop."
                )
            inv = np.argsort(idx)
            out.append(
                _Entry(
                    key("_" + name),
                    f"state['{j}']['{name}']",
                    ("state", j, name),
                    state[name],
                    lambda x, idx=idx: x[idx],
                    lambda y, inv=inv: y[inv],
                    rule,
                    idx.shape,
                )
            )
        return out
    # A parametrization paramx does not know: its own arrays, as they are.
    out = []
    for kind in ("params", "state"):
        sub = getattr(leaf, kind).get(str(j))
        if sub is None:
            continue
        for path, x in jax.tree_util.tree_flatten_with_path(sub)[0]:
            sub_keys = tuple(str(k) for k in paths.path_keys(path))
            label = f"{kind}['{j}']" + "".join(f"[{k!r}]" for k in sub_keys)
            out.append(
                _Entry(
                    key(".".join(sub_keys)) if sub_keys else _join(t.prefix, str(j)),
                    label,
                    (kind, j, sub_keys),
                    x,
                    _identity,
                    _identity,
                    "",
                    tuple(x.shape),
                )
            )
    return out


def _spectral_indices(
    layout: _Layout, flax_shape: Sequence[int], axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays with ``u_paramx = u_torch[u_idx]`` and ``v_paramx = v_torch[v_idx]``.

    torch's matrix is its array with ``dim`` moved first and the rest flattened; paramx's is
    the Flax array with ``axis`` moved first. Label every torch entry with its row and column
    in torch's matrix, carry the labels through the layout map, and read them off paramx's.
    """
    torch_shape = layout.torch_shape(flax_shape)
    dim = layout.perm[axis]
    h = torch_shape[dim]
    rest = [s for a, s in enumerate(torch_shape) if a != dim]
    w = math.prod(rest)

    def paramx_matrix(labels: np.ndarray) -> np.ndarray:
        torch_labels = np.moveaxis(labels.reshape(h, *rest), 0, dim)
        flax_labels = layout.to_flax(torch_labels)
        return np.moveaxis(flax_labels, axis, 0).reshape(h, -1)

    rows = paramx_matrix(np.broadcast_to(np.arange(h)[:, None], (h, w)))
    cols = paramx_matrix(np.broadcast_to(np.arange(w)[None, :], (h, w)))
    return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(cols[0, :])


# ----- reading and writing arrays -----------------------------------------------------------------
def _to_numpy(x: Any, key: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, duck-typed
        t = x.detach().cpu()
        if hasattr(t, "resolve_conj"):
            t = t.resolve_conj()
        try:
            return np.asarray(t.numpy())
        except TypeError:  # bfloat16 and other dtypes numpy lacks: go through float32
            return np.asarray(t.float().numpy())
    out = np.asarray(x)
    if out.dtype == object:
        raise TypeError(
            f"The state_dict value at {key!r} is a {type(x).__name__}; expected a torch tensor "
            f"or an array."
        )
    return out


def _rebuild(leaf: Any, values: dict[tuple[Any, ...], Any]) -> Any:
    """A new leaf with some arrays replaced; ``leaf`` itself is not modified."""
    if not is_node(leaf):
        return values.get(("leaf",), leaf)
    originals = tuple(values.get(("orig", i), x) for i, x in enumerate(leaf.originals))

    def sub(kind: str) -> dict[str, Any]:
        out = dict(getattr(leaf, kind))
        for j in list(out):
            mine = {w[2]: v for w, v in values.items() if w[0] == kind and w[1] == int(j)}
            if not mine:
                continue
            if isinstance(out[j], dict) and all(isinstance(k, str) for k in mine):
                out[j] = {**out[j], **mine}
                continue
            flat, treedef = jax.tree_util.tree_flatten_with_path(out[j])
            new = [mine.get(tuple(str(k) for k in paths.path_keys(p)), x) for p, x in flat]
            out[j] = jax.tree_util.tree_unflatten(treedef, new)
        return out

    return leaf.replace(originals=originals, params=sub("params"), state=sub("state"))


def _dtype_kind(dtype: Any) -> str:
    dtype = jnp.dtype(dtype)
    for kind, base in (
        ("bool", jnp.bool_),
        ("integer", jnp.integer),
        ("floating", jnp.floating),
        ("complex", jnp.complexfloating),
    ):
        if jnp.issubdtype(dtype, base):
            return kind
    return dtype.name


def _read(entry: _Entry, t: _Tensor, raw: np.ndarray) -> jax.Array:
    """torch's array for one entry in paramx's layout and the template's dtype; checks first."""
    want = tuple(entry.template.shape)
    what = f"{t.flax_path}" + (f" ({entry.label})" if entry.label else "")
    if tuple(raw.shape) != tuple(entry.torch_shape):
        rule = entry.rule or t.layout.rule()
        seen = ""
        if raw.ndim == len(entry.torch_shape):
            seen = f", which is {tuple(entry.to_flax(raw).shape)} in paramx's layout"
        raise ValueError(
            f"Shape mismatch at {what}: torch's {entry.torch_key!r} has shape "
            f"{tuple(raw.shape)}{seen}, but the template has {want} (torch shape "
            f"{tuple(entry.torch_shape)}). Rule used: {rule}. Build the template with the torch "
            f"model's sizes (and the same parametrization options), or name the right layout "
            f"in `layouts=`."
        )
    x = entry.to_flax(raw)
    dtype = jnp.dtype(entry.template.dtype)
    got, expected = _dtype_kind(x.dtype), _dtype_kind(dtype)
    if got != expected and not (got == "floating" and expected == "complex"):
        raise ValueError(
            f"dtype mismatch at {what}: torch's {entry.torch_key!r} is {x.dtype} ({got}) but "
            f"the template's array is {dtype.name} ({expected}). Arrays are cast between "
            f"dtypes of one kind (float64 -> float32, as torch's load_state_dict copies), never "
            f"from {got} to {expected}: the key probably belongs to another tensor (check "
            f"`modules=`), or give the template a {x.dtype} array there."
        )
    return jnp.asarray(np.array(x, order="C"), dtype=dtype)


def _listing(label: str, items: Sequence[str], limit: int = 8) -> str:
    if not items:
        return f"{label}: none."
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{label}: {', '.join(repr(s) for s in items[:limit])}{more}."


def _closest(word: str, pool: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(pool), n=3, cutoff=0.4)
    return ", ".join(repr(c) for c in close) if close else "none"


def _chain_text(leaf: Any) -> str:
    if not is_node(leaf):
        return "a plain array"
    return f"[{', '.join(leaf.chain_names())}]"


def _guess_torch_chain(keys: Sequence[str], t: _Tensor) -> str:
    """What torch's keys for one tensor suggest, for mismatch messages."""
    found = []
    if t.plain_key in keys:
        found.append("a plain tensor (no parametrization)")
    if set(t.legacy_keys) <= set(keys):
        found.append("legacy weight_norm (weight_g, weight_v)")
    n = len(t.prefix)
    tails = [tuple(k.split(".")[n:]) for k in keys if tuple(k.split("."))[:n] == t.prefix]
    if tails:
        found.append("torch parametrizations: " + _describe_links(tails))
    return " and ".join(found)


def _describe_links(tails: list[tuple[str, ...]]) -> str:
    origs = sorted(x[0] for x in tails if len(x) == 1)
    links: dict[str, set[str]] = {}
    for x in tails:
        if len(x) >= 2:
            links.setdefault(x[0], set()).add(".".join(x[1:]))
    parts = [f"originals {origs}"]
    for j in sorted(links):
        bufs = links[j]
        kind = (
            "spectral_norm"
            if bufs == {"_u", "_v"}
            else "orthogonal with trivialization"
            if bufs == {"base"}
            else "another parametrization's arrays"
        )
        parts.append(f"link {j}: {sorted(bufs)} ({kind})")
    if origs == ["original0", "original1"] and not links.get("0"):
        parts.append("first link takes two originals, like weight_norm")
    return "; ".join(parts) + " (links without buffers, such as weight_norm, leave no keys)"


# ----- reading: matching keys -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IncompatibleKeys:
    """What :func:`from_torch_state_dict` could not match; torch's ``load_state_dict`` result.

    Returned with ``return_report=True``. With ``strict=False`` each missing key left the
    template's array in place and each unexpected key was skipped; with ``strict=True`` both
    lists are empty (anything else raises). ``str(report)`` explains each key, with the closest
    names and, where torch's module names differ from the template's, a suggested ``modules=``.

    Attributes:
      missing_keys: torch keys the template reads that the state_dict lacks.
      unexpected_keys: torch keys of the state_dict that nothing in the template reads.
      missing_paths: For each missing key, the template array that kept its value (its path,
        and which array of a parametrized tensor).
      message: The explanation (empty when everything matched).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from paramx.interop import from_torch_state_dict
      >>> template = {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> sd = {"fc.weight": np.ones((2, 3), np.float32), "fc.running_mean": np.zeros(2)}
      >>> tree, report = from_torch_state_dict(sd, template, strict=False, return_report=True)
      >>> report.missing_keys, report.unexpected_keys, report.missing_paths
      (['fc.bias'], ['fc.running_mean'], ['fc/bias'])
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    missing_paths: list[str]
    message: str = ""

    def __str__(self) -> str:
        return self.message or "All keys matched."


@dataclasses.dataclass
class _Match:
    tensors: list[_Tensor]
    values: dict[int, dict[tuple[Any, ...], Any]]
    missing: list[tuple[str, str, str]]  # (flax path + label, torch key, closest present)
    unexpected: list[str]
    notes: list[str]  # parametrization mismatches skipped with strict=False
    suggestion: dict[str, str] | None


def _match(
    state_dict: Mapping[str, Any],
    tree: Any,
    names: _Names,
    layouts: dict[str, str],
    renames: Mapping[tuple[str, ...], str] | None,
    *,
    strict: bool,
) -> _Match:
    """Reads every template array that has a torch key; collects what does not match."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"`state_dict` must be a mapping from torch keys to tensors (model.state_dict()); "
            f"got {type(state_dict).__name__}."
        )
    tensors = _tensors(tree, names, layouts, renames)
    sd = {str(k): v for k, v in state_dict.items()}
    sd_keys = list(sd)
    by_prefix: dict[tuple[str, ...], list[str]] = {}
    for k in sd_keys:
        comps = tuple(k.split("."))
        for n in range(1, len(comps)):
            if comps[n - 1] == _PARAMETRIZATIONS:
                by_prefix.setdefault(comps[: n + 1], []).append(k)
                break
    plain_keys = {t.plain_key for t in tensors}

    consumed: set[str] = set()
    values: dict[int, dict[tuple[Any, ...], Any]] = {}
    missing: list[tuple[str, str, str]] = []
    notes: list[str] = []
    unmatched: list[tuple[_Tensor, list[_Entry]]] = []  # tensors none of whose keys is there
    for t in tensors:
        new_style = by_prefix.get(t.prefix, [])
        legacy_present = all(k in sd and k not in plain_keys for k in t.legacy_keys)
        mine = [*([t.plain_key] if t.plain_key in sd else []), *new_style]
        if legacy_present:
            mine += list(t.legacy_keys)
        legacy = (
            legacy_present and len(mine) == 2 and is_node(t.leaf) and _is_lone_weight_norm(t.leaf)
        )
        entries = _plan(t, legacy=legacy)
        wanted = [e.torch_key for e in entries]
        extra = sorted(set(mine) - set(wanted))
        if extra:
            text = (
                f"Parametrization mismatch at {t.flax_path} (torch tensor {t.plain_key!r}): the "
                f"template has {_chain_text(t.leaf)}, which reads {wanted}; the state_dict has "
                f"{sorted(mine)}, which looks like {_guess_torch_chain(mine, t)}."
            )
            if strict:
                raise ValueError(
                    f"{text} Register the same parametrizations, with the same options and in "
                    f"the same order, on the template (or remove them from the torch model with "
                    f"torch.nn.utils.parametrize.remove_parametrizations before saving)."
                )
            notes.append(text)
        found = False
        for e in entries:
            if e.torch_key not in sd:
                label = t.flax_path + (f" ({e.label})" if e.label else "")
                missing.append((label, e.torch_key, _closest(e.torch_key, sd_keys)))
                continue
            found = True
            consumed.add(e.torch_key)
            raw = _to_numpy(sd[e.torch_key], e.torch_key)
            values.setdefault(t.index, {})[e.where] = _read(e, t, raw)
        if not found and not mine:
            unmatched.append((t, entries))

    # torch's BatchNorm counter has no Flax equivalent: skipped where its module is known.
    counters = {
        k[: -len("running_mean")] + "num_batches_tracked"
        for k in plain_keys
        if k.split(".")[-1] == "running_mean"
    }
    unexpected = [k for k in sd_keys if k not in consumed and k not in counters]
    suggestion = None
    if unmatched and unexpected:
        suggestion = _suggest_modules(unmatched, unexpected, sd, names)
    return _Match(tensors, values, missing, unexpected, notes, suggestion)


def _natural(text: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _suggest_modules(
    unmatched: list[tuple[_Tensor, list[_Entry]]],
    unexpected: list[str],
    sd: Mapping[str, Any],
    names: _Names,
) -> dict[str, str] | None:
    """A ``modules=`` mapping that pairs the template's unmatched modules with the
    state_dict's unexpected torch modules holding exactly the same keys and shapes, in order
    (torch's ``net.0, net.2`` with Flax's ``net/layers_0, net/layers_2`` or ``Dense_0,
    Dense_1``); None when nothing pairs."""
    flax_sigs: dict[tuple[str, ...], set[tuple[str, tuple[int, ...]]]] = {}
    flax_torch: dict[tuple[str, ...], str] = {}
    for t, entries in unmatched:
        module = ".".join(t.module)
        sig = flax_sigs.setdefault(t.keys[:-1], set())
        flax_torch[t.keys[:-1]] = module
        for e in entries:
            rel = e.torch_key[len(module) + 1 :] if module else e.torch_key
            sig.add((rel, tuple(e.torch_shape)))
    matched_flax = {t.keys[:-1] for t, _ in unmatched}
    torch_sigs: dict[str, set[tuple[str, tuple[int, ...]]]] = {}
    for k in unexpected:
        comps = k.split(".")
        at = comps.index(_PARAMETRIZATIONS) if _PARAMETRIZATIONS in comps[:-1] else len(comps) - 1
        module, rel = ".".join(comps[:at]), ".".join(comps[at:])
        if rel == "num_batches_tracked":
            continue
        shape = tuple(getattr(sd[k], "shape", np.shape(sd[k])))
        torch_sigs.setdefault(module, set()).add((rel, shape))
    groups: dict[frozenset, tuple[list[tuple[str, ...]], list[str]]] = {}
    for f, sig in flax_sigs.items():
        groups.setdefault(frozenset(sig), ([], []))[0].append(f)
    for m, sig in torch_sigs.items():
        if frozenset(sig) in groups:
            groups[frozenset(sig)][1].append(m)
    pairs: dict[str, str] = {}
    for fs, ms in groups.values():
        if not ms or len(fs) != len(ms):
            continue
        fs = sorted(fs, key=lambda f: _natural("/".join(f)))
        ms = sorted(ms, key=_natural)
        for f, m in zip(fs, ms):
            if f in matched_flax:
                pairs[m] = "/".join(f)
    if not pairs:
        return None
    given = {str(k): "/".join(_flax_keys(v, str(k))) for k, v in names.given.items()}
    return {**given, **pairs}


def _report_text(match: _Match, names: _Names) -> str:
    flax_paths = [t.flax_path for t in match.tensors]
    lines = []
    if match.missing:
        lines.append(f"Template arrays with no value in the state_dict ({len(match.missing)}):")
        for label, key, close in match.missing[:10]:
            lines.append(f"  {label}: expected torch key {key!r}; closest present: {close}")
        if len(match.missing) > 10:
            lines.append(f"  ... ({len(match.missing) - 10} more)")
    if match.unexpected:
        lines.append(f"torch keys with no place in the template ({len(match.unexpected)}):")
        for key in match.unexpected[:10]:
            flax = _would_be(key, names)
            lines.append(
                f"  {key!r} (would be Flax path {flax!r}); closest template paths: "
                f"{_closest(flax, flax_paths)}"
            )
        if len(match.unexpected) > 10:
            lines.append(f"  ... ({len(match.unexpected) - 10} more)")
    lines.extend(match.notes)
    if match.suggestion:
        lines.append(
            "torch names these modules differently (nn.Sequential counts its children 0, 1, "
            "2, ..., activations included; Flax names them layers_0, ... or Dense_0, ...). "
            "Modules holding the same keys and shapes pair up as:"
        )
        lines.append(f"  modules={match.suggestion!r}")
    return "\n".join(lines)


def _would_be(key: str, names: _Names) -> str:
    comps = tuple(key.split("."))
    if _PARAMETRIZATIONS in comps[:-1]:
        at = comps.index(_PARAMETRIZATIONS)
        module, name = comps[:at], comps[at + 1]
    else:
        module, name = comps[:-1], comps[-1]
    leaf = "kernel" if name == "weight" else name
    return "/".join((*names.flax_module(module), leaf))


def _finish(match: _Match, names: _Names, *, strict: bool, warn: bool) -> IncompatibleKeys:
    text = _report_text(match, names)
    if strict and (match.missing or match.unexpected):
        raise ValueError(
            "The state_dict does not fit the template.\n"
            + text
            + "\nMap torch module names to Flax paths with `modules=` (e.g. "
            "{'encoder.layers.0': 'encoder/layers_0'}), register the torch model's "
            "parametrizations on the template, or pass strict=False to keep the template's "
            "values for missing arrays and skip unexpected keys."
        )
    if warn and text:
        warnings.warn(
            "from_torch_state_dict(strict=False) kept the template's values for the missing "
            "keys and skipped the unexpected ones (return_report=True returns this as an "
            "IncompatibleKeys instead of warning):\n" + text,
            UserWarning,
            stacklevel=3,
        )
    return IncompatibleKeys(
        missing_keys=[key for _, key, _ in match.missing],
        unexpected_keys=list(match.unexpected),
        missing_paths=[label for label, _, _ in match.missing],
        message=text,
    )


def _new_leaves(match: _Match) -> dict[int, Any]:
    return {t.index: _rebuild(t.leaf, match.values.get(t.index, {})) for t in match.tensors}


# ----- NNX ------------------------------------------------------------------------------------
def _nnx() -> Any:
    """``flax.nnx`` when it is imported (no NNX object exists otherwise), else None."""
    return sys.modules.get("flax.nnx")


def _is_nnx(x: Any) -> bool:
    nnx = _nnx()
    if nnx is None:
        return False
    if isinstance(x, (nnx.Module, nnx.State)):
        return True
    is_var = lambda v: isinstance(v, nnx.Variable)
    return any(is_var(v) for v in jax.tree_util.tree_leaves(x, is_leaf=is_var))


@dataclasses.dataclass
class _NNXView:
    """An NNX module (or state) seen as a paramx tree, with the way back to its Variables."""

    tree: dict[str, Any]
    variables: dict[tuple[str, ...], tuple[tuple[Any, ...], Any]]  # str path -> (path, Var)
    renames: dict[tuple[str, ...], str]
    auto: list[tuple[tuple[str, ...], tuple[str, ...]]]


def _nnx_view(obj: Any, *, doing: str) -> _NNXView:
    nnx = _nnx()
    from paramx._src.integrations import nnx as pnx  # flax.nnx is imported already

    skip = tuple(
        c for c in (nnx.RngState, nnx.Intermediate, getattr(nnx, "Cache", None)) if c is not None
    )
    plists: dict[tuple[Any, ...], Any] = {}
    sequentials: list[tuple[Any, ...]] = []
    found: list[tuple[tuple[Any, ...], Any]] = []
    if isinstance(obj, nnx.Module):
        for path, node in nnx.iter_graph(obj):
            if isinstance(node, pnx.ParametrizationList):
                plists[tuple(path)] = node
            elif isinstance(node, nnx.Sequential):
                sequentials.append(tuple(path))
            elif isinstance(node, nnx.Variable):
                found.append((tuple(path), node))
    else:
        is_var = lambda v: isinstance(v, nnx.Variable)
        for path, v in jax.tree_util.tree_flatten_with_path(obj, is_leaf=is_var)[0]:
            keys = paths.path_keys(path)
            if not is_var(v):
                raise ValueError(
                    f"The leaf at {paths.format_path(path)} of the {type(obj).__name__} is a "
                    f"{type(v).__name__}, not an nnx.Variable; pass the NNX module itself."
                )
            if _PARAMETRIZATIONS in keys[:-1]:
                raise ValueError(
                    f"{doing} needs the NNX module, not its state: the state at "
                    f"{paths.format_path(path)} belongs to a tensor registered with paramx.nnx, "
                    f"and which parametrizations produced it (spectral_norm's u and v, an "
                    f"orthogonal base, their layouts) lives in the module's graph, not in the "
                    f"nnx.State. Pass the module (or nnx.merge(graphdef, state))."
                )
            found.append((tuple(keys), v))

    def inside_plist(path: tuple[Any, ...]) -> bool:
        return any(path[: len(q)] == q for q in plists)

    def as_str(path: tuple[Any, ...]) -> tuple[str, ...]:
        return tuple(str(k) for k in path)

    tree: dict[str, Any] = {}
    variables: dict[tuple[str, ...], tuple[tuple[Any, ...], Any]] = {}
    renames: dict[tuple[str, ...], str] = {}
    for path, var in found:
        variables[as_str(path)] = (path, var)
        if isinstance(var, skip) or inside_plist(path) or not hasattr(var.get_value(), "shape"):
            continue
        keys = as_str(path)
        _nest(tree, keys, var.get_value())
        if isinstance(var, nnx.BatchStat) and keys[-1] in ("mean", "var"):
            renames[keys] = "running_" + keys[-1]  # torch BatchNorm's buffers
    for path, plist in plists.items():
        if len(path) < 2 or path[-2] != _PARAMETRIZATIONS:
            raise ValueError(
                f"A ParametrizationList at {'/'.join(as_str(path))} is not under a module's "
                f"`parametrizations`; only modules registered with paramx.nnx are supported."
            )
        keys = as_str((*path[:-2], path[-1]))
        _nest(tree, keys, plist.node())
    auto = [(as_str(p), (*as_str(p), "layers")) for p in sequentials]
    return _NNXView(tree, variables, renames, auto)


def _nest(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _nnx_state(view: _NNXView, match: _Match, plist_paths: Mapping[tuple[str, ...], Any]) -> Any:
    """The new values as an ``nnx.State`` of new Variables (for ``nnx.update``)."""
    nnx = _nnx()
    out: list[tuple[tuple[Any, ...], Any]] = []
    for t, new in zip(match.tensors, _new_leaves(match).values()):
        if not is_node(new):
            path, var = view.variables[t.keys]
            out.append((path, var.copy(new)))
            continue
        base = plist_paths[t.keys]
        arrays = dict(zip(new._original_names(), new.originals))
        for kind in ("params", "state"):
            flat = jax.tree_util.tree_flatten_with_path(getattr(new, kind))[0]
            for p, x in flat:
                arrays[".".join((kind, *(str(k) for k in paths.path_keys(p))))] = x
        for rel, x in arrays.items():
            path, var = view.variables[(*base, *rel.split("."))]
            out.append((path, var.copy(x)))
    return nnx.from_flat_state(out)


def _plist_paths(view: _NNXView) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Tree keys of each parametrized tensor -> the str path of its ParametrizationList."""
    out = {}
    for keys in view.variables:
        for n in range(len(keys) - 2):
            if keys[n] == _PARAMETRIZATIONS and keys[n + 2].startswith(_NNX_PARTS):
                out[(*keys[:n], keys[n + 1])] = keys[: n + 2]
    return out


# ----- the public functions -----------------------------------------------------------------------
def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    template: Any,
    *,
    modules: ModuleMap | None = None,
    layouts: Mapping[str, str] | None = None,
    strict: bool = True,
    return_report: bool = False,
) -> Any:
    """Reads a torch ``state_dict`` into a paramx tree (or NNX state) shaped like ``template``.

    Every array of the template (plain leaves, and each ``Parametrized`` node's originals,
    ``params`` and ``state``) is taken from the torch key that holds it, converted to paramx's
    layout and to the template array's dtype. Parametrized tensors accept torch's keys
    (``parametrizations.<name>.original``, ``original0``..., ``<i>._u``, ``<i>._v``,
    ``<i>.base``) and, for a lone ``weight_norm``, the legacy ``<name>_g`` / ``<name>_v``. The
    module docstring has the naming and layout rules.

    Module names. torch's ``encoder.layers.0`` is looked up at the Flax path
    ``encoder/layers/0`` (NNX's name for a list of layers) unless ``modules`` maps it. Flax
    names differ for linen lists of submodules (``layers_0``) and for ``nn.Sequential``: torch
    numbers a ``Sequential``'s children ``0, 1, 2, ...``, activations included, where linen
    names them ``layers_0, layers_2, ...`` (set up in ``setup``) or ``Dense_0, Dense_1, ...``
    (built inline in a compact method). When names do not match, the error lists the
    unmatched keys and a ``modules=`` mapping that pairs modules holding the same keys and
    shapes; ``nnx.Sequential``'s extra ``layers`` level is mapped automatically.

    NNX. ``template`` may be an NNX module (registered with ``paramx.nnx`` or not): the
    result is then an ``nnx.State`` of new Variables, and ``nnx.update(model, state)`` loads it
    (the module itself is not modified). Its Params, BatchStats (``mean``/``var`` are torch's
    ``running_mean``/``running_var``) and parametrization state are read; RNG state is not.

    Args:
      state_dict: torch's ``model.state_dict()`` (torch tensors or numpy arrays). It is not
        modified, and torch is never imported.
      template: A paramx tree with the torch model's parametrizations registered with the same
        options (e.g. ``px.spectral_norm(model.init(...)["params"], ...)``); abstract arrays
        (``jax.ShapeDtypeStruct``) work too. Or an NNX module (or the ``nnx.State`` of a module
        without paramx parametrizations). Only its structure, shapes and dtypes are read,
        except for arrays kept with ``strict=False``.
      modules: Maps torch module names to Flax paths, e.g.
        ``{"encoder.layers.0": "encoder/layers_0"}``; whole dotted components, longest prefix
        first; ``{"": "params"}`` reads into a full variables dict. Unmapped names are kept.
      layouts: Per torch module, the layout of its ``weight`` (one of ``LAYOUTS``), when the
        default (from the Flax leaf's name and rank) is not right: ``"conv_transpose"`` for a
        Flax ``ConvTranspose``.
      strict: If True, every template array must have its torch key and every torch key a
        place in the template. If False (torch's ``strict=False``), template arrays without a
        torch key keep the template's value, including single arrays of a parametrized tensor
        (spectral norm's ``u`` without ``_u``), and torch keys without a place (those of a
        parametrization the template lacks included) are skipped; both are reported. Shape
        and dtype mismatches raise either way, as in torch.
      return_report: Also return an :class:`IncompatibleKeys` listing the missing and
        unexpected keys. Without it, ``strict=False`` warns when anything did not match.

    Returns:
      A new tree with the template's structure and the state_dict's values (jax arrays); for
      an NNX template, an ``nnx.State`` for ``nnx.update``. With ``return_report=True``, the
      pair ``(result, IncompatibleKeys)``.

    Raises:
      ValueError: On a torch key with no place in the template, or a template array with no
        torch key (``strict=True``; each listed with its path and the closest keys, and with a
        suggested ``modules=`` where module names differ); on a tensor whose torch keys do not
        fit the template's parametrizations (``strict=True``); on a shape mismatch (the key,
        both shapes and the layout rule are named) or a change of dtype kind (integer to
        float, say); on a stacked tensor (``nn.scan``, ``nnx.vmap``), which has no torch keys;
        on bad ``modules`` / ``layouts``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import paramx as px
      >>> from paramx.interop import from_torch_state_dict
      >>> template = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> template = px.weight_norm(template, "fc/kernel")  # torch: weight_norm(nn.Linear(3, 2))
      >>> state_dict = {  # torch layout: g (out, 1), v (out, in)
      ...     "fc.bias": np.array([0.5, -0.5], np.float32),
      ...     "fc.parametrizations.weight.original0": np.array([[2.0], [1.0]], np.float32),
      ...     "fc.parametrizations.weight.original1": np.array(
      ...         [[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]], np.float32),
      ... }
      >>> tree = from_torch_state_dict(state_dict, template)
      >>> [x.shape for x in px.originals(tree, "fc/kernel")]  # paramx layout: (1, 2), (3, 2)
      [(1, 2), (3, 2)]
      >>> px.materialize(tree)["fc"]["kernel"]
      Array([[1.2, 0. ],
             [0. , 1. ],
             [1.6, 0. ]], dtype=float32)

      A partial state_dict with ``strict=False`` (torch's ``missing_keys``):

      >>> partial = {k: v for k, v in state_dict.items() if k != "fc.bias"}
      >>> tree, report = from_torch_state_dict(
      ...     partial, template, strict=False, return_report=True)
      >>> report.missing_keys, tree["fc"]["bias"]  # the template's bias is kept
      (['fc.bias'], Array([0., 0.], dtype=float32))

      torch's ``nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))`` saved as
      ``net.0.*`` and ``net.2.*``, read into a linen ``nn.Sequential`` built in ``setup``
      (``net/layers_0``, ``net/layers_2``):

      >>> seq = {"net": {"layers_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
      ...                "layers_2": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
      >>> sd = {"net.0.weight": np.ones((4, 3), np.float32), "net.0.bias": np.ones(4, np.float32),
      ...       "net.2.weight": np.ones((2, 4), np.float32), "net.2.bias": np.ones(2, np.float32)}
      >>> modules = {"net.0": "net/layers_0", "net.2": "net/layers_2"}
      >>> tree = from_torch_state_dict(sd, seq, modules=modules)

      Without ``modules=``, the error ends with exactly that mapping.

      NNX: the result is a state for ``nnx.update``:

      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> model = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> sd = to_torch_state_dict(model)
      >>> sorted(sd)
      ['bias', 'parametrizations.weight.0._u', 'parametrizations.weight.0._v',
       'parametrizations.weight.original']
      >>> nnx.update(model, from_torch_state_dict(sd, model))
    """
    names_auto: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    view = None
    if _is_nnx(template):
        view = _nnx_view(template, doing="from_torch_state_dict")
        names_auto, tree, renames = view.auto, view.tree, view.renames
    else:
        tree, renames = template, None
    names = _Names(modules, names_auto)
    match = _match(state_dict, tree, names, _check_layouts(layouts), renames, strict=strict)
    report = _finish(match, names, strict=strict, warn=not return_report)
    if view is not None:
        result = _nnx_state(view, match, _plist_paths(view))
    else:
        result = paths.replace_leaves(template, _new_leaves(match))
    return (result, report) if return_report else result


def to_torch_state_dict(
    tree: Any,
    *,
    modules: ModuleMap | None = None,
    layouts: Mapping[str, str] | None = None,
    legacy_weight_norm: bool = False,
) -> dict[str, np.ndarray]:
    """Writes a paramx tree (or an NNX module) as a torch ``state_dict`` (numpy arrays under
    torch's keys).

    The inverse of :func:`from_torch_state_dict`: each array goes to the torch key and layout
    that reading takes it from. A ``Parametrized`` node writes its originals and its links'
    state (``_u``/``_v``, ``base``), exactly what the torch model with the same
    parametrizations registered holds, so ``model.load_state_dict`` takes the result after
    ``torch.from_numpy`` on each array. An NNX module registered with ``paramx.nnx`` writes its
    parametrized tensors the same way (``parametrizations/kernel/original`` becomes torch's
    ``parametrizations.weight.original``, transposed for a Linear), its BatchStats as torch's
    ``running_mean`` / ``running_var``, and an ``nnx.Sequential``'s layers as ``0``, ``1``, ...
    The ``nnx.State`` of a registered module is refused: the parametrizations live in the
    module's graph, not in its state.

    Args:
      tree: A registered paramx tree (not a trainable half: state is written too), or an NNX
        module.
      modules: Maps torch module names to Flax paths, as in :func:`from_torch_state_dict`.
      layouts: Per torch module, the layout of its ``weight``, as in
        :func:`from_torch_state_dict`.
      legacy_weight_norm: Write a tensor whose only parametrization is ``weight_norm`` under
        the legacy ``<name>_g`` / ``<name>_v`` keys of ``torch.nn.utils.weight_norm``.

    Returns:
      A dict from torch keys to numpy arrays (new, writable, C-contiguous), in tree order.

    Raises:
      ValueError: For a parametrization without a torch equivalent in that layout (orthogonal
        on a conv kernel), a tree without its state, a stacked tensor (``nn.scan``,
        ``nnx.vmap``), the state of a ``paramx.nnx`` module without the module, or two leaves
        with one torch name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.interop import to_torch_state_dict
      >>> tree = {"fc": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]]),
      ...                "bias": jnp.zeros(2)}}
      >>> tree = px.weight_norm(tree, "fc/kernel")
      >>> sd = to_torch_state_dict(tree)
      >>> {k: v.shape for k, v in sd.items()}
      {'fc.bias': (2,), 'fc.parametrizations.weight.original0': (2, 1),
       'fc.parametrizations.weight.original1': (2, 3)}
      >>> sd["fc.parametrizations.weight.original0"][:, 0]
      array([5., 1.], dtype=float32)
      >>> sorted(to_torch_state_dict(tree, legacy_weight_norm=True))
      ['fc.bias', 'fc.weight_g', 'fc.weight_v']

      An NNX model with an ``nnx.Sequential`` gets torch's ``nn.Sequential`` names:

      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                      pnx.orthogonal(nnx.Linear(4, 4, rngs=nnx.Rngs(1))))
      >>> sorted(to_torch_state_dict(net))
      ['0.bias', '0.weight', '2.bias', '2.parametrizations.weight.0.base',
       '2.parametrizations.weight.original']
    """
    names_auto: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    renames = None
    if _is_nnx(tree):
        view = _nnx_view(tree, doing="to_torch_state_dict")
        names_auto, tree, renames = view.auto, view.tree, view.renames
    names = _Names(modules, names_auto)
    tensors = _tensors(tree, names, _check_layouts(layouts), renames)
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        legacy = legacy_weight_norm and is_node(t.leaf) and _is_lone_weight_norm(t.leaf)
        for e in _plan(t, legacy=legacy):
            if isinstance(e.template, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"The array at {t.flax_path} ({e.label or 'value'}) is abstract "
                    f"(jax.ShapeDtypeStruct); to_torch_state_dict writes concrete arrays."
                )
            x = np.asarray(e.template)  # the tree's own array here
            out[e.torch_key] = np.array(e.to_torch(x), order="C", copy=True)
    return out


def _is_lone_weight_norm(node: Parametrized) -> bool:
    return len(node.chain) == 1 and isinstance(node.chain[0], WeightNorm)
