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
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src import chain as ch
from paramx._src import paths
from paramx._src.node import Parametrized, is_node
from paramx._src.numerics import normalize_axis
from paramx._src.orthogonal import Orthogonal
from paramx._src.spectral_norm import SpectralNorm
from paramx._src.weight_norm import WeightNorm

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

    def __init__(self, modules: ModuleMap | None):
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
        self.pairs = pairs

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


def _tensors(tree: Any, names: _Names, layouts: Mapping[str, str]) -> list[_Tensor]:
    leaves = paths.leaves_with_paths(tree)
    out: list[_Tensor] = []
    used_layouts: set[str] = set()
    owner: dict[str, str] = {}
    for i, (path, leaf) in enumerate(leaves):
        keys = tuple(str(k) for k in paths.path_keys(path))
        shown = paths.format_path(path)
        if not keys:
            raise ValueError("The tree is a single array; give a tree of modules, e.g. params.")
        module = names.torch_module(keys[:-1])
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
        out.append(_Tensor(i, shown, module, name, leaf, shape, layout))
    unused = sorted(set(layouts) - used_layouts)
    if unused:
        known = sorted({".".join(t.module) for t in out if t.name == "weight"})
        raise ValueError(
            f"`layouts` names torch module(s) {unused} but no template tensor is their `weight`. "
            f"{_listing('Modules with a weight', known)}"
        )
    return out


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
        return [_Entry(t.plain_key, "", ("leaf",), leaf, layout.to_flax, layout.to_torch, "")]
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
        entries.append(_Entry(key, n, ("orig", i), x, to_f, to_t, rule))

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
        return [_Entry(key("base"), label, ("state", j, "base"), base, _identity, _identity, rule)]
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


def _read(entry: _Entry, t: _Tensor, raw: np.ndarray) -> jax.Array:
    x = entry.to_flax(raw)
    want = tuple(entry.template.shape)
    what = f"{t.flax_path}" + (f" ({entry.label})" if entry.label else "")
    if tuple(x.shape) != want:
        rule = entry.rule or t.layout.rule()
        raise ValueError(
            f"Shape mismatch at {what}: torch's {entry.torch_key!r} has shape {raw.shape}, which "
            f"is {tuple(x.shape)} in paramx's layout, but the template has {want}. Rule used: "
            f"{rule}. Build the template with the torch model's sizes (and the same "
            f"parametrization options), or name the right layout in `layouts=`."
        )
    dtype = jnp.dtype(entry.template.dtype)
    if np.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(
            f"torch's {entry.torch_key!r} is complex ({x.dtype}) but the template's {what} is "
            f"{dtype.name}; build the template with a complex dtype."
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


# ----- the public functions -----------------------------------------------------------------------
def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    template: Any,
    *,
    modules: ModuleMap | None = None,
    layouts: Mapping[str, str] | None = None,
    strict: bool = True,
) -> Any:
    """Reads a torch ``state_dict`` into a paramx tree shaped like ``template``.

    Every array of the template (plain leaves, and each ``Parametrized`` node's originals,
    ``params`` and ``state``) is taken from the torch key that holds it, converted to paramx's
    layout and to the template array's dtype. Parametrized tensors accept torch's keys
    (``parametrizations.<name>.original``, ``original0``..., ``<i>._u``, ``<i>._v``,
    ``<i>.base``) and, for a lone ``weight_norm``, the legacy ``<name>_g`` / ``<name>_v``. The
    module docstring has the naming and layout rules.

    Args:
      state_dict: torch's ``model.state_dict()`` (torch tensors or numpy arrays). It is not
        modified, and torch is never imported.
      template: A paramx tree with the torch model's parametrizations registered with the same
        options (e.g. ``px.spectral_norm(model.init(...)["params"], ...)``); abstract arrays
        (``jax.ShapeDtypeStruct``) work too. Only its structure, shapes and dtypes are read,
        except for arrays kept with ``strict=False``.
      modules: Maps torch module names to Flax paths, e.g.
        ``{"encoder.layers.0": "encoder/layers_0"}``; whole dotted components, longest prefix
        first; ``{"": "params"}`` reads into a full variables dict. Unmapped names are kept.
      layouts: Per torch module, the layout of its ``weight`` (one of ``LAYOUTS``), when the
        default (from the Flax leaf's name and rank) is not right: ``"conv_transpose"`` for a
        Flax ``ConvTranspose``.
      strict: If False, template arrays with no torch key keep the template's value, and torch
        keys with no place in the template are skipped; a warning lists both.

    Returns:
      A new tree with the template's structure and the state_dict's values (jax arrays).

    Raises:
      ValueError: On a torch key with no place in the template, or a template array with no
        torch key (``strict=True``; each listed with its path and the closest keys); on a
        tensor whose torch keys do not fit the template's parametrizations; on a shape
        mismatch (both shapes and the layout rule are named); on bad ``modules`` /
        ``layouts``.

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
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"`state_dict` must be a mapping from torch keys to tensors (model.state_dict()); "
            f"got {type(state_dict).__name__}."
        )
    names = _Names(modules)
    tensors = _tensors(template, names, _check_layouts(layouts))
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
    missing: list[tuple[str, str, str]] = []  # (flax path + label, torch key, closest)
    for t in tensors:
        new_style = by_prefix.get(t.prefix, [])
        legacy_present = all(k in sd and k not in plain_keys for k in t.legacy_keys)
        mine = [*([t.plain_key] if t.plain_key in sd else []), *new_style]
        if legacy_present:
            mine += list(t.legacy_keys)
        legacy = legacy_present and len(mine) == 2 and is_node(t.leaf)
        entries = _plan(t, legacy=legacy)
        wanted = [e.torch_key for e in entries]
        if mine and set(mine) != set(wanted):
            raise ValueError(
                f"Parametrization mismatch at {t.flax_path} (torch tensor {t.plain_key!r}): the "
                f"template has {_chain_text(t.leaf)}, which reads {wanted}; the state_dict has "
                f"{sorted(mine)}, which looks like {_guess_torch_chain(mine, t)}. Register the "
                f"same parametrizations, with the same options and in the same order, on the "
                f"template (or remove them from the torch model with "
                f"torch.nn.utils.parametrize.remove_parametrizations before saving)."
            )
        for e in entries:
            if e.torch_key not in sd:
                label = t.flax_path + (f" ({e.label})" if e.label else "")
                missing.append((label, e.torch_key, _closest(e.torch_key, sd_keys)))
                continue
            consumed.add(e.torch_key)
            raw = _to_numpy(sd[e.torch_key], e.torch_key)
            values.setdefault(t.index, {})[e.where] = _read(e, t, raw)

    unexpected = [k for k in sd_keys if k not in consumed]
    if missing or unexpected:
        _report(missing, unexpected, tensors, names, strict=strict)

    leaves, treedef = jax.tree_util.tree_flatten(template, is_leaf=is_node)
    new = [_rebuild(leaf, values.get(i, {})) for i, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _would_be(key: str, names: _Names) -> str:
    comps = tuple(key.split("."))
    if _PARAMETRIZATIONS in comps[:-1]:
        at = comps.index(_PARAMETRIZATIONS)
        module, name = comps[:at], comps[at + 1]
    else:
        module, name = comps[:-1], comps[-1]
    leaf = "kernel" if name == "weight" else name
    return "/".join((*names.flax_module(module), leaf))


def _report(
    missing: list[tuple[str, str, str]],
    unexpected: list[str],
    tensors: list[_Tensor],
    names: _Names,
    *,
    strict: bool,
) -> None:
    flax_paths = [t.flax_path for t in tensors]
    lines = []
    if missing:
        lines.append(f"Template arrays with no value in the state_dict ({len(missing)}):")
        for label, key, close in missing[:10]:
            lines.append(f"  {label}: expected torch key {key!r}; closest present: {close}")
        if len(missing) > 10:
            lines.append(f"  ... ({len(missing) - 10} more)")
    if unexpected:
        lines.append(f"torch keys with no place in the template ({len(unexpected)}):")
        for key in unexpected[:10]:
            flax = _would_be(key, names)
            lines.append(
                f"  {key!r} (would be Flax path {flax!r}); closest template paths: "
                f"{_closest(flax, flax_paths)}"
            )
        if len(unexpected) > 10:
            lines.append(f"  ... ({len(unexpected) - 10} more)")
    text = "\n".join(lines)
    if strict:
        raise ValueError(
            "The state_dict does not fit the template.\n"
            + text
            + "\nMap torch module names to Flax paths with `modules=` (e.g. "
            "{'encoder.layers.0': 'encoder/layers_0'}), register the torch model's "
            "parametrizations on the template, or pass strict=False to keep the template's "
            "values for missing arrays and skip unexpected keys."
        )
    warnings.warn("from_torch_state_dict(strict=False): " + text, UserWarning, stacklevel=3)


def to_torch_state_dict(
    tree: Any,
    *,
    modules: ModuleMap | None = None,
    layouts: Mapping[str, str] | None = None,
    legacy_weight_norm: bool = False,
) -> dict[str, np.ndarray]:
    """Writes a paramx tree as a torch ``state_dict`` (numpy arrays under torch's keys).

    The inverse of :func:`from_torch_state_dict`: each array goes to the torch key and layout
    that reading takes it from. A ``Parametrized`` node writes its originals and its links'
    state (``_u``/``_v``, ``base``), exactly what the torch model with the same
    parametrizations registered holds, so ``model.load_state_dict`` takes the result after
    ``torch.from_numpy`` on each array.

    Args:
      tree: A registered paramx tree (not a trainable half: state is written too).
      modules: Maps torch module names to Flax paths, as in :func:`from_torch_state_dict`.
      layouts: Per torch module, the layout of its ``weight``, as in
        :func:`from_torch_state_dict`.
      legacy_weight_norm: Write a tensor whose only parametrization is ``weight_norm`` under
        the legacy ``<name>_g`` / ``<name>_v`` keys of ``torch.nn.utils.weight_norm``.

    Returns:
      A dict from torch keys to numpy arrays (new, writable, C-contiguous), in tree order.

    Raises:
      ValueError: For a parametrization without a torch equivalent in that layout (orthogonal
        on a conv kernel), a tree without its state, or two leaves with one torch name.

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
    """
    names = _Names(modules)
    tensors = _tensors(tree, names, _check_layouts(layouts))
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
