"""`flax.serialization` support: registered trees become nested dicts with stable keys.

A parametrized leaf is stored as ``{'original': ...}`` (or ``'original0'``, ``'original1'``,
...), plus ``'params'`` and ``'state'`` dicts keyed by link position when present. Restoring
needs a target tree with the same registrations (for example the one built from a fresh
``model.init``), as everywhere in Flax: the parametrizations themselves are code, not data.

A tied leaf (:func:`paramx.tie`) holds no array and is stored as an empty dict: the checkpoint
holds one copy of a tied array, at its source. Restoring keeps the target's tie.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization

from paramx._src.core.node import Parametrized
from paramx._src.core.tie import Tied


def _to_state_dict(node: Parametrized) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, x in zip(node.original_names, node.originals):
        out[name] = serialization.to_state_dict(x)
    if node.params:
        out["params"] = serialization.to_state_dict(node.params)
    if node.state:
        out["state"] = serialization.to_state_dict(node.state)
    return out


def _from_state_dict(target: Parametrized, state: Any) -> Parametrized:
    names = target.original_names
    where = serialization.current_path().lstrip("./") or "<root>"
    if not isinstance(state, Mapping):
        got = (
            f"a plain {type(state).__name__} of shape {list(np.shape(state))}"
            if hasattr(state, "shape")
            else f"a {type(state).__name__}"
        )
        raise ValueError(
            f"Cannot restore the parametrized tensor at {where} "
            f"({', '.join(target.chain_names())}): the saved data holds {got}, not the "
            f"{names} of a registered tree. It was saved from a tree without this "
            f"registration (a plain checkpoint): restore it into the plain template "
            f"(`model.init` output) and register afterwards, or `paramx.assign` the value."
        )
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(
            f"Cannot restore the parametrized tensor at {where} "
            f"({', '.join(target.chain_names())}): the saved data lacks {missing}; it has "
            f"{sorted(state)}. Was it saved from a tree with the same registrations?"
        )
    extra = [k for k in state if k not in (*names, "params", "state")]
    for part in ("params", "state"):
        extra += _extra_keys(getattr(target, part), state.get(part, {}), part)
    if extra:
        raise ValueError(
            f"Cannot restore the parametrized tensor at {where} "
            f"({', '.join(target.chain_names())}): the saved data has {sorted(map(str, extra))}, "
            f"which this registration does not (they would be dropped: another chain, "
            f"another option such as use_trivialization, or another link order). Restore "
            f"into a tree registered as the saved one was"
            + (
                " (into the full tree, then `split_state`, if the target is a trainable half)."
                if not target.state and state.get("state")
                else "."
            )
        )
    originals = tuple(
        serialization.from_state_dict(x, state[n], name=n) for n, x in zip(names, target.originals)
    )
    params = serialization.from_state_dict(target.params, state.get("params", {}), name="params")
    node_state = serialization.from_state_dict(target.state, state.get("state", {}), name="state")
    return target.replace(originals=originals, params=params, state=node_state)


def _extra_keys(target: Any, saved: Any, at: str) -> list[str]:
    """The paths under ``at`` of the nested dicts of ``saved`` that ``target`` lacks."""
    if not isinstance(saved, Mapping) or not saved:
        return []
    if not isinstance(target, Mapping):
        return [at]
    out = []
    for k, v in saved.items():
        out += [f"{at}/{k}"] if k not in target else _extra_keys(target[k], v, f"{at}/{k}")
    return out


serialization.register_serialization_state(
    Parametrized, _to_state_dict, _from_state_dict, override=True
)


def _tied_to_state_dict(tied: Tied) -> dict[str, Any]:
    return {}


def _tied_from_state_dict(target: Tied, state: Any) -> Tied:
    if state is None or (isinstance(state, Mapping) and not state):
        return target
    where = serialization.current_path().lstrip("./") or "<root>"
    got = f"an array of shape {list(np.shape(state))}" if hasattr(state, "shape") else "data"
    raise ValueError(
        f"Cannot restore the tied leaf at {where} (it reads {target.source!r}): the saved data "
        f"holds {got} there, so it was saved from a tree without this tie. Restore into the "
        f"untied template (`paramx.untie(target)`, or the plain `model.init` output) and tie "
        f"afterwards, which keeps the source's array and drops this one."
    )


serialization.register_serialization_state(
    Tied, _tied_to_state_dict, _tied_from_state_dict, override=True
)
