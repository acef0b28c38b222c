"""Reading: a torch ``state_dict`` into a paramx tree (or NNX state) shaped like a template.

Each template array is looked up under the torch key its plan names (``plan.py``), checked
(shape in torch's layout, dtype kind), converted to paramx's layout and the template's dtype,
and put into a new leaf; keys that do not fit are collected into a report (``report.py``).
torch is never imported: values may be torch tensors (read with ``.detach().cpu()``) or
numpy arrays.

Examples:
  >>> import numpy as np
  >>> to_numpy(np.arange(3), "fc.bias")
  array([0, 1, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import paths, tie
from paramx._src.core.node import is_node
from paramx._src.integrations.torch.keys import PARAMETRIZATIONS, ModuleMap, Names
from paramx._src.integrations.torch.layouts import check_layouts
from paramx._src.integrations.torch.modules import closest, suggest_modules
from paramx._src.integrations.torch.nnx import is_nnx, nnx_state, nnx_view
from paramx._src.integrations.torch.plan import Entry, Tensor, plan, tensors
from paramx._src.integrations.torch.report import (
    Match,
    chain_text,
    finish,
    guess_torch_chain,
)


def to_numpy(x: Any, key: str) -> np.ndarray:
    """A state_dict value (a torch tensor, duck-typed, or an array) as a numpy array."""
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


def rebuild(leaf: Any, values: dict[tuple[Any, ...], Any]) -> Any:
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
            flat, treedef = jax.tree_util.tree_flatten_with_path(out[j])
            new = [mine.get(tuple(str(k) for k in paths.path_keys(p)), x) for p, x in flat]
            out[j] = jax.tree_util.tree_unflatten(treedef, new)
        return out

    return leaf.replace(originals=originals, params=sub("params"), state=sub("state"))


def new_leaves(match: Match) -> dict[int, Any]:
    """Each template leaf rebuilt with the values read, by leaf index."""
    return {t.index: rebuild(t.leaf, match.values.get(t.index, {})) for t in match.tensors}


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


def read_entry(entry: Entry, t: Tensor, raw: np.ndarray) -> jax.Array:
    """torch's array for one entry in paramx's layout and the template's dtype; checks first."""
    want = tuple(entry.template.shape)
    what = f"{t.flax_path}" + (f" ({entry.label})" if entry.label else "")
    if tuple(raw.shape) != tuple(entry.torch_shape):
        rule = entry.rule or t.layout.rule()
        seen = ""
        if raw.ndim == len(entry.torch_shape):
            seen = f", which is {tuple(entry.to_flax(raw).shape)} in paramx's layout"
        hint = f" ({entry.hint}.)" if entry.hint else ""
        raise ValueError(
            f"Shape mismatch at {what}: torch's {entry.torch_key!r} has shape "
            f"{tuple(raw.shape)}{seen}, but the template has {want} (torch shape "
            f"{tuple(entry.torch_shape)}). Rule used: {rule}. Build the template with the torch "
            f"model's sizes (and the same parametrization options), or name the right layout "
            f"in `layouts=`.{hint}"
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


def match_keys(
    state_dict: Mapping[str, Any],
    tree: Any,
    names: Names,
    layouts: dict[str, str],
    renames: Mapping[tuple[str, ...], str] | None,
    *,
    strict: bool,
) -> Match:
    """Reads every template array that has a torch key; collects what does not match."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"`state_dict` must be a mapping from torch keys to tensors (model.state_dict()); "
            f"got {type(state_dict).__name__}."
        )
    found_tensors = tensors(tree, names, layouts, renames)
    sd = {str(k): v for k, v in state_dict.items()}
    sd_keys = list(sd)
    by_prefix: dict[tuple[str, ...], list[str]] = {}
    for k in sd_keys:
        comps = tuple(k.split("."))
        for n in range(1, len(comps)):
            if comps[n - 1] == PARAMETRIZATIONS:
                by_prefix.setdefault(comps[: n + 1], []).append(k)
                break
    plain_keys = {t.plain_key for t in found_tensors}

    consumed: set[str] = set()
    values: dict[int, dict[tuple[Any, ...], Any]] = {}
    missing: list[tuple[str, str, str]] = []
    notes: list[str] = []
    unmatched: list[tuple[Tensor, list[Entry]]] = []  # tensors none of whose keys is there
    for t in found_tensors:
        new_style = by_prefix.get(t.prefix, [])
        legacy_keys = t.legacy_keys
        legacy_present = all(k in sd and k not in plain_keys for k in legacy_keys)
        mine = [*([t.plain_key] if t.plain_key in sd else []), *new_style]
        if legacy_present:
            mine += list(legacy_keys)
        legacy = legacy_present and len(mine) == len(legacy_keys) and t.declared_legacy is not None
        entries = plan(t, legacy=legacy)
        wanted = [e.torch_key for e in entries]
        extra = sorted(set(mine) - set(wanted))
        if extra:
            text = (
                f"Parametrization mismatch at {t.flax_path} (torch tensor {t.plain_key!r}): the "
                f"template has {chain_text(t.leaf)}, which reads {wanted}; the state_dict has "
                f"{sorted(mine)}, which looks like {guess_torch_chain(mine, t)}."
            )
            if strict:
                plain_hint = (
                    " To load a plain model's weights into this parametrized template through "
                    "right_inverse, read them into the plain tree and load that: "
                    "paramx.load_plain(template, from_torch_state_dict(state_dict, "
                    "paramx.materialize(template))) (NNX: paramx.nnx.load_plain(model, "
                    "from_torch_state_dict(state_dict, plain_model)))."
                    if mine == [t.plain_key]
                    else ""
                )
                raise ValueError(
                    f"{text} Register the same parametrizations, with the same options and in "
                    f"the same order, on the template (or remove them from the torch model with "
                    f"torch.nn.utils.parametrize.remove_parametrizations before saving)."
                    f"{plain_hint}"
                )
            notes.append(text)
        found = False
        for e in entries:
            if e.torch_key not in sd:
                label = t.flax_path + (f" ({e.label})" if e.label else "")
                missing.append((label, e.torch_key, closest(e.torch_key, sd_keys)))
                continue
            found = True
            consumed.add(e.torch_key)
            raw = to_numpy(sd[e.torch_key], e.torch_key)
            values.setdefault(t.index, {})[e.where] = read_entry(e, t, raw)
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
        suggestion = suggest_modules(unmatched, unexpected, sd, names)
    return Match(found_tensors, values, missing, unexpected, notes, suggestion)


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
        on two keys of one shared parameter (a shared Variable, a plain tie) holding different
        arrays, and on a tie through a transform; on bad ``modules`` / ``layouts``.

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
      >>> from paramx.interop import to_torch_state_dict
      >>> sd = to_torch_state_dict(model)
      >>> sorted(sd)  # doctest: +NORMALIZE_WHITESPACE
      ['bias', 'parametrizations.weight.0._u', 'parametrizations.weight.0._v',
       'parametrizations.weight.original']
      >>> nnx.update(model, from_torch_state_dict(sd, model))
    """
    names_auto: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    view = None
    if is_nnx(template):
        view = nnx_view(template, doing="from_torch_state_dict")
        names_auto, tree, renames = view.auto, view.tree, view.renames
    else:
        # A plain tie is torch's shared parameter: its key is read, and must hold the source's.
        tree, renames = tie.fill_shared(template, "from_torch_state_dict"), None
    names = Names(modules, names_auto)
    match = match_keys(state_dict, tree, names, check_layouts(layouts), renames, strict=strict)
    report = finish(match, names, strict=strict, warn=not return_report)
    if view is not None:
        result = nnx_state(view, match.tensors, new_leaves(match))
    else:
        read = paths.replace_leaves(tree, new_leaves(match))
        result = tie.restore_ties(template, tree, read, "from_torch_state_dict")
    return (result, report) if return_report else result
