"""Module-name matching: closest names and a suggested ``modules=`` when torch's names differ.

torch numbers ``nn.Sequential`` children ``0, 1, 2, ...`` (activations included) where linen
says ``layers_0`` or ``Dense_0``; :func:`suggest_modules` pairs the template's unmatched
modules with the state_dict's unexpected ones that hold exactly the same keys and shapes.

Examples:
  >>> sorted(["net.10", "net.2"], key=natural)
  ['net.2', 'net.10']
  >>> closest("fc.wieght", ["fc.weight", "conv.bias"])
  "'fc.weight'"
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from paramx._src.integrations.torch.keys import PARAMETRIZATIONS, Names, flax_keys

if TYPE_CHECKING:
    from paramx._src.integrations.torch.plan import Entry, Tensor


def listing(label: str, items: Sequence[str], limit: int = 8) -> str:
    """``label: 'a', 'b', ... (n more).`` for messages."""
    if not items:
        return f"{label}: none."
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{label}: {', '.join(repr(s) for s in items[:limit])}{more}."


def closest(word: str, pool: Sequence[str]) -> str:
    """Up to three names of ``pool`` close to ``word``, for messages."""
    close = difflib.get_close_matches(word, list(pool), n=3, cutoff=0.4)
    return ", ".join(repr(c) for c in close) if close else "none"


def natural(text: str) -> tuple[Any, ...]:
    """A sort key that orders ``layers_2`` before ``layers_10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def suggest_modules(
    unmatched: list[tuple[Tensor, list[Entry]]],
    unexpected: list[str],
    sd: Mapping[str, Any],
    names: Names,
) -> dict[str, str] | None:
    """A ``modules=`` mapping that pairs the template's unmatched modules with the
    state_dict's unexpected torch modules holding exactly the same keys and shapes, in order
    (torch's ``net.0, net.2`` with Flax's ``net/layers_0, net/layers_2`` or ``Dense_0,
    Dense_1``); None when nothing pairs."""
    flax_sigs: dict[tuple[str, ...], set[tuple[str, tuple[int, ...]]]] = {}
    for t, entries in unmatched:
        module = ".".join(t.module)
        sig = flax_sigs.setdefault(t.keys[:-1], set())
        for e in entries:
            rel = e.torch_key[len(module) + 1 :] if module else e.torch_key
            sig.add((rel, tuple(e.torch_shape)))
    matched_flax = {t.keys[:-1] for t, _ in unmatched}
    torch_sigs: dict[str, set[tuple[str, tuple[int, ...]]]] = {}
    for k in unexpected:
        comps = k.split(".")
        at = comps.index(PARAMETRIZATIONS) if PARAMETRIZATIONS in comps[:-1] else len(comps) - 1
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
        fs = sorted(fs, key=lambda f: natural("/".join(f)))
        ms = sorted(ms, key=natural)
        for f, m in zip(fs, ms):
            if f in matched_flax:
                pairs[m] = "/".join(f)
    if not pairs:
        return None
    given = {str(k): "/".join(flax_keys(v, str(k))) for k, v in names.given.items()}
    return {**given, **pairs}
