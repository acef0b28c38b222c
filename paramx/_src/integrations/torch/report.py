"""Reports: what reading a state_dict could not match, as torch's ``IncompatibleKeys`` and text.

:class:`Match` collects, while reading, the values found and the keys that did not fit;
:func:`finish` raises (``strict=True``), warns, or returns the :class:`IncompatibleKeys`
report, each key explained with the closest names and a suggested ``modules=``.

Examples:
  >>> print(IncompatibleKeys([], [], []))
  All keys matched.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from paramx._src.core.node import is_node
from paramx._src.integrations.torch.keys import Names, would_be
from paramx._src.integrations.torch.modules import closest

if TYPE_CHECKING:
    from paramx._src.integrations.torch.plan import Tensor


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
class Match:
    """What reading found: values per tensor, and what did not fit."""

    tensors: list[Tensor]
    values: dict[int, dict[tuple[Any, ...], Any]]
    missing: list[tuple[str, str, str]]  # (flax path + label, torch key, closest present)
    unexpected: list[str]
    notes: list[str]  # parametrization mismatches skipped with strict=False
    suggestion: dict[str, str] | None


def chain_text(leaf: Any) -> str:
    """A leaf's chain of parametrizations, for messages."""
    if not is_node(leaf):
        return "a plain array"
    return f"[{', '.join(leaf.chain_names())}]"


def guess_torch_chain(keys: Sequence[str], t: Tensor) -> str:
    """What torch's keys for one tensor suggest, for mismatch messages."""
    found = []
    if t.plain_key in keys:
        found.append("a plain tensor (no parametrization)")
    if set(t.legacy_keys) <= set(keys):
        found.append(f"legacy weight_norm ({', '.join(k.split('.')[-1] for k in t.legacy_keys)})")
    n = len(t.prefix)
    tails = [tuple(k.split(".")[n:]) for k in keys if tuple(k.split("."))[:n] == t.prefix]
    if tails:
        found.append("torch parametrizations: " + describe_links(tails))
    return " and ".join(found)


def describe_links(tails: list[tuple[str, ...]]) -> str:
    """torch's keys under ``parametrizations.<name>`` described link by link (torch's own
    parametrizations are recognized by their buffers' names)."""
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


def report_text(match: Match, names: Names) -> str:
    """The explanation of every missing and unexpected key."""
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
            flax = would_be(key, names)
            lines.append(
                f"  {key!r} (would be Flax path {flax!r}); closest template paths: "
                f"{closest(flax, flax_paths)}"
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


def finish(match: Match, names: Names, *, strict: bool, warn: bool) -> IncompatibleKeys:
    """Raises (``strict``) or warns about what did not match; returns the report."""
    text = report_text(match, names)
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
