"""The torch protocol: what a parametrization declares about its arrays' torch keys and layouts.

The interop reads a parametrization's torch facts only through the optional hooks below
(looked up with ``getattr``; the package docstring documents them with an example):

* ``torch_originals(link) -> Sequence[TorchArray]``, on the first link of a chain: the
  originals' torch names (relative to ``<module>.parametrizations.<name>``) and layouts;
* ``torch_arrays(link) -> Sequence[TorchArray]``, on any link: its ``params`` / ``state``
  arrays' names (relative to ``<module>.parametrizations.<name>.<i>``) and layouts; it may
  raise when the parametrization has no torch equivalent in ``link.layout``;
* ``torch_legacy_suffixes: tuple[str, ...]``: when a chain is this parametrization alone, its
  originals may also be stored as ``<module>.<name><suffix>``, one suffix per original.

Without a hook the generic rule applies (:func:`generic_originals`, :func:`generic_arrays`).
A hook builds its entries with :meth:`TorchLink.array`, so a parametrization needs no import
from this package.

Examples:
  >>> import jax.numpy as jnp
  >>> from paramx._src.integrations.torch.layouts import make_layout
  >>> link = TorchLink(path="fc/kernel", module="fc", tensor="weight", index=0,
  ...                  parametrization=None, shape=(3, 2),
  ...                  layout=make_layout("dense", 2, "fc/kernel"),
  ...                  originals=(jnp.zeros((3, 2)),),
  ...                  original_names=("original",), params=None, state={"s": jnp.ones(2)})
  >>> [(a.name, a.source) for a in generic_originals(link) + generic_arrays(link)]
  [('original', ('original', 0)), ('s', ('state', 's'))]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from paramx._src.core import paths
from paramx._src.integrations.torch.layouts import Layout

ORIGINALS_HOOK = "torch_originals"
ARRAYS_HOOK = "torch_arrays"
LEGACY_HOOK = "torch_legacy_suffixes"


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class TorchArray:
    """One array of a parametrized tensor with its torch name and layout maps.

    Attributes:
      name: torch's name: after ``<module>.parametrizations.<tensor>.`` for an original
        (``"original0"``), after ``...<tensor>.<i>.`` for a link's array (``"_u"``); ``""``
        for a link whose ``params`` or ``state`` is a single array (key ``...<tensor>.<i>``).
      source: Where paramx keeps it: ``("original", i)``, or ``("params", *keys)`` /
        ``("state", *keys)`` inside the link's own ``params`` / ``state``.
      to_flax: torch's numpy array -> paramx's.
      to_torch: paramx's numpy array -> torch's.
      rule: How the layouts relate, for shape-mismatch messages.
      declared: False for the generic rule's entries (messages then name the hook to add).
    """

    name: str
    source: tuple[Any, ...]
    to_flax: Callable[[np.ndarray], np.ndarray] = _identity
    to_torch: Callable[[np.ndarray], np.ndarray] = _identity
    rule: str = ""
    declared: bool = True


@dataclasses.dataclass(frozen=True)
class TorchLink:
    """What a hook sees: one link of a parametrized tensor's chain, and the tensor.

    Attributes:
      path: The tensor's Flax path, for messages (``"fc/kernel"``).
      module: torch's module name (``"fc"``).
      tensor: torch's tensor name (``"weight"``).
      index: The link's position in the chain (torch's ``<i>``).
      parametrization: The link itself.
      shape: The tensor's value shape, in Flax's layout.
      layout: The tensor's :class:`~paramx._src.integrations.torch.layouts.Layout`
        (``to_flax``, ``to_torch``, ``torch_shape``, ``perm``, ``rule()``,
        ``matrix_indices``).
      originals: The tensor's originals (arrays or ``jax.ShapeDtypeStruct``).
      original_names: torch's default names for them (``original``, or ``original0``, ...
        when the first link's ``right_inverse`` returned a tuple).
      params: The link's ``params`` (None if it has none).
      state: The link's ``state`` (None if it has none).
    """

    path: str
    module: str
    tensor: str
    index: int
    parametrization: Any
    shape: tuple[int, ...]
    layout: Layout
    originals: tuple[Any, ...]
    original_names: tuple[str, ...]
    params: Any
    state: Any

    def array(
        self,
        name: str,
        source: tuple[Any, ...],
        *,
        like_weight: bool = False,
        to_flax: Callable[[np.ndarray], np.ndarray] | None = None,
        to_torch: Callable[[np.ndarray], np.ndarray] | None = None,
        rule: str = "",
    ) -> TorchArray:
        """A :class:`TorchArray`: copied as is, in the weight's layout (``like_weight``), or
        with the given maps (both, each the other's inverse)."""
        if like_weight:
            if to_flax is not None or to_torch is not None:
                raise ValueError("Give like_weight=True or to_flax/to_torch, not both.")
            to_flax, to_torch = self.layout.to_flax, self.layout.to_torch
            if not rule and self.layout.name != "identity":
                rule = self.layout.rule()
        elif (to_flax is None) != (to_torch is None):
            raise ValueError(
                f"The torch array {name!r} of the tensor at {self.path} gives one of to_flax / "
                f"to_torch; give both (each the other's inverse) or neither."
            )
        return TorchArray(name, tuple(source), to_flax or _identity, to_torch or _identity, rule)

    def require_state(self, what: str) -> Any:
        """The link's state, or a ValueError saying the tree lacks it."""
        if self.state is None:
            raise ValueError(
                f"The tensor at {self.path} has {type(self.parametrization).__name__} as link "
                f"{self.index} but no state for it ({what}); is this the trainable half from "
                f"paramx.split_state? Pass the full registered tree "
                f"(paramx.merge_state(params, state))."
            )
        return self.state


def generic_originals(link: TorchLink) -> list[TorchArray]:
    """torch's ``original`` / ``original<i>``; an original of the tensor's rank takes the
    weight's layout, any other is copied as is."""
    out = []
    for i, (name, x) in enumerate(zip(link.original_names, link.originals)):
        same_rank = len(x.shape) == len(link.shape)
        a = link.array(name, ("original", i), like_weight=same_rank)
        out.append(dataclasses.replace(a, declared=False))
    return out


def generic_arrays(link: TorchLink) -> list[TorchArray]:
    """Every array of the link's ``params`` and ``state``, as is, under ``<i>.<dotted keys>``."""
    out = []
    for kind, sub in (("params", link.params), ("state", link.state)):
        if sub is None:
            continue
        for path, _ in jax.tree_util.tree_flatten_with_path(sub)[0]:
            keys = tuple(str(k) for k in paths.path_keys(path))
            out.append(TorchArray(".".join(keys), (kind, *keys), declared=False))
    return out


def hook(p: Any, name: str) -> Any:
    """The parametrization's hook ``name``, or None when it does not declare it."""
    return getattr(p, name, None)


def legacy_suffixes(chain: Sequence[Any], n_originals: int) -> tuple[str, ...] | None:
    """The legacy suffixes a lone link declares for its originals, or None."""
    if len(chain) != 1:
        return None
    suffixes = hook(chain[0], LEGACY_HOOK)
    if suffixes is None:
        return None
    suffixes = tuple(suffixes)
    if len(suffixes) != n_originals:
        raise ValueError(
            f"{type(chain[0]).__name__}.{LEGACY_HOOK} = {suffixes!r} names {len(suffixes)} "
            f"suffixes for {n_originals} originals; give one suffix per original."
        )
    return suffixes
