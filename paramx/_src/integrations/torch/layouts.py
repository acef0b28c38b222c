"""Layouts: how one array is laid out in Flax and in torch, as an axis permutation (and flips).

A :class:`Layout` says ``flax = flip(transpose(torch, perm), flip)``. ``LAYOUTS`` names the
layouts of the tensor torch calls ``weight``: a Dense kernel (in, out) is torch's Linear weight
(out, in) transposed, a Conv kernel (*k, in, out) is torch's (out, in, *k), and so on. The
arrays of a parametrization (its originals, params and state) follow the weight's layout, or
their own, as the parametrization declares (see the package docstring).

Examples:
  >>> import numpy as np
  >>> dense = make_layout("dense", 2, "fc/kernel")
  >>> dense.torch_shape((3, 2)), dense.to_torch(np.zeros((3, 2))).shape
  ((2, 3), (2, 3))
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence

import numpy as np

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


@dataclasses.dataclass(frozen=True)
class Layout:
    """Flax array = ``flip(transpose(torch array, perm), flip)``.

    Attributes:
      name: One of ``LAYOUTS``.
      perm: For each Flax axis, the torch axis it comes from.
      flip: Flax axes reversed after the transpose.

    Examples:
      >>> import numpy as np
      >>> conv = Layout("conv", (2, 1, 0))  # torch (out, in, k) -> Flax (k, in, out)
      >>> conv.torch_shape((5, 3, 4))
      (4, 3, 5)
      >>> conv.to_flax(np.zeros((4, 3, 5))).shape
      (5, 3, 4)
    """

    name: str
    perm: tuple[int, ...]
    flip: tuple[int, ...] = ()

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        """torch's array in Flax's layout."""
        y = np.transpose(x, self.perm)
        return np.flip(y, self.flip) if self.flip else y

    def to_torch(self, y: np.ndarray) -> np.ndarray:
        """Flax's array in torch's layout."""
        if self.flip:
            y = np.flip(y, self.flip)
        return np.transpose(y, np.argsort(self.perm))

    def torch_shape(self, flax_shape: Sequence[int]) -> tuple[int, ...]:
        """The torch shape of an array of Flax shape ``flax_shape``."""
        out = [0] * len(flax_shape)
        for flax_axis, torch_axis in enumerate(self.perm):
            out[torch_axis] = flax_shape[flax_axis]
        return tuple(out)

    def rule(self) -> str:
        """The layout's name and what it maps, for messages."""
        return f"layout {self.name!r}: {LAYOUTS[self.name]}"

    def matrix_indices(self, flax_shape: Sequence[int], axis: int) -> tuple[np.ndarray, np.ndarray]:
        """How a matrix view of the array reorders between the two layouts.

        Both sides see the array as a matrix: ``axis`` (a Flax axis; torch's is
        ``perm[axis]``) first, the other axes flattened in their own order. Returns index
        arrays with ``rows_flax = rows_torch[row_idx]`` and ``cols_flax = cols_torch[col_idx]``
        for vectors indexed by the matrix's rows and columns (spectral norm's u and v).

        Examples:
          >>> conv = Layout("conv", (2, 1, 0))  # Flax (k, in, out), torch (out, in, k)
          >>> rows, cols = conv.matrix_indices((2, 3, 4), axis=2)
          >>> rows.tolist(), cols.tolist()  # torch flattens (in, k), Flax (k, in)
          ([0, 1, 2, 3], [0, 2, 4, 1, 3, 5])
        """
        torch_shape = self.torch_shape(flax_shape)
        dim = self.perm[axis]
        h = torch_shape[dim]
        rest = [s for a, s in enumerate(torch_shape) if a != dim]
        w = math.prod(rest)

        def flax_matrix(labels: np.ndarray) -> np.ndarray:
            torch_labels = np.moveaxis(labels.reshape(h, *rest), 0, dim)
            return np.moveaxis(self.to_flax(torch_labels), axis, 0).reshape(h, -1)

        rows = flax_matrix(np.broadcast_to(np.arange(h)[:, None], (h, w)))
        cols = flax_matrix(np.broadcast_to(np.arange(w)[None, :], (h, w)))
        return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(cols[0, :])


def make_layout(name: str, ndim: int, where: str) -> Layout:
    """The layout ``name`` for an array of ``ndim`` axes at ``where`` (checks the rank)."""
    if name == "identity" or ndim == 0:
        return Layout("identity", tuple(range(ndim)))
    if name == "dense":
        if ndim != 2:
            raise ValueError(
                f"The tensor at {where} has {ndim} axes; layout 'dense' ({LAYOUTS['dense']}) "
                f"needs 2. Name another layout in `layouts=`."
            )
        return Layout("dense", (1, 0))
    if ndim < 3:
        raise ValueError(
            f"The tensor at {where} has {ndim} axes; layout {name!r} ({LAYOUTS[name]}) needs at "
            f"least 3. Name another layout in `layouts=`."
        )
    spatial = tuple(range(2, ndim))
    if name == "conv":
        return Layout("conv", (*spatial, 1, 0))
    return Layout("conv_transpose", (*spatial, 0, 1), tuple(range(ndim - 2)))


def default_layout(leaf_name: str, ndim: int) -> str:
    """The layout of a Flax leaf named ``leaf_name`` when ``layouts=`` does not name one."""
    if leaf_name == "kernel":
        return "dense" if ndim == 2 else "conv" if ndim >= 3 else "identity"
    return "identity"


def check_layouts(layouts: Mapping[str, str] | None) -> dict[str, str]:
    """``layouts=`` as a dict, each value checked against ``LAYOUTS``."""
    layouts = dict(layouts or {})
    for module, name in layouts.items():
        if name not in LAYOUTS:
            raise ValueError(
                f"layouts[{module!r}] = {name!r} is not a layout; use one of "
                f"{', '.join(repr(n) for n in LAYOUTS)}."
            )
    return layouts
