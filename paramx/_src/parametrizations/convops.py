"""Convolutions as linear operators: the geometry of a Flax conv, the conv, its adjoint, and
the frequency response of a circular conv.

The Lipschitz and orthogonal-convolution parametrizations constrain a kernel as the OPERATOR
that ``flax.linen.Conv`` (or ``nnx.Conv``) applies, which depends on the conv's stride,
padding, dilation and input size, not on the kernel alone. :class:`ConvGeometry` holds those
options, spelled as Flax spells them; :func:`conv` computes exactly what a bias-free Flax
conv computes (``CIRCULAR`` padding included), at full precision; :func:`conv_transpose` is
its adjoint, for power iterations; :func:`frequency_response` gives the matrices of a
circular, stride-1 conv at each DFT frequency (Sedghi, Gupta and Long, ICLR 2019), whose
singular values are all of the conv's.

Layouts are Flax's: inputs ``(batch, *spatial, in)``, kernels ``(*spatial, in, out)``; a
Dense kernel ``(in, out)`` is a conv with no spatial axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.parametrizations.numerics import lapack

_PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


def _int_tuple(owner: str, name: str, value: Any) -> tuple[int, ...] | int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{owner}: {name} must be at least 1, got {value}.")
        return int(value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{owner}: {name} must be an int or a tuple of ints (one per spatial axis), "
            f"got {value!r}."
        ) from None
    for v in items:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(
                f"{owner}: {name} must hold positive ints (one per spatial axis), got {value!r}."
            )
    return tuple(int(v) for v in items)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A Flax conv's options that make its kernel an operator: what the Lipschitz and
    orthogonal-convolution parametrizations need to know about the layer.

    Attributes:
      input_size: The spatial size of the layer's input, e.g. ``(32, 32)``; needed by power
        iterations (the iterate has the input's shape) and by the exact circular spectrum.
        ``None`` where a method needs no size.
      strides: As ``flax.linen.Conv``'s ``strides``: an int or one per spatial axis.
      padding: As ``flax.linen.Conv``'s ``padding``: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``,
        ``"REFLECT"``, ``"CAUSAL"`` (1-D), an int, or ``(low, high)`` pairs per spatial axis.
      kernel_dilation: As ``flax.linen.Conv``'s ``kernel_dilation``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from paramx.lipschitz import ConvGeometry
      >>> g = ConvGeometry(input_size=(8, 8), strides=2, padding="CIRCULAR")
      >>> g.output_size((3, 3, 4, 4))
      (4, 4)
    """

    input_size: tuple[int, ...] | None = None
    strides: int | tuple[int, ...] = 1
    padding: Any = "SAME"
    kernel_dilation: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        owner = "ConvGeometry"
        if self.input_size is not None:
            size = _int_tuple(owner, "input_size", self.input_size)
            object.__setattr__(self, "input_size", (size,) if isinstance(size, int) else size)
        object.__setattr__(self, "strides", _int_tuple(owner, "strides", self.strides))
        object.__setattr__(
            self, "kernel_dilation", _int_tuple(owner, "kernel_dilation", self.kernel_dilation)
        )
        pad = self.padding
        if isinstance(pad, str):
            if pad.upper() not in _PADDINGS:
                raise ValueError(
                    f"{owner}: padding must be one of {_PADDINGS}, an int or (low, high) "
                    f"pairs, as flax.linen.Conv takes it; got {pad!r}."
                )
            object.__setattr__(self, "padding", pad.upper())
        elif isinstance(pad, (int, np.integer)) and not isinstance(pad, bool):
            object.__setattr__(self, "padding", int(pad))
        elif isinstance(pad, Sequence):
            pairs = []
            for p in pad:
                if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
                    pairs.append((int(p), int(p)))
                elif (
                    isinstance(p, Sequence)
                    and len(p) == 2
                    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p)
                ):
                    pairs.append((int(p[0]), int(p[1])))
                else:
                    raise ValueError(
                        f"{owner}: padding pairs must be (low, high) ints, got {pad!r}."
                    )
            object.__setattr__(self, "padding", tuple(pairs))
        else:
            raise TypeError(f"{owner}: padding {pad!r} is not a padding flax.linen.Conv takes.")

    def mismatches(self, conv: ConvGeometry, rank: int, input_size: Any = None) -> list[str]:
        """How this geometry differs from the conv ``conv`` describes (its padding, strides
        and dilation; ``input_size``, the spatial size it is applied to, when given), as
        ``"what: declared, conv"`` strings; empty when they agree."""
        out = []
        for name in ("strides", "kernel_dilation"):
            mine = self._per_axis(getattr(self, name), rank, name)
            theirs = conv._per_axis(getattr(conv, name), rank, name)
            if mine != theirs:
                out.append(f"{name}: {mine} declared, {theirs} in the conv")
        pads: tuple[Any, ...] = (self.padding, conv.padding)
        if isinstance(pads[0], int) or isinstance(pads[1], int):  # an int pads both sides
            pads = tuple(((p, p),) * rank if isinstance(p, int) else p for p in pads)
        if pads[0] != pads[1]:
            out.append(f"padding: {self.padding!r} declared, {conv.padding!r} in the conv")
        if input_size is not None and self.input_size is not None:
            if tuple(self.input_size) != tuple(input_size):
                out.append(f"input_size: {self.input_size} declared, {tuple(input_size)} given")
        return out

    # ----- per-axis views ------------------------------------------------------------------
    def _per_axis(self, value: int | tuple[int, ...], rank: int, name: str) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * rank
        if len(value) != rank:
            raise ValueError(
                f"ConvGeometry: {name}={value} has {len(value)} entries, but the kernel has "
                f"{rank} spatial axes."
            )
        return value

    def spatial_size(self, rank: int) -> tuple[int, ...]:
        """``input_size`` checked against a kernel with ``rank`` spatial axes."""
        if self.input_size is None:
            raise ValueError(
                "ConvGeometry: this needs the layer's input size; give "
                "ConvGeometry(input_size=(H, W), ...), the spatial shape of the conv's input."
            )
        return self._per_axis(self.input_size, rank, "input_size")

    def is_circular(self) -> bool:
        """Whether the padding is periodic (``"CIRCULAR"``)."""
        return self.padding == "CIRCULAR"

    def is_unit_stride(self, rank: int) -> bool:
        """Whether every stride is 1."""
        return all(s == 1 for s in self._per_axis(self.strides, rank, "strides"))

    def output_size(self, kernel_shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial size of the conv's output for a kernel of ``kernel_shape``."""
        rank = len(kernel_shape) - 2
        size = self.spatial_size(rank)
        x = jax.ShapeDtypeStruct((1, *size, kernel_shape[-2]), jnp.float32)
        k = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
        return tuple(jax.eval_shape(lambda a, b: conv(a, b, self), x, k).shape[1:-1])


def conv(x: jax.Array, kernel: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """What a bias-free ``flax.linen.Conv`` with ``geometry``'s options computes, at full
    precision.

    Args:
      x: The input, ``(batch, *spatial, in)``.
      kernel: The kernel, ``(*spatial, in, out)``; a Dense kernel ``(in, out)`` is ``x @ kernel``.
      geometry: The conv's options (``input_size`` is not used).

    Examples:
      >>> import flax.linen as nn
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from paramx.lipschitz import ConvGeometry, conv
      >>> layer = nn.Conv(4, (3, 3), strides=2, padding="CIRCULAR", use_bias=False)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
      >>> params = layer.init(jax.random.key(1), x)
      >>> y = conv(x, params["params"]["kernel"], ConvGeometry(strides=2, padding="CIRCULAR"))
      >>> bool(jnp.allclose(y, layer.apply(params, x), atol=1e-5))
      True
    """
    rank = kernel.ndim - 2
    if rank < 0:
        raise ValueError(f"conv: a kernel has at least 2 axes (in, out), got shape {kernel.shape}.")
    if x.ndim != rank + 2:
        raise ValueError(
            f"conv: the input {x.shape} should be (batch, *spatial, in) with {rank} spatial "
            f"axes for the kernel {kernel.shape}."
        )
    if rank == 0:
        return jnp.einsum("bi,io->bo", x, kernel, precision=jax.lax.Precision.HIGHEST)
    strides = geometry._per_axis(geometry.strides, rank, "strides")
    dilation = geometry._per_axis(geometry.kernel_dilation, rank, "kernel_dilation")
    pad = geometry.padding
    if pad in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:rank], dilation, strict=True)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap" if pad == "CIRCULAR" else "reflect")
        lax_pad: Any = "VALID"
    elif pad == "CAUSAL":
        if rank != 1:
            raise ValueError("conv: CAUSAL padding is for 1-D convolutions only (as in Flax).")
        x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel.shape[0] - 1), 0), (0, 0)])
        lax_pad = "VALID"
    elif isinstance(pad, int):
        lax_pad = [(pad, pad)] * rank
    elif isinstance(pad, tuple):
        if len(pad) != rank:
            raise ValueError(
                f"conv: padding {pad} has {len(pad)} pairs, the kernel {rank} spatial axes."
            )
        lax_pad = list(pad)
    else:
        lax_pad = pad
    spatial = "".join("DHW"[-rank:]) if rank <= 3 else None
    if spatial is None:
        raise ValueError(f"conv: at most 3 spatial axes, got a kernel of shape {kernel.shape}.")
    dims = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=lax_pad,
        rhs_dilation=dilation,
        dimension_numbers=dims,
        precision=jax.lax.Precision.HIGHEST,
    )


def conv_transpose(y: jax.Array, kernel: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """The adjoint of :func:`conv`: ``<conv(x), y> = <x, conv_transpose(y)>`` for every ``x``
    of shape ``(batch, *geometry.input_size, in)``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from paramx.lipschitz import ConvGeometry, conv, conv_transpose
      >>> g = ConvGeometry(input_size=(6, 6), strides=2)
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 2, 5))
      >>> x = jax.random.normal(jax.random.key(1), (1, 6, 6, 2))
      >>> y = jax.random.normal(jax.random.key(2), (1, 3, 3, 5))
      >>> bool(jnp.allclose(jnp.vdot(conv(x, k, g), y), jnp.vdot(x, conv_transpose(y, k, g))))
      True
    """
    rank = kernel.ndim - 2
    size = geometry.spatial_size(rank) if rank else ()
    x_shape = jax.ShapeDtypeStruct((y.shape[0], *size, kernel.shape[-2]), y.dtype)
    (x,) = jax.linear_transpose(lambda a: conv(a, kernel, geometry), x_shape)(y)
    return x


def frequency_response(
    kernel: jax.Array, size: Sequence[int], kernel_dilation: Any = 1
) -> jax.Array:
    """The matrices of the circular, stride-1 conv (Flax's ``CIRCULAR`` padding) at each DFT
    frequency: ``(*size, out, in)``, complex, such that the DFT of the output at frequency
    ``w`` is ``M[w] @`` the DFT of the input at ``w``.

    Their singular values, over all frequencies, are all the singular values of the conv on
    inputs of spatial size ``size`` (Sedghi, Gupta and Long, ICLR 2019). A kernel larger than
    ``size`` wraps around, as the circular conv does.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from paramx.lipschitz import ConvGeometry, conv, frequency_response
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
      >>> x = jax.random.normal(jax.random.key(1), (1, 8, 8, 2))
      >>> m = frequency_response(k, (8, 8))
      >>> y_hat = jnp.einsum("hwoi,hwi->hwo", m, jnp.fft.fftn(x[0], axes=(0, 1)))
      >>> y = conv(x, k, ConvGeometry(padding="CIRCULAR"))[0]
      >>> bool(jnp.allclose(jnp.fft.ifftn(y_hat, axes=(0, 1)).real, y, atol=1e-4))
      True
    """
    rank = kernel.ndim - 2
    size = tuple(int(s) for s in size)
    if len(size) != rank:
        raise ValueError(
            f"frequency_response: size {size} has {len(size)} axes, the kernel {kernel.shape} "
            f"{rank} spatial axes."
        )
    dilation = (kernel_dilation,) * rank if isinstance(kernel_dilation, int) else kernel_dilation
    wide = jnp.dtype(kernel.dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
    dtype = jnp.complex128 if wide else jnp.complex64
    # Place tap t at position d*t (mod n); taps that land on one position add up.
    grid = jnp.zeros((*size, *kernel.shape[-2:]), dtype)
    idx = np.indices(kernel.shape[:rank]).reshape(rank, -1)
    pos = tuple((idx[a] * dilation[a]) % size[a] for a in range(rank))
    grid = grid.at[pos].add(kernel.reshape(-1, *kernel.shape[-2:]).astype(dtype))
    axes = tuple(range(rank))
    # sum_t K[t] exp(+2 pi i w (d t - p) / n): n * ifft, times the phase of Flax's offset p.
    resp = jnp.fft.ifftn(grid, axes=axes) * jnp.asarray(float(np.prod(size)), dtype)
    for a in range(rank):
        dilated = (kernel.shape[a] - 1) * dilation[a] + 1
        p = (dilated - 1) // 2
        w = np.arange(size[a])
        phase = np.exp(-2j * np.pi * w * p / size[a])
        shape = [1] * (rank + 2)
        shape[a] = size[a]
        resp = resp * jnp.asarray(phase.reshape(shape), dtype)
    return jnp.swapaxes(resp, -1, -2)


def circular_singular_values(
    kernel: jax.Array, size: Sequence[int], kernel_dilation: Any = 1
) -> jax.Array:
    """All singular values of the circular, stride-1 conv on inputs of spatial size ``size``:
    ``(*size, min(in, out))``; their maximum is the conv's exact operator norm.

    Examples:
      >>> import jax
      >>> from paramx.lipschitz import circular_singular_values
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
      >>> circular_singular_values(k, (8, 8)).shape
      (8, 8, 4)
    """
    m = frequency_response(kernel, size, kernel_dilation)
    return lapack(jnp.linalg.svd, m, compute_uv=False)


def refuse_reflect(owner: str, geometry: ConvGeometry | None) -> None:
    """A ValueError for ``"REFLECT"`` padding, which a kernel-level bound does not cover."""
    if geometry is not None and geometry.padding == "REFLECT":
        raise ValueError(
            f"{owner}: REFLECT padding repeats border pixels, so the conv's norm can exceed the "
            f"kernel's bound (by up to √2 per axis: an orthogonal kernel reached 1.8 on an 8 x 8 "
            f"input); {owner} certifies zero (SAME, VALID, explicit, CAUSAL) and CIRCULAR "
            f"padding. Use one of those."
        )


def flax_conv_geometry(conv: Any) -> ConvGeometry:
    """The geometry of a ``flax.linen.Conv`` or ``flax.nnx.Conv`` (its strides, padding and
    dilation, as it keeps them), to compare a declared one with
    (:meth:`ConvGeometry.mismatches`)."""
    return ConvGeometry(
        strides=conv.strides or 1, padding=conv.padding, kernel_dilation=conv.kernel_dilation or 1
    )


def uncovered(p: Any, conv: ConvGeometry, kernel_shape: Sequence[int] | None = None) -> str | None:
    """Why ``p``, a parametrization with a ``geometry`` field left ``None``, does not certify
    the conv ``conv`` describes (a Flax conv it is registered on); ``None`` when it does, or
    when ``p`` declares a geometry (compared by :meth:`ConvGeometry.mismatches` instead) or
    has no such field.

    A bound without a geometry is for every zero or circular padding, stride and dilation
    (for a Cayley conv: circular padding, stride 1, on inputs of the kernel's size), so
    ``REFLECT`` padding is refused, and ``p`` with ``conv`` as its geometry must construct
    (its own refusals: a Cayley conv's padding and stride) and, given ``kernel_shape`` and
    ``conv.input_size``, read a bound (a Cayley conv's size)."""
    fields = {f.name for f in dataclasses.fields(p)} if dataclasses.is_dataclass(p) else set()
    if "geometry" not in fields or getattr(p, "geometry", None) is not None:
        return None
    if conv.padding == "REFLECT":
        return (
            "REFLECT padding repeats border pixels, so the conv's norm can exceed a bound "
            "declared without a geometry (for zero and circular padding only; an orthogonal "
            "kernel reached 1.8 on an 8 x 8 input). Use zero or CIRCULAR padding in the Conv"
            " (or, for conv_spectral_norm, declare ConvGeometry(input_size=..., "
            "padding='REFLECT'))"
        )
    try:
        with_conv = dataclasses.replace(p, geometry=conv)
        bound = getattr(with_conv, "lipschitz_bound", None)
        if callable(bound) and kernel_shape is not None and conv.input_size is not None:
            jax.eval_shape(bound, jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32))
    except (ValueError, TypeError) as e:
        return str(e)
    return None
