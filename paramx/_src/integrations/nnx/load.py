"""``load_plain(module, plain_state)``: torch's ``load_state_dict`` on a parametrized NNX
module, in place; and ``plain_state(module)``, the reverse.

Each path of the plain model's state is found on the module: a parametrized tensor is set
through its ``right_inverse`` (what ``module.kernel = value`` runs), a plain Variable gets the
value. Everything is computed and checked first, then written, so an error leaves the module
as it was.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paramx._src.core import paths
from paramx._src.core.load import (
    LoadEntry,
    LoadReport,
    copy_value,
    refuse_unmatched,
    relative_distance,
)
from paramx._src.integrations.nnx import run
from paramx._src.integrations.nnx.container import (
    CONTAINER,
    ParametrizationList,
    ParametrizationState,
    is_variable,
    lookup,
)
from paramx._src.integrations.nnx.register import check_module, label_of
from paramx._src.integrations.nnx.remove import remove_parametrizations
from paramx._src.integrations.nnx.tie import Tied, tied_attributes, untie

Keys = tuple[Any, ...]


def _show(keys: Keys) -> str:
    return paths._show_keys(keys)


def _plain_values(plain_state: Any) -> dict[Keys, Any]:
    """``{keys: array}`` of a plain model's state (an ``nnx.State``, a nested dict of
    Variables or of arrays)."""
    if isinstance(plain_state, nnx.Module):
        raise TypeError(
            "`plain_state` is a module; give its state: nnx.state(plain_model) (or "
            "nnx.state(plain_model, nnx.Param) for the parameters only)."
        )
    flat = jax.tree_util.tree_flatten_with_path(plain_state, is_leaf=is_variable)[0]
    out: dict[Keys, Any] = {}
    for path, leaf in flat:
        if isinstance(leaf, nnx.RngState):
            continue
        keys = paths.path_keys(path)
        if is_variable(leaf):
            leaf = leaf.get_value()
        elif keys and keys[-1] == "value":  # a pure state: Variables' values
            keys = keys[:-1]
        out[tuple(keys)] = leaf
    return out


class _TiedSlot(nnx.Variable):
    """Stands for a :class:`Tied` attribute while :func:`_tensors` lists paths."""


def _tensors(module: nnx.Module) -> tuple[list[Keys], set[Keys]]:
    """The tensor paths of ``module``: Variables, a parametrized tensor counted once at
    ``<module path>/<name>``; RNG state and parametrization state left out. And, apart, the
    paths of tied attributes (:func:`paramx.nnx.tie`), which read their source: in
    ``nnx.state`` a tie files the source's Variables under the tied attribute when NNX meets
    it first, so the paths are read with each tie replaced by a stand-in, on a copy."""
    tied = tied_attributes(module)
    if tied:
        module = nnx.clone(module)
        for owner, name in tied_attributes(module):
            setattr(owner, name, _TiedSlot(jnp.zeros(())))
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(module), is_leaf=is_variable)[0]
    seen: dict[Keys, None] = {}
    slots: set[Keys] = set()
    for path, leaf in flat:
        if isinstance(leaf, _TiedSlot):
            slots.add(tuple(paths.path_keys(path)))
            continue
        if isinstance(leaf, (nnx.RngState, ParametrizationState)):
            continue
        keys = tuple(paths.path_keys(path))
        if keys and keys[-1] == "value" and not is_variable(leaf):
            keys = keys[:-1]
        if CONTAINER in keys[:-1]:
            i = keys.index(CONTAINER)
            keys = (*keys[:i], keys[i + 1])
        seen.setdefault(keys, None)
    return list(seen), slots


def _child(owner: Any, key: Any) -> Any:
    attrs = vars(owner) if hasattr(owner, "__dict__") else {}
    if isinstance(key, str) and key in attrs:
        return attrs[key]
    try:
        return owner[key]
    except (KeyError, IndexError, TypeError):
        return None


def load_plain(module: nnx.Module, plain_state: Any, *, strict: bool = True) -> LoadReport:
    """Loads a plain model's state into a parametrized NNX module, in place; returns a report.

    torch's ``model.load_state_dict(plain_state_dict)`` on a parametrized model: for each path
    of ``plain_state``, a parametrized tensor (``module.parametrizations[name]``) is set
    through its chain's ``right_inverse`` (as ``module.<name> = value``), a plain Variable
    (Param, BatchStat, ...) gets the value (converted to its dtype when of the same kind). The
    report is :func:`paramx.load_plain`'s: per parametrized tensor, the relative distance
    ``‖forward(right_inverse(w)) − w‖ / ‖w‖``. An attribute tied by :func:`paramx.nnx.tie`
    reads its source, so its value is not loaded (reported as ``"tied"``). Everything is
    computed and checked before the first write, so on an error the module is unchanged.

    Args:
      module: An NNX module registered with ``paramx.nnx`` (or not).
      plain_state: The plain model's state, ``nnx.state(plain_model)`` (or its Params), with
        the same paths: a parametrized ``kernel`` is loaded from ``.../kernel``. RNG state is
        ignored.
      strict: If True, every tensor of ``module`` (RNG and parametrization state aside) must
        have a value and every value a tensor. If False, unmatched paths are kept or skipped
        and listed in the report.

    Returns:
      A :class:`paramx._src.core.load.LoadReport`.

    Raises:
      ValueError: On missing or unexpected paths (``strict=True``), naming the closest
        paths, and on shape or dtype mismatches.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> pretrained = nnx.Linear(3, 3, rngs=nnx.Rngs(0))  # the plain model
      >>> model = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(1)))
      >>> report = pnx.load_plain(model, nnx.state(pretrained))
      >>> report.copied, list(report.projected)
      (['bias'], ['kernel'])
      >>> bool(jnp.allclose(model.bias[...], pretrained.bias[...]))
      True
      >>> bool(jnp.allclose(model.kernel.T @ model.kernel, jnp.eye(3), atol=1e-5))
      True
    """
    check_module(module)
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be a bool; got {strict!r}.")
    values = _plain_values(plain_state)
    targets, tied = _tensors(module)
    writes: list[tuple[nnx.Variable, Any]] = []
    entries: list[LoadEntry] = []
    unexpected: list[str] = []
    loaded: set[Keys] = set()
    for keys, value in values.items():
        where = _show(keys)
        owner: Any = module
        for k in keys[:-1]:
            owner = _child(owner, k) if owner is not None else None
        name = keys[-1] if keys else None
        plist = lookup(owner, name) if owner is not None and isinstance(name, str) else None
        if plist is not None and isinstance(name, str):
            label = label_of(owner, name)
            node, failed = run.assign(plist.node(), jnp.asarray(value), label, plist.eager)
            result, _ = run.materialize(node, label, False, plist.eager or failed)
            writes += plist._plan_assign(jnp.asarray(value))
            entries.append(
                LoadEntry(
                    where,
                    "projected",
                    relative_distance(result, value),
                    tuple(node.chain_names()),
                )
            )
            loaded.add(keys)
            continue
        var = _child(owner, name) if owner is not None else None
        if isinstance(var, Tied) and keys in tied:  # reads its source: nothing to load
            entries.append(LoadEntry(where, "tied"))
            loaded.add(keys)
            continue
        if not isinstance(var, nnx.Variable) or isinstance(
            var, (nnx.RngState, ParametrizationState)
        ):
            unexpected.append(where)
            continue
        writes.append((var, copy_value(var.get_value(), value, where)))
        entries.append(LoadEntry(where, "copied"))
        loaded.add(keys)
    missing = [_show(k) for k in targets if k not in loaded]
    if strict:
        refuse_unmatched(
            missing, unexpected, [_show(k) for k in targets], [_show(k) for k in values]
        )
    for var, x in writes:
        var.set_value(x)
    return LoadReport(tuple(entries), tuple(missing), tuple(unexpected))


def plain_state(module: nnx.Module) -> nnx.State:
    """The state of the plain model: every parametrized tensor replaced by its value.

    What ``nnx.state(plain_model)`` would hold for the same model without parametrizations
    (``.../kernel`` instead of ``.../parametrizations/kernel/original``; parametrization
    state dropped, a tied attribute holding its value), computed without a state update
    (torch's eval mode) on a copy: ``module`` is not modified. Load it into a plain model
    with ``nnx.update(plain_model, state)`` and write that model as a torch ``state_dict`` with
    ``paramx.interop.to_torch_state_dict(plain_model)``. Stacked layers (``nnx.vmap``) keep
    their leading axes.

    Args:
      module: An NNX module registered with ``paramx.nnx`` (or not).

    Returns:
      An ``nnx.State`` of new Variables.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> model = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> state = pnx.plain_state(model)
      >>> sorted(state)
      ['bias', 'kernel']
      >>> plain = nnx.Linear(3, 3, rngs=nnx.Rngs(1))
      >>> nnx.update(plain, state)
      >>> x = jnp.ones((1, 3))
      >>> bool(jnp.allclose(plain(x), model(x)))
      True
      >>> pnx.is_parametrized(model)  # unchanged
      True
    """
    check_module(module)
    copy = nnx.clone(module)
    owners = [
        m
        for _, m in nnx.iter_modules(copy)
        if not isinstance(m, ParametrizationList) and vars(m).get(CONTAINER) is not None
    ]
    for owner in owners:
        for name in list(vars(owner)[CONTAINER]):
            remove_parametrizations(owner, name, leave_parametrized=True)
    for owner, name in tied_attributes(copy):  # the plain model holds a tied value itself
        untie(owner, name)
    return nnx.state(copy)
