"""Orthogonal convolutions: `soc` (skew-orthogonal convolution), `bcop` (block convolution
orthogonal parametrization) and `cayley_conv` (the Cayley transform in the Fourier domain).

What a kernel parametrization can promise. paramx maps the raw original to the kernel that
``flax.linen.Conv`` / ``nnx.Conv`` then applies with ITS OWN padding, stride and dilation, and
Flax checks that the materialized kernel has the shape the Conv declares. So a guarantee has to
hold for the operator the declared Conv computes:

* a kernel whose frequency response ``K(w) = sum_o K_o e^{i w.o}`` is unitary (contractive) at
  EVERY continuous frequency ``w`` gives a 1-Lipschitz conv for every zero or circular padding,
  stride and dilation (zero padding is a crop of a circular conv on a larger canvas, a stride
  subsamples, a dilation evaluates ``K`` at ``d w``), and an exactly orthogonal conv under
  ``"CIRCULAR"`` padding with stride 1 (norm-preserving when ``out >= in``);
* a kernel that is unitary only at the ``n`` DFT frequencies of an ``n``-sized input is
  orthogonal for circular padding, stride 1, on that input size, and nothing is promised
  elsewhere.

:class:`BlockOrthogonalConv` (BCOP, Li et al. 2019) is of the first kind, exactly, with the
kernel size the Conv declares; :class:`SkewOrthogonalConv` (SOC, Singla & Feizi 2021) is of the
first kind up to the truncation of its series (the value is rescaled so that the bound holds
exactly, see below), with a larger declared kernel; :class:`CayleyConv` (Trockman & Kolter 2021)
is of the second kind, with a kernel as large as the input.

Layouts are Flax's: a kernel ``(*spatial, in, out)`` acts as ``y[p] = sum_o x[p + o] K_o``
with the offsets ``o`` centred on the kernel (odd sizes) and the channel product ``x @ K_o``;
a Dense kernel ``(in, out)`` is a conv with no spatial axes. Leading axes are spatial, so a
stack of kernels (``nn.scan``) is registered with ``batch_axes``.

SOC. ``M`` is the raw kernel, ``L = M - M*`` with ``M*_o = (M_{-o})ᵀ`` the kernel of the
adjoint conv, so ``L(w)`` is skew-Hermitian at every frequency (odd kernel sizes, square
channels: ``in != out`` is embedded in ``c = max(in, out)`` channels as below).
``exp(L)`` is orthogonal at every frequency but has infinite support; SOC keeps the first
``terms`` terms of its series, ``E = sum_{j < terms} L^j / j!``, a kernel of spatial size
``1 + (terms - 1)(k - 1)`` for a raw ``k x k`` kernel (``L^j`` is ``L`` composed ``j`` times).
paramx returns that MERGED kernel, so the user's Conv must declare that size: with a 3x3 raw
kernel, ``terms=6`` needs ``kernel_size=(11, 11)`` (:func:`soc_kernel_size`). The raw original
has the raw size (a shape-changing parametrization: the original is ``k x k``, the value the
declared size). Applying an 11x11 kernel costs about ``121/9 = 13`` 3x3 convs per layer
against the 5 that SOC's own series costs on activations, the price of a kernel
parametrization that Flax's own Conv applies (the kernel itself is cheap: a few small
kernel-kernel convolutions).

Accuracy and the certified bound. Before the series, ``L`` is rescaled to ``L * min(1, max_norm /
r)``, where ``r`` is a certified upper bound of ``sup_w ||L(w)||``: ``L(w)`` is normal, so
``||L(w)||^j = ||L^j(w)|| <= sum_o ||(L^j)_o||_F`` for every ``j``, and ``r`` is the smallest
``j``-th root over the powers the series computes anyway (SOC divides by a bound too, always; paramx
only when it exceeds ``max_norm``, so a small raw kernel gives a conv near the identity). Then every
eigenvalue ``iy`` of ``L(w)`` has ``|y| <= max_norm = ρ``, and ``|E(iy)| <= 1 + τ`` with ``τ =
sum_{j >= terms} ρ^j / j!``; the value is ``E / (1 + τ)``, so its frequency response is contractive
at every frequency (1-Lipschitz for every zero or circular padding, stride and dilation), and
orthogonal to ``2τ`` (circular, stride 1). For ``ρ = 1``:

========  ===========================  ==========================
terms     declared size (3x3 raw)      τ (max deviation ≤ 2τ)
========  ===========================  ==========================
6         11                           1.6e-3
8         15                           2.8e-5
10        19                           2.7e-7
12        23                           2.1e-9
========  ===========================  ==========================

(SOC trains with about 5-6 terms and evaluates with 12.) A smaller ``max_norm`` gives a
smaller ``τ`` (``ρ^terms / terms!``) and a conv closer to the identity. There is no exact
``right_inverse`` (the truncated series has no closed-form logarithm): registration keeps the
centre ``k x k`` taps of the registered value as the raw kernel, so the registered layer reads
``soc`` of them, not the registered value (a near-identity orthogonal conv from a small
init).

Cayley. For circular padding, stride 1 and input size ``n``, the conv is block-diagonalized by
the DFT; with ``V(w)`` the raw kernel's frequency response at the ``n`` DFT frequencies,
``A(w) = V(w) - V(w)ᴴ`` is skew-Hermitian and ``Q(w) = (I - A/2)^{-1} (I + A/2)`` unitary: one
``c x c`` complex solve per frequency (half of them: the spectrum of a real kernel is
conjugate-symmetric). The spatial kernel of ``Q`` is a full ``n x n`` kernel, so the user's
Conv must be ``nn.Conv(kernel_size=(n, n), padding="CIRCULAR")`` on ``n x n`` inputs (a direct
conv costs ``n^2`` taps per output: fine for small feature maps; SOC's kernels are smaller).
Other paddings and strides are refused: the operator is orthogonal at the DFT frequencies
only. A base (state), as for ``orthogonal``'s trivialization, makes ``right_inverse`` exact:
registration stores the nearest orthogonal circular conv to the registered value (the polar
factor of its response at each frequency) as the base, and the raw original is zero; the
value is ``base ∘ cayley(raw)``.

Channels ``in != out`` (both methods): the construction runs in ``c = max(in, out)`` channels
with the raw ``(in, out)`` kernel embedded in the top-left block, and the value is that block
of the ``c``-channel orthogonal conv: norm-preserving when ``out >= in`` (an isometry), and a
projection (1-Lipschitz) when ``out < in``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from paramx._src.parametrizations import convops, numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state

_HIGHEST = lax.Precision.HIGHEST

# The certified slack on top of 1 for a value computed in float32 / float64 (rounding of the
# kernel's own arithmetic, measured well below it on 3x3..19x19 kernels with 4-16 channels),
# to which lipschitz_bound adds the rounding of a narrower value dtype (bfloat16).
_SLACK = {4: 2e-5, 8: 1e-12}


# ----- kernel algebra --------------------------------------------------------------------------
def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 2))


def _adjoint(k: jax.Array) -> jax.Array:
    """The kernel of the adjoint conv (odd sizes, centred): ``K*_o = (K_{-o})ᵀ``."""
    return jnp.swapaxes(jnp.flip(k, axis=_spatial_axes(k)), -1, -2)


def _correlate(lhs: jax.Array, rhs: jax.Array, pads: list[tuple[int, int]]) -> jax.Array:
    """``out[n, y, f] = sum_{x, c} lhs[n, y + x, c] rhs[x, c, f]`` at full precision: ``lhs``
    is ``(n, *spatial, c)``, ``rhs`` ``(*spatial, c, f)``, ``out`` ``(n, *spatial, f)``."""
    nd = rhs.ndim - 2
    dn = lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1, *range(1, nd + 1)),
        rhs_spec=(nd + 1, nd, *range(nd)),
        out_spec=(0, nd + 1, *range(1, nd + 1)),
    )
    return lax.conv_general_dilated(
        lhs, rhs, (1,) * nd, pads, dimension_numbers=dn, precision=_HIGHEST
    )


def _compose_plain(a: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`_compose` without its derivative rule."""
    nd = a.ndim - 2
    lhs = jnp.moveaxis(a, -2, 0)  # (i, *sa, m): batch = a's input channel, features = m
    rhs = jnp.flip(b, axis=tuple(range(nd)))  # (*sb, m, j): a convolution, not a correlation
    pads = [(s - 1, s - 1) for s in b.shape[:nd]]
    return jnp.moveaxis(_correlate(lhs, rhs, pads), 0, -2)


@jax.custom_jvp
def _compose(a: jax.Array, b: jax.Array) -> jax.Array:
    """The kernel of "conv with ``a``, then conv with ``b``" (stride 1, unbounded input):
    ``C_v = sum_{u + o = v} a_u @ b_o``, of spatial size ``sa + sb - 1``, centred when both are.

    A kernel-kernel convolution, computed as one ``lax.conv_general_dilated`` at full precision
    whose batch is ``a``'s input channels. Its derivative keeps each tangent in that batch
    slot: ``dC = da ∘ b + (db^T ∘ a^T)^T`` (``x^T`` transposes every tap), so reverse mode
    transposes both terms with respect to the convolution's input, never its filter. The
    filter gradient, which plain autodiff takes for ``b``, ran 20x slower than the forward on
    XLA:CPU (SOC's certified bound for a 3 x 3, 64-channel kernel: forward 7.5 ms, forward +
    backward 157 ms; 38 ms now). Forward mode works as before.
    """
    return _compose_plain(a, b)


@_compose.defjvp
def _compose_jvp(primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]) -> tuple:
    a, b = primals
    da, db = tangents
    mt = jnp.matrix_transpose
    return _compose_plain(a, b), _compose_plain(da, b) + mt(_compose_plain(mt(db), mt(a)))


def _embed(x: jax.Array) -> jax.Array:
    """``x`` (…, in, out) in the top-left block of a (…, c, c) zero kernel, c = max(in, out)."""
    cin, cout = x.shape[-2:]
    c = max(cin, cout)
    if cin == cout:
        return x
    pads = [(0, 0)] * (x.ndim - 2) + [(0, c - cin), (0, c - cout)]
    return jnp.pad(x, pads)


def _centre(x: jax.Array, size: tuple[int, ...]) -> jax.Array:
    """The centred ``size`` window of ``x``'s spatial axes (odd sizes)."""
    idx = tuple(slice((s - k) // 2, (s - k) // 2 + k) for s, k in zip(x.shape, size))
    return x[idx]


def _pad_to(x: jax.Array, size: tuple[int, ...]) -> jax.Array:
    """``x`` zero-padded, centred, to spatial ``size`` (odd sizes)."""
    pads = [((s - k) // 2, (s - k) // 2) for s, k in zip(size, x.shape)] + [(0, 0), (0, 0)]
    return jnp.pad(x, pads)


def _safe_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The Frobenius norm over ``axes``, plus at most ``sqrt(tiny)`` (an upper bound, with a
    finite gradient at zero)."""
    tiny = jnp.asarray(jnp.finfo(x.dtype).tiny, x.dtype)
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes) + tiny)


def _tail(rho: float, terms: int) -> float:
    """``sum_{j >= terms} rho^j / j!``, rounded up (float64)."""
    total, term = 0.0, rho**terms / math.factorial(terms)
    j = terms
    while term > 1e-300 and j < terms + 200:
        total += term
        j += 1
        term *= rho / j
    return total * (1 + 1e-12) + 1e-300


def _dtype_slack(value: jax.Array) -> jax.Array:
    """The certified bound's slack: the construction's rounding in the compute dtype, plus, for
    a value narrower than its compute dtype (bfloat16), the rounding of the value itself:
    ``u / (1 - u) * sum_o ||value_o||_F`` bounds the operator norm of the rounding error (every
    entry moved by at most a relative ``u``)."""
    cdt = compute_dtype(value.dtype)
    slack = jnp.asarray(_SLACK.get(jnp.dtype(cdt).itemsize, 2e-5), cdt)
    if jnp.dtype(cdt) != jnp.dtype(value.dtype):
        u = float(jnp.finfo(value.dtype).eps) / 2
        v = value.astype(cdt)
        taps = jnp.sqrt(jnp.sum(jnp.square(v), axis=(-2, -1)))
        slack = slack + jnp.asarray(u / (1 - u), cdt) * jnp.sum(taps)
    return slack


def _check_geometry(owner: str, geometry: Any) -> None:
    if geometry is not None and not isinstance(geometry, convops.ConvGeometry):
        raise TypeError(
            f"{owner}: geometry must be a paramx.lipschitz.ConvGeometry (the conv's padding, "
            f"strides, dilation and input size, as flax.linen.Conv takes them) or None; got "
            f"{geometry!r} ({type(geometry).__name__})."
        )
    convops.refuse_reflect(owner, geometry)


def _check_kernel(owner: str, x: Any) -> None:
    numerics.check_dtype(
        x,
        owner,
        complex_ok=False,
        hint="Orthogonal convolutions here are real; register a real kernel.",
    )
    if len(x.shape) < 2:
        raise ValueError(
            f"{owner} needs a kernel (*spatial, in, out) or a Dense kernel (in, out); got shape "
            f"{list(x.shape)}. Register it on a kernel, not on a bias or a scalar."
        )


# ----- SOC ---------------------------------------------------------------------------------------
_SOC = "SkewOrthogonalConv"


def soc_kernel_size(raw_size: int | tuple[int, ...] = 3, terms: int = 6) -> tuple[int, ...]:
    """The kernel size the Conv must declare for :class:`SkewOrthogonalConv` with a raw kernel
    of ``raw_size`` and ``terms`` terms of the series: ``1 + (terms - 1) * (raw_size - 1)`` per
    spatial axis.

    Args:
      raw_size: The raw (learned) kernel size, odd: an int (2-D, square) or one per axis.
      terms: The number of terms of the exponential series.

    Returns:
      The declared kernel size, a tuple.

    Examples:
      >>> from paramx.lipschitz import soc_kernel_size
      >>> soc_kernel_size(3, terms=6)
      (11, 11)
    """
    sizes = (raw_size, raw_size) if isinstance(raw_size, int) else tuple(raw_size)
    terms = numerics.option_int("soc_kernel_size", "terms", terms)
    for k in sizes:
        k = numerics.option_int("soc_kernel_size", "raw_size", k)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"soc_kernel_size: raw sizes must be odd and positive; got {sizes}.")
    return tuple(1 + (terms - 1) * (int(k) - 1) for k in sizes)


def _soc_generator(m: jax.Array, terms: int, max_norm: float) -> tuple[list[jax.Array], jax.Array]:
    """The powers ``U, U², …, U^(terms-1)`` (as kernels) of ``U = p L``, the skew-adjoint conv
    ``L = M - M*`` of the embedded raw kernel ``m`` prescaled by ``p``, and the factor ``t``
    with ``t U = s L``, ``s`` the scale that brings a certified bound of ``‖L‖`` (the smallest
    ``(Σ_o ‖(L^j)_o‖)^(1/j)``) down to at most ``max_norm``.

    ``p = min(1, max_norm / Σ_o ‖L_o‖)`` brings the ``j = 1`` bound down to ``max_norm`` before
    the powers are taken: the bounds are homogeneous (``s`` is the same), and the powers' tap
    sums stay below ``max_norm^j`` instead of ``‖L‖^j``, which overflowed float32 (NaN values
    and gradients) for a large raw kernel and many terms (``‖L‖ ≈ 100`` with 20 terms)."""
    lap = m - _adjoint(m)
    nd = lap.ndim - 2
    spatial = tuple(range(nd))
    one = jnp.asarray(1, lap.dtype)
    rho = jnp.asarray(max_norm, lap.dtype)
    pre = jnp.minimum(one, rho / jnp.sum(_safe_norm(lap, (nd, nd + 1)), axis=spatial))
    unit = lap * pre
    powers, bounds = [unit], []
    for j in range(1, terms):
        if j > 1:
            powers.append(_compose(powers[-1], unit))
        s = jnp.sum(_safe_norm(powers[-1], (nd, nd + 1)), axis=spatial)
        bounds.append(s ** (1.0 / j))
    r = jnp.min(jnp.stack(bounds))  # a bound of ||p L||
    return powers, jnp.minimum(one / pre, rho / r)


# One compiled program per shape and options: the series is many small ops, which eager use
# (registration, a plain `materialize`) would otherwise dispatch one by one.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _soc_kernel(x: jax.Array, terms: int, max_norm: float, truncation: float) -> jax.Array:
    """The SOC value of the raw kernel ``x`` (see :class:`SkewOrthogonalConv`)."""
    dense = x.ndim == 2
    dtype = x.dtype
    cin, cout = x.shape[-2:]
    m = x.astype(compute_dtype(dtype))
    if dense:
        m = m[None]
    m = _embed(m)
    c = m.shape[-1]
    nd = m.ndim - 2
    powers, scale = _soc_generator(m, terms, max_norm)
    size = powers[-1].shape[:nd]
    eye = jnp.eye(c, dtype=m.dtype).reshape((1,) * nd + (c, c))
    value = _pad_to(eye, size)
    coef = jnp.ones((), m.dtype)
    for j, p in enumerate(powers, start=1):
        coef = coef * scale / j
        value = value + coef * _pad_to(p, size)
    value = value / jnp.asarray(1 + truncation, m.dtype)
    value = value[..., :cin, :cout]
    if dense:
        value = value[0]
    return value.astype(dtype)


def check_series_padding(padding: Any) -> None:
    """Refuses a padding that :func:`soc_conv` cannot apply term by term (ValueError)."""
    if padding not in ("SAME", "CIRCULAR"):
        raise ValueError(
            f"soc_conv: padding must be 'SAME' or 'CIRCULAR' (each term keeps the input size, "
            f"so the series is a polynomial in one skew-adjoint conv); got {padding!r}. For "
            f"another padding, register soc() on a Conv with the merged kernel "
            f"(soc_kernel_size) instead."
        )


def soc_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    terms: int = 6,
    max_norm: float = 1.0,
    geometry: Any = None,
) -> jax.Array:
    """The skew-orthogonal convolution of the raw ``kernel`` applied to ``x`` term by term:
    ``(Σ_{j < terms} (sL)^j x / j!) / (1 + τ)``, one ``k x k`` conv per term.

    The same operator as a Conv with the merged kernel of :class:`SkewOrthogonalConv` (same
    ``L``, scale ``s`` and truncation ``τ``) under ``"CIRCULAR"`` padding, without building the
    ``1 + (terms - 1)(k - 1)``-sized kernel: ``terms - 1`` convs with the raw size instead of
    one with the merged size (XLA's CPU convolutions are slow on large kernels). With
    ``"SAME"`` (zero) padding every term's conv is skew-adjoint too (the adjoint of a SAME conv
    with an odd kernel is the SAME conv with the flipped, transposed kernel), so the layer is
    orthogonal to the truncation for ``in == out`` (as in the SOC paper), and 1-Lipschitz for
    every channel count. A stride subsamples the stride-1 output where Flax's strided conv of the
    merged kernel does (``y[:, ::s, ::s]``, from the second position for ``"SAME"`` padding of an
    even size with stride 2).

    Args:
      x: The input, ``(batch, *spatial, in)``; ``(batch, in)`` for a Dense kernel.
      kernel: The raw kernel ``(*k, in, out)`` with odd ``k``, or ``(in, out)``.
      terms: Terms of the exponential series (at least 2).
      max_norm: The bound on ``‖sL‖``.
      geometry: A :class:`~paramx.lipschitz.ConvGeometry` with padding ``"SAME"`` (default)
        or ``"CIRCULAR"``, any stride and dilation.

    Returns:
      ``(batch, *spatial / strides, out)`` in ``x``'s dtype.

    Raises:
      ValueError: For even kernel sizes, or a padding other than ``"SAME"`` / ``"CIRCULAR"``
        (each term has to keep the input size for the series to be a polynomial in ``L``).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from paramx.lipschitz import ConvGeometry, soc_conv
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4)) * 0.2
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
      >>> y = soc_conv(x, k, terms=10, geometry=ConvGeometry(padding="SAME"))
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5))
      True
    """
    p = SkewOrthogonalConv(terms=terms, max_norm=max_norm, geometry=geometry)
    _check_kernel("soc_conv", kernel)
    nd = kernel.ndim - 2
    if any(s % 2 == 0 for s in kernel.shape[:nd]):
        raise ValueError(
            f"soc_conv: the raw kernel's spatial sizes must be odd (a centred kernel, whose "
            f"adjoint is its flipped transpose); got shape {list(kernel.shape)}."
        )
    g = convops.ConvGeometry() if geometry is None else geometry
    if nd:
        check_series_padding(g.padding)
    cdt = compute_dtype(kernel.dtype)
    k = kernel.astype(cdt)
    m = _embed(k if nd else k[None])  # a Dense kernel as a conv with no spatial axes
    powers, scale = _soc_generator(m, p.terms, p.max_norm)
    lap = powers[0] if nd else powers[0][0]
    cin, cout = kernel.shape[-2:]
    c = lap.shape[-1]
    h = x.astype(cdt)
    h = jnp.pad(h, [(0, 0)] * (h.ndim - 1) + [(0, c - cin)])
    step = convops.ConvGeometry(padding=g.padding, kernel_dilation=g.kernel_dilation)
    term, y = h, h
    for j in range(1, p.terms):
        term = convops.conv(term, lap, step) * (scale / j)
        y = y + term
    y = y[..., :cout] / jnp.asarray(1 + p.truncation, cdt)
    if nd:
        strides = g._per_axis(g.strides, nd, "strides")
        dilation = g._per_axis(g.kernel_dilation, nd, "kernel_dilation")
        starts = [0] * nd
        if g.padding == "SAME":  # where Flax's strided SAME conv of the merged kernel starts
            for a in range(nd):
                n, s_, ext = x.shape[1 + a], strides[a], (p.terms - 1) * (k.shape[a] - 1)
                ext = ext * dilation[a] + 1
                total = max((-(-n // s_) - 1) * s_ + ext - n, 0)
                starts[a] = (ext - 1) // 2 - total // 2
        y = y[(slice(None), *(slice(o, None, s_) for o, s_ in zip(starts, strides)))]
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class SkewOrthogonalConv:
    """The skew-orthogonal convolution (SOC, Singla & Feizi 2021); register it with :func:`soc`.

    The value is ``E / (1 + τ)`` with ``E = sum_{j < terms} L^j / j!`` the truncated exponential of
    the skew-adjoint conv ``L = M - M*`` (rescaled so that a certified bound of its norm is at most
    ``max_norm``) and ``τ`` the certified truncation bound: the frequency response is contractive at
    every frequency, so the layer is 1-Lipschitz for every zero or circular padding, stride and
    dilation, and orthogonal to ``2τ`` under ``"CIRCULAR"`` padding with stride 1 (see the module
    docstring for the table of ``τ``). The declared kernel (the value) has spatial size
    ``1 + (terms - 1)(k - 1)`` for a raw ``k x k`` kernel (odd ``k``): declare it with
    :func:`soc_kernel_size`.
    ``in != out`` is supported (an isometry when ``out >= in``, a projection otherwise). A Dense
    kernel is the matrix case (``k = 1``, any ``terms``).

    Attributes:
      terms: The number of terms of the series (at least 2); 6 trains well, 10-12 is
        orthogonal to float32 accuracy (a larger declared kernel).
      max_norm: The bound ``ρ`` on ``||L(w)||`` after rescaling: the largest rotation angle.
      geometry: The conv's :class:`~paramx.lipschitz.ConvGeometry`, or None: the bound holds
        for every zero or circular padding, stride and dilation, so it is only recorded.
      name: The display name.

    Raises:
      ValueError, TypeError: At construction, for options out of range or of the wrong type;
        at registration, for a declared size that no odd raw size gives, or a non-real tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import SkewOrthogonalConv
      >>> from paramx.lipschitz import ConvGeometry, conv
      >>> p = SkewOrthogonalConv(terms=6)  # a 3x3 raw kernel: declare (11, 11)
      >>> k = jax.random.normal(jax.random.key(0), (11, 11, 4, 4)) * 0.1
      >>> tree = px.register_parametrization({"kernel": k}, "kernel", p)
      >>> px.originals(tree, "kernel")[0].shape  # the raw kernel
      (3, 3, 4, 4)
      >>> w = px.materialize(tree)["kernel"]
      >>> x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
      >>> y = conv(x, w, ConvGeometry(padding="CIRCULAR"))
      >>> bool(jnp.abs(jnp.linalg.norm(y) / jnp.linalg.norm(x) - 1) < 2 * p.truncation)
      True
    """

    terms: int = 6
    max_norm: float = 1.0
    geometry: Any = None
    name: str = "soc"

    torch_function = "soc"
    torch_function_positional = ()
    torch_function_keyword = ("terms", "max_norm", "geometry")
    torch_function_takes_key = False
    traceable = True
    # right_inverse is an initialization, not an inverse (no closed-form logarithm).
    right_inverse_exact = False
    nnx_doc = """Makes ``module.<name>`` a skew-orthogonal convolution (SOC), in place.

    Registers ``SkewOrthogonalConv``: the original (an ``nnx.Param``) is the raw ``k x k``
    kernel, the value the truncated exponential of its skew-adjoint part, a kernel of size
    ``1 + (terms - 1)(k - 1)``: the Conv must declare that size (``soc_kernel_size``). The
    layer is 1-Lipschitz for every zero or circular padding and stride, and orthogonal (to the
    truncation) with ``padding="CIRCULAR"`` and stride 1.

    Args:
      module: The module (``nnx.Conv`` with the declared size, or ``nnx.Linear``).
      name: The attribute to constrain.
      terms: Terms of the series (default 6).
      max_norm: Bound on the skew conv's norm after rescaling (default 1).
      geometry: The conv's ``ConvGeometry`` (recorded; the bound holds for all).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Conv(4, 4, (11, 11), padding="CIRCULAR", rngs=nnx.Rngs(0))
      >>> layer = pnx.soc(layer, terms=6)
      >>> layer.kernel.shape
      (11, 11, 4, 4)
    """

    def __post_init__(self) -> None:
        terms = numerics.option_int(_SOC, "terms", self.terms)
        if terms < 2:
            raise ValueError(
                f"{_SOC}: terms must be at least 2 (terms=1 is the identity); got {terms}. "
                f"6 trains well; 10-12 is orthogonal to float32 accuracy."
            )
        object.__setattr__(self, "terms", terms)
        rho = numerics.option_positive_float(
            _SOC,
            "max_norm",
            self.max_norm,
            why="It bounds the skew conv's norm, the largest rotation angle of the series "
            "(default 1.0; the truncation bound of the table in the module notes grows with it).",
        )
        object.__setattr__(self, "max_norm", rho)
        _check_geometry(_SOC, self.geometry)
        numerics.option_name(_SOC, self.name)

    @property
    def truncation(self) -> float:
        """``τ = sum_{j >= terms} max_norm^j / j!``: the value is ``E / (1 + τ)``."""
        return _tail(self.max_norm, self.terms)

    def raw_size(self, declared: tuple[int, ...]) -> tuple[int, ...]:
        """The raw kernel size for a declared (value) spatial size."""
        raw = []
        for size in declared:
            k, rem = divmod(size - 1, self.terms - 1)
            if rem or k % 2:
                good = ", ".join(str(soc_kernel_size(r, self.terms)[0]) for r in (1, 3, 5))
                raise ValueError(
                    f"{_SOC}: with terms={self.terms} the declared kernel size must be "
                    f"1 + {self.terms - 1} * (k - 1) for an odd raw size k ({good} for k = 1, "
                    f"3, 5); got spatial shape {tuple(declared)}. Declare "
                    f"kernel_size=soc_kernel_size(3, terms={self.terms}) in the Conv, or choose "
                    f"terms with (size - 1) / (terms - 1) even."
                )
            raw.append(1 + (size - 1) // (self.terms - 1))
        return tuple(raw)

    def forward(self, x: jax.Array) -> jax.Array:
        _check_kernel(_SOC, x)
        if any(s % 2 == 0 for s in x.shape[:-2]):
            raise ValueError(
                f"{_SOC}: the raw kernel's spatial sizes must be odd (a centred kernel, whose "
                f"adjoint is its flipped transpose); got shape {list(x.shape)}."
            )
        return _soc_kernel(x, self.terms, self.max_norm, self.truncation)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        """An initialization, not an inverse: the centre raw-size taps of ``value``."""
        _check_kernel(_SOC, value)
        if value.ndim == 2:
            return value
        return _centre(value, self.raw_size(value.shape[:-2]) + value.shape[-2:])

    def lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified bound on the layer's operator norm, for every zero or circular padding,
        stride and dilation: 1 plus the rounding slack (``2e-5`` for a float32 computation,
        ``1e-12`` for float64, plus a bound on the rounding of a narrower value such as
        bfloat16)."""
        _check_kernel(_SOC, value)
        return 1 + _dtype_slack(value)


def soc(
    tree: Any,
    where: Any,
    *,
    terms: int = 6,
    max_norm: float = 1.0,
    geometry: Any = None,
    batch_axes: int = 0,
) -> Any:
    """Registers :class:`SkewOrthogonalConv`: the selected kernels become skew-orthogonal
    convolutions (1-Lipschitz for every zero or circular padding and stride; orthogonal, to the
    truncation of the series, for circular padding and stride 1).

    The Conv must declare the kernel size ``1 + (terms - 1)(k - 1)`` for a raw ``k x k`` kernel
    (:func:`soc_kernel_size`); the raw kernel is registered from the centre ``k x k`` taps of
    the declared kernel.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      terms: Terms of the exponential series (default 6).
      max_norm: The bound on the skew conv's norm after rescaling (default 1).
      geometry: The conv's ``ConvGeometry`` (recorded; the bound holds for all).
      batch_axes: How many leading axes index a stack of independent kernels.

    Returns:
      The new tree.

    Raises:
      ValueError: If a declared size is not ``1 + (terms - 1)(k - 1)`` for an odd ``k``.
      TypeError: For an integer, boolean or complex tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import soc
      >>> from paramx.lipschitz import circular_singular_values
      >>> k = jax.random.normal(jax.random.key(0), (11, 11, 4, 4)) * 0.1
      >>> w = px.materialize(soc({"conv": {"kernel": k}}, "conv/kernel"))["conv"]["kernel"]
      >>> s = circular_singular_values(w, (8, 8))
      >>> bool(s.max() <= 1 + 1e-5), bool(s.min() > 0.996)
      (True, True)
    """
    from paramx._src.core.register import register_parametrization

    p = SkewOrthogonalConv(terms=terms, max_norm=max_norm, geometry=geometry)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)


# ----- Cayley in the Fourier domain --------------------------------------------------------------
_CAYLEY = "CayleyConv"
_ALTERNATIVES = (
    "Use SkewOrthogonalConv (paramx soc), whose kernels are contractive at every frequency, "
    "so 1-Lipschitz for every zero or circular padding, stride and dilation."
)


def _shift(n: tuple[int, ...]) -> tuple[int, ...]:
    """Flax's CIRCULAR offset of an ``n``-sized kernel: tap ``t`` is offset ``t - (n-1)//2``."""
    return tuple((s - 1) // 2 for s in n)


def _to_filter(k: jax.Array) -> jax.Array:
    """The kernel as a circular filter indexed by offset (tap of offset 0 first)."""
    nd = k.ndim - 2
    return jnp.roll(k, tuple(-s for s in _shift(k.shape[:nd])), axis=tuple(range(nd)))


def _from_filter(h: jax.Array) -> jax.Array:
    nd = h.ndim - 2
    return jnp.roll(h, _shift(h.shape[:nd]), axis=tuple(range(nd)))


def _spectrum(k: jax.Array) -> jax.Array:
    """The (half) DFT of a kernel's circular filter, (…, in, out) matrices, at each frequency
    (the conjugate of the response ``sum_o K_o e^{i w.o}``: unitary at the same frequencies)."""
    nd = k.ndim - 2
    if math.prod(k.shape[:nd]) == 1:  # one tap: the DFT is the identity (XLA:CPU's FFT of a
        # one-element array fails a layout check: 1 x 1 single-channel kernels)
        return lax.complex(k, jnp.zeros_like(k))
    return jnp.fft.rfftn(_to_filter(k), axes=tuple(range(nd)))


def _kernel_of(spectrum: jax.Array, size: tuple[int, ...]) -> jax.Array:
    nd = len(size)
    if math.prod(size) == 1:  # as in _spectrum
        return jnp.real(spectrum)
    return _from_filter(jnp.fft.irfftn(spectrum, s=size, axes=tuple(range(nd))))


def _mH(x: jax.Array) -> jax.Array:
    return jnp.conj(jnp.swapaxes(x, -1, -2))


@jax.jit
def _cayley_kernel(x: jax.Array, base: jax.Array) -> jax.Array:
    """The Cayley conv of the raw kernel ``x`` after ``base`` (see :class:`CayleyConv`)."""
    dtype = x.dtype
    cdt = compute_dtype(dtype)
    cin, cout = x.shape[-2:]
    dense = x.ndim == 2
    v = _embed(x.astype(cdt))
    base = base.astype(cdt)
    if dense:
        v, base = v[None], base[None]
    size = v.shape[:-2]
    a = _spectrum(v)
    a = a - _mH(a)
    from paramx._src.parametrizations import linalg

    q = matmul(_spectrum(base), linalg.cayley(a))
    k = _kernel_of(q[..., :cin, :cout], size)
    if dense:
        k = k[0]
    return k.astype(dtype)


@jax.jit
def _cayley_base(value: jax.Array) -> jax.Array:
    """The nearest orthogonal circular conv to ``value``, completed to ``max(in, out)``
    channels: the polar factor of its response at every DFT frequency."""
    from paramx._src.parametrizations.orthogonal import _complete_base

    cdt = compute_dtype(value.dtype)
    v = value.astype(cdt)
    dense = v.ndim == 2
    if dense:
        v = v[None]
    size = v.shape[:-2]
    cin, cout = v.shape[-2:]
    f = _spectrum(v)
    u, _, wh = numerics.lapack(jnp.linalg.svd, f, full_matrices=False)
    polar = matmul(u, wh)  # (…, in, out), semi-unitary
    if cin < cout:
        full = _mH(_complete_base(_mH(polar)))
    elif cin > cout:
        full = _complete_base(polar)
    else:
        full = polar
    base = _kernel_of(full, size)
    return base[0] if dense else base


@dataclasses.dataclass(frozen=True)
class CayleyConv:
    """An orthogonal circular convolution by the Cayley transform in the Fourier domain
    (Trockman & Kolter 2021); register it with :func:`cayley_conv`.

    For ``padding="CIRCULAR"``, stride 1 and dilation 1 on inputs of size ``n``, the value's
    response at each DFT frequency is ``B(w) Q(w)`` with ``Q = cayley(V - Vᴴ)`` of the raw
    kernel's response ``V`` and ``B`` a unitary base kept as state (the nearest orthogonal conv
    to the registered value): the conv is orthogonal (``in == out``), an isometry
    (``out > in``) or a projection (``out < in``), exactly, at that input size. The kernel is
    full-size: the Conv must declare ``kernel_size`` equal to the input size. ``right_inverse``
    is exact on orthogonal circular convs (and projects other values onto them).

    Attributes:
      geometry: The conv's :class:`~paramx.lipschitz.ConvGeometry` (``padding="CIRCULAR"``,
        stride 1, dilation 1; ``input_size`` equal to the kernel's spatial shape), or None:
        circular on inputs of the kernel's own spatial size (a Dense kernel: an orthogonal
        matrix).
      name: The display name.

    Raises:
      ValueError: At construction, for another padding, a stride or a dilation (with the
        methods that support them); at registration, for a kernel whose size is not the input
        size.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import CayleyConv
      >>> from paramx.lipschitz import ConvGeometry, circular_singular_values
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> k = jax.random.normal(jax.random.key(0), (8, 8, 4, 4))
      >>> tree = px.register_parametrization({"kernel": k}, "kernel", CayleyConv(g))
      >>> s = circular_singular_values(px.materialize(tree)["kernel"], (8, 8))
      >>> bool(jnp.allclose(s, 1, atol=1e-5))
      True
    """

    geometry: Any = None
    name: str = "cayley_conv"

    torch_function = "cayley_conv"
    torch_function_positional = ()
    torch_function_keyword = ("geometry",)
    torch_function_takes_key = False
    traceable = True
    right_inverse_exact = True
    nnx_doc = """Makes ``module.<name>`` an orthogonal circular convolution (Cayley transform in
    the Fourier domain), in place.

    Registers ``CayleyConv``: the original (an ``nnx.Param``) is the raw kernel, zero after
    registration, and the state holds the base, the nearest orthogonal circular conv to the
    registered kernel. The Conv must be ``padding="CIRCULAR"``, stride 1, with a kernel as
    large as its input (``kernel_size=(n, n)`` on ``n x n`` inputs).

    Args:
      module: The module (``nnx.Conv(..., kernel_size=(n, n), padding="CIRCULAR")``).
      name: The attribute to constrain.
      geometry: The conv's ``ConvGeometry`` (or None: circular on inputs of the kernel's size).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.cayley_conv(nnx.Conv(4, 4, (8, 8), padding="CIRCULAR", rngs=nnx.Rngs(0)))
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
      >>> y = layer(x) - layer.bias[...]
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5))
      True
    """

    def __post_init__(self) -> None:
        _check_geometry(_CAYLEY, self.geometry)
        g = self.geometry
        if g is not None:
            if not g.is_circular():
                raise ValueError(
                    f"{_CAYLEY} needs padding='CIRCULAR' (its conv is orthogonal at the DFT "
                    f"frequencies of a circular conv only); got padding={g.padding!r}. "
                    f"{_ALTERNATIVES}"
                )
            for name, v in (("strides", g.strides), ("kernel_dilation", g.kernel_dilation)):
                if any(s != 1 for s in ((v,) if isinstance(v, int) else v)):
                    raise ValueError(
                        f"{_CAYLEY} supports stride 1 and dilation 1 only; got {name}={v}. "
                        f"{_ALTERNATIVES}"
                    )
        numerics.option_name(_CAYLEY, self.name)

    def _check(self, x: Any) -> None:
        _check_kernel(_CAYLEY, x)
        g = self.geometry
        if g is None or g.input_size is None or len(x.shape) == 2:
            return
        size = g.spatial_size(len(x.shape) - 2)
        if tuple(x.shape[:-2]) != tuple(size):
            raise ValueError(
                f"{_CAYLEY}: the kernel's spatial shape {tuple(x.shape[:-2])} must equal the "
                f"input size {tuple(size)}: the Cayley conv is a full circular filter. Declare "
                f"kernel_size={tuple(size)} with padding='CIRCULAR' in the Conv. {_ALTERNATIVES}"
            )

    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        self._check(value)
        return None, {"base": self._base(value)}

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        self._check(x)
        if state is None:
            raise missing_state(_CAYLEY, "the base")
        return _cayley_kernel(x, state["base"])

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Exact on orthogonal circular convs: the base becomes the nearest orthogonal circular
        conv to ``value`` (the polar factor of its response at every DFT frequency, completed to
        ``max(in, out)`` channels), and the raw kernel zero."""
        self._check(value)
        return jnp.zeros_like(value), {"base": self._base(value)}

    def _base(self, value: jax.Array) -> jax.Array:
        return _cayley_base(value)

    def lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified bound on the operator norm of the circular conv (stride 1, the input size
        of ``geometry``): 1 plus the rounding slack (see :class:`SkewOrthogonalConv`)."""
        self._check(value)
        return 1 + _dtype_slack(value)


def cayley_conv(tree: Any, where: Any, *, geometry: Any = None, batch_axes: int = 0) -> Any:
    """Registers :class:`CayleyConv`: the selected kernels become orthogonal circular
    convolutions (Cayley transform at every DFT frequency).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      geometry: The conv's ``ConvGeometry``: ``padding="CIRCULAR"``, stride 1, and an input
        size equal to the kernel's spatial shape (None: circular, on inputs of that size).
      batch_axes: How many leading axes index a stack of independent kernels.

    Returns:
      The new tree.

    Raises:
      ValueError: For another padding, a stride or a dilation, or a kernel smaller than the
        input.
      TypeError: For an integer, boolean or complex tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import cayley_conv
      >>> from paramx.lipschitz import ConvGeometry, conv
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> k = jax.random.normal(jax.random.key(0), (8, 8, 4, 6))  # 4 -> 6 channels
      >>> w = px.materialize(cayley_conv({"k": k}, "k", geometry=g))["k"]
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
      >>> y = conv(x, w, g)
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(
        tree, where, CayleyConv(geometry=geometry), batch_axes=batch_axes
    )


# ----- BCOP: block convolution orthogonal parametrization ---------------------------------------
_BCOP = "BlockOrthogonalConv"


def _orthogonal(x: jax.Array) -> jax.Array:
    """paramx's ``orthogonal`` without a base: orthonormal rows (``in <= out``) or columns."""
    from paramx._src.parametrizations.orthogonal import Orthogonal

    return Orthogonal(None, use_trivialization=False).forward(x, params=None, state=None)


def _block(p: jax.Array, axis: int, nd: int) -> jax.Array:
    """The 2-tap kernel ``[P, I - P]`` along spatial ``axis``: unitary response
    ``P + (I - P) e^{iw}`` at every frequency, for an orthogonal projector ``P``."""
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    taps = jnp.stack([p, eye - p])  # (2, c, c)
    shape = [1] * nd
    shape[axis] = 2
    return taps.reshape(*shape, *p.shape[-2:])


@jax.jit
def _bcop_kernel(h: jax.Array, *projectors: jax.Array) -> jax.Array:
    """The BCOP kernel of the originals (see :class:`BlockOrthogonalConv`)."""
    dtype = h.dtype
    cdt = compute_dtype(dtype)
    cin, cout = h.shape
    nd = len(projectors)
    v = _orthogonal(h.astype(cdt))
    if nd == 0:
        return v.astype(dtype)
    kernel = None if cin > cout else v.reshape(*(1,) * nd, cin, cout)
    for axis, raw in enumerate(projectors):
        if raw.size == 0:
            continue
        q = _orthogonal(raw.astype(cdt))  # (k - 1, c, r), orthonormal columns
        proj = matmul(q, jnp.swapaxes(q, -1, -2))
        for i in range(proj.shape[0]):
            block = _block(proj[i], axis, nd)
            kernel = block if kernel is None else _compose(kernel, block)
    if cin > cout:
        head = v.reshape(*(1,) * nd, cin, cout)
        kernel = head if kernel is None else _compose(kernel, head)
    assert kernel is not None
    return kernel.astype(dtype)


@dataclasses.dataclass(frozen=True)
class BlockOrthogonalConv:
    """Block convolution orthogonal parametrization (BCOP, Li et al. 2019); register it with
    :func:`bcop`.

    The kernel is an orthogonal matrix composed with ``k - 1`` two-tap convolutions ``[P, I - P]``
    along each spatial axis, each ``P = Q Qᵀ`` an orthogonal projector of rank ``c // 2`` (``c =
    max(in, out)``); every factor has a unitary frequency response at EVERY frequency, so the ``k x
    k`` kernel does too: a 1-Lipschitz layer for every zero or circular padding, stride and
    dilation, exactly orthogonal (``in == out``) or an isometry (``out > in``) under ``"CIRCULAR"``
    padding with stride 1, with the kernel size the Conv declares (any size, even ones included: the
    composed kernel is a shifted one, and a shift is orthogonal). The orthogonal matrices are
    paramx's ``orthogonal`` (without a base: the matrix exponential for the square ``in == out``
    matrix, Householder products for the projectors' ``Q``).

    Originals: the matrix ``(in, out)`` and one stack ``(k_a - 1, c, c // 2)`` of projector
    factors per spatial axis. There is no exact ``right_inverse`` (a kernel is not factored):
    registration seeds the originals from the registered kernel's entries (its taps' sum for
    the matrix, its entries cycled for the projectors), so a random init gives a random
    orthogonal conv.

    Attributes:
      geometry: The conv's :class:`~paramx.lipschitz.ConvGeometry`, or None: the bound holds
        for every zero or circular padding, stride and dilation, so it is only recorded.
      name: The display name.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import BlockOrthogonalConv
      >>> from paramx.lipschitz import circular_singular_values
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
      >>> tree = px.register_parametrization({"kernel": k}, "kernel", BlockOrthogonalConv())
      >>> [o.shape for o in px.originals(tree, "kernel")]
      [(4, 4), (2, 4, 2), (2, 4, 2)]
      >>> s = circular_singular_values(px.materialize(tree)["kernel"], (8, 8))
      >>> bool(jnp.allclose(s, 1, atol=1e-5))
      True
    """

    geometry: Any = None
    name: str = "bcop"

    torch_function = "bcop"
    torch_function_positional = ()
    torch_function_keyword = ("geometry",)
    torch_function_takes_key = False
    traceable = True
    right_inverse_exact = False
    nnx_doc = """Makes ``module.<name>`` a block-convolution orthogonal kernel (BCOP), in place.

    Registers ``BlockOrthogonalConv``: the originals (``nnx.Param``) are an orthogonal
    matrix's and the projectors' raw factors; the kernel keeps the Conv's declared size and has
    a unitary response at every frequency: 1-Lipschitz for every zero or circular padding and
    stride, orthogonal with ``padding="CIRCULAR"`` and stride 1.

    Args:
      module: The module (``nnx.Conv``, or ``nnx.Linear``: an orthogonal matrix).
      name: The attribute to constrain.
      geometry: The conv's ``ConvGeometry`` (recorded; the bound holds for all).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.bcop(nnx.Conv(4, 4, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0)))
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
      >>> y = layer(x) - layer.bias[...]
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5))
      True
    """

    def __post_init__(self) -> None:
        _check_geometry(_BCOP, self.geometry)
        numerics.option_name(_BCOP, self.name)

    def forward(self, h: jax.Array, *projectors: jax.Array) -> jax.Array:
        _check_kernel(_BCOP, h)
        if h.ndim != 2:
            raise ValueError(
                f"{_BCOP}: the first original is the (in, out) matrix; got shape {list(h.shape)}."
            )
        return _bcop_kernel(h, *projectors)

    def right_inverse(self, value: jax.Array) -> tuple[jax.Array, ...]:
        """An initialization, not an inverse: the originals seeded from ``value``'s entries."""
        _check_kernel(_BCOP, value)
        nd = value.ndim - 2
        cin, cout = value.shape[-2:]
        c = max(cin, cout)
        if c < 2 and any(n > 1 for n in value.shape[:nd]):
            raise ValueError(
                f"{_BCOP}: a kernel of shape {list(value.shape)} has one channel in and out; "
                f"BCOP's projectors have rank max(in, out) // 2 = 0 there, so it can only make "
                f"a 1 x 1 kernel. Give the conv at least 2 channels, a 1 x 1 kernel, or use "
                f"SkewOrthogonalConv (paramx soc)."
            )
        h = jnp.sum(value, axis=tuple(range(nd))) if nd else value
        flat = value.reshape(-1)
        out: list[jax.Array] = [h]
        for axis in range(nd):
            shape = (value.shape[axis] - 1, c, c // 2)
            n = math.prod(shape)
            reps = -(-n // max(flat.size, 1))
            seed = jnp.tile(jnp.roll(flat, axis), reps)[:n] if flat.size else jnp.zeros(n)
            out.append(seed.reshape(shape).astype(value.dtype))
        return tuple(out)

    def lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified bound on the layer's operator norm, for every zero or circular padding,
        stride and dilation: 1 plus the rounding slack (see :class:`SkewOrthogonalConv`)."""
        _check_kernel(_BCOP, value)
        return 1 + _dtype_slack(value)


def bcop(tree: Any, where: Any, *, geometry: Any = None, batch_axes: int = 0) -> Any:
    """Registers :class:`BlockOrthogonalConv`: the selected kernels become block-convolution
    orthogonal kernels of their declared size (1-Lipschitz for every zero or circular padding and
    stride; orthogonal for circular padding and stride 1).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      geometry: The conv's ``ConvGeometry`` (recorded; the bound holds for all).
      batch_axes: How many leading axes index a stack of independent kernels.

    Returns:
      The new tree.

    Raises:
      ValueError: For a tensor of fewer than 2 axes.
      TypeError: For an integer, boolean or complex tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import bcop
      >>> from paramx.lipschitz import ConvGeometry, conv
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))  # 4 -> 6 channels
      >>> w = px.materialize(bcop({"k": k}, "k"))["k"]
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
      >>> y = conv(x, w, ConvGeometry(padding="CIRCULAR"))
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(
        tree, where, BlockOrthogonalConv(geometry=geometry), batch_axes=batch_axes
    )
