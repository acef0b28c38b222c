"""Key naming: torch's dotted keys and module names <-> Flax key paths.

A torch module ``encoder.layers.0`` is the Flax path ``encoder/layers/0`` unless ``modules=``
maps it (:class:`Names`; whole dotted components, longest prefix first). torch's ``weight``
is Flax's ``kernel``, ``scale`` or ``embedding``; other names are kept. A parametrized tensor
``<module>.<name>`` keeps its arrays under ``<module>.parametrizations.<name>.`` (its
originals, then ``<i>.<key>`` per link), or, in the hook-based legacy form of
``torch.nn.utils.weight_norm``, under ``<module>.<name><suffix>``.

Examples:
  >>> names = Names({"encoder.layers.0": "encoder/layers_0"})
  >>> names.torch_module(("encoder", "layers_0", "attn"))
  ('encoder', 'layers', '0', 'attn')
  >>> join(("encoder", "fc"), PARAMETRIZATIONS, "weight", "original")
  'encoder.fc.parametrizations.weight.original'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

WEIGHT_NAMES = ("kernel", "scale", "embedding")  # Flax's names for torch's `weight`
PARAMETRIZATIONS = "parametrizations"
# The suffixes of torch.nn.utils.weight_norm's hook-based keys (`weight_g`, `weight_v`): what a
# state_dict's keys look like when a tensor was saved that way, for messages.
LEGACY_SUFFIXES = ("_g", "_v")

ModuleMap = Mapping[str, "str | Sequence[Any]"]


def flax_keys(value: str | Sequence[Any], what: str) -> tuple[str, ...]:
    """A ``modules=`` value (``'encoder/layers_0'`` or a tuple of keys) as Flax keys."""
    if isinstance(value, str):
        return tuple(value.split("/")) if value else ()
    if isinstance(value, Sequence):
        return tuple(str(k) for k in value)
    raise TypeError(
        f"modules[{what!r}] must be a Flax path ('encoder/layers_0') or a tuple of keys; got "
        f"{type(value).__name__}."
    )


def torch_comps(name: str) -> tuple[str, ...]:
    """A dotted torch module name as components (``''`` is the root)."""
    return tuple(name.split(".")) if name else ()


def join(*parts: Sequence[str] | str) -> str:
    """torch's dotted key from strings and sequences of components."""
    out: list[str] = []
    for p in parts:
        out.extend([p] if isinstance(p, str) else p)
    return ".".join(out)


def torch_name(leaf_key: str) -> str:
    """torch's tensor name for a Flax leaf key."""
    return "weight" if leaf_key in WEIGHT_NAMES else leaf_key


class Names:
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
        pairs = [(torch_comps(str(t)), flax_keys(f, str(t))) for t, f in (modules or {}).items()]
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
        """torch's module components for a Flax module path."""
        return self._swap(flax_keys, [(f, t) for t, f in self.pairs])

    def flax_module(self, torch_comps: tuple[str, ...]) -> tuple[str, ...]:
        """The Flax module path for torch's module components."""
        return self._swap(torch_comps, self.pairs)


def would_be(key: str, names: Names) -> str:
    """The Flax path a torch key would be read into (its tensor's, for parametrized keys)."""
    comps = tuple(key.split("."))
    if PARAMETRIZATIONS in comps[:-1]:
        at = comps.index(PARAMETRIZATIONS)
        module, name = comps[:at], comps[at + 1]
    else:
        module, name = comps[:-1], comps[-1]
    leaf = "kernel" if name == "weight" else name
    return "/".join((*names.flax_module(module), leaf))
