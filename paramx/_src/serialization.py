"""`flax.serialization` support: registered trees become nested dicts with stable keys.

A parametrized leaf is stored as ``{'original': ...}`` (or ``'original0'``, ``'original1'``,
...), plus ``'params'`` and ``'state'`` dicts keyed by link position when present. Restoring
needs a target tree with the same registrations (for example the one built from a fresh
``model.init``), as everywhere in Flax: the parametrizations themselves are code, not data.
"""

from __future__ import annotations

from typing import Any

from flax import serialization

from paramx._src.node import Parametrized


def _to_state_dict(node: Parametrized) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, x in zip(node._original_names(), node.originals):
        out[name] = serialization.to_state_dict(x)
    if node.params:
        out["params"] = serialization.to_state_dict(node.params)
    if node.state:
        out["state"] = serialization.to_state_dict(node.state)
    return out


def _from_state_dict(target: Parametrized, state: dict[str, Any]) -> Parametrized:
    names = target._original_names()
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(
            f"Cannot restore a parametrized tensor ({', '.join(target.chain_names())}): the "
            f"saved data lacks {missing}; it has {sorted(state)}. Was it saved from a tree with "
            f"the same registrations?"
        )
    originals = tuple(
        serialization.from_state_dict(x, state[n], name=n) for n, x in zip(names, target.originals)
    )
    params = serialization.from_state_dict(target.params, state.get("params", {}), name="params")
    node_state = serialization.from_state_dict(target.state, state.get("state", {}), name="state")
    return target.replace(originals=originals, params=params, state=node_state)


serialization.register_serialization_state(
    Parametrized, _to_state_dict, _from_state_dict, override=True
)
