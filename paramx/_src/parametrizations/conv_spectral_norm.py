"""`conv_spectral_norm`: a conv kernel divided by the operator norm of its convolution.

torch's ``spectral_norm`` (and :class:`paramx.SpectralNorm`) divides a conv kernel by the
largest singular value of the kernel reshaped to a matrix, ``(out, in * kh * kw)``. That is
not the operator norm of the convolution the layer applies: the conv's norm is the largest
singular value over all frequencies of its transfer function, and may exceed the reshaped
kernel's by a factor of up to ``sqrt(kh * kw)`` (pytorch#99149). :class:`ConvSpectralNorm`
knows the conv's geometry (:class:`~paramx.lipschitz.ConvGeometry`: input size, strides,
padding, dilation, as ``flax.linen.Conv`` takes them) and divides by the operator norm itself,
computed one of three ways (``method``):

``"power"``
  Power iteration on the convolution and its adjoint (``convops.conv`` /
  ``convops.conv_transpose``), the iterate ``u`` of the input's shape ``(1, *input_size, in)``
  kept as state, exactly as :class:`paramx.SpectralNorm` keeps its vectors: 15 iterations at
  registration, ``n_power_iterations`` more at each state update (training mode), averaged over
  ``axis_name``. ``sigma = ||conv(u)||``, with ``u`` a constant unit vector, so the gradient
  flows through the kernel only (torch's estimator). Any stride, padding and dilation. The
  estimate approaches the norm from below, so the normalized conv's norm can exceed 1 by the
  estimate's error (see :meth:`ConvSpectralNorm.lipschitz_bound` for a certified value). A
  conv's top singular values are close together (one per frequency near the peak of its
  transfer function), so the iteration converges more slowly than on a matrix: on 32x32
  inputs with 16-32 channels (benchmarks/conv_norm_table.py) the normalized conv's norm was
  1.004-1.04 after the 15 warm-up iterations and one training step, and 1.000-1.008 after
  100 steps of an unchanged kernel; on 8x8 inputs, within 1e-4 after 200 steps. It is not a
  guarantee: on 8x8 stride-2 geometries the norm was 1.00-1.05 after the warm-up (12 kernels),
  and an optimizer can run ahead of the one iteration per step (Adam at lr 1e-2 maximizing a
  batch's output energy on 8x8 inputs: up to 1.29 over 60 steps, 2026-12-05);
  ``paramx.lipschitz.lipschitz`` reports the certified value.

``"fft"``
  The exact spectrum of a circular conv (``padding="CIRCULAR"``; Sedghi, Gupta and Long, ICLR
  2019): the largest singular value of the conv's matrices at the DFT frequencies of the input
  size. A stride ``s`` that divides the input size is exact too: the strided circular conv is
  a stride-1 conv on ``n / s`` frequencies whose matrices stack the ``s`` (per axis) aliased
  frequencies side by side, scaled by ``1 / sqrt(s)``. A stride that does not divide the size
  gives the stride-1 norm, an upper bound (subsampling the output never increases a norm).
  Other paddings are refused: use ``"power"`` or ``"gram"``.

``"gram"``
  A certified upper bound by Gram iteration (Delattre, Barthelemy, Araujo and Allauzen, ICML
  2023; Delattre, Barthelemy and Allauzen, arXiv 2402.00240): for matrices ``M``,
  ``sigma(M)^(2^t) = sigma(G_t) <= ||G_t||_F`` where ``G_0 = M``, ``G_{k+1} = G_k^H G_k``;
  the ratio of bound to norm falls to 1 doubly exponentially in ``t`` (at most
  ``rank^(2^-(t+1))``). It is applied, rescaled at each step so nothing overflows, to the
  conv's matrices at each frequency, and the bound is the largest over the frequencies.

Why the frequency bound holds for every padding and stride. A zero-padded conv (``"SAME"``,
``"VALID"``, explicit pairs, ``"CAUSAL"``) of an input of size ``n`` computes some of the
outputs of the full linear correlation of the zero-extended input, and that correlation is
exactly a circular conv on any size ``N >= n + (k - 1) * d`` (the wrapped taps only ever meet
zeros). So the zero-padded conv is ``R C_N E``, with ``E`` the embedding (an isometry), ``C_N``
the circular conv and ``R`` a selection of outputs (norm <= 1): its norm is at most the
circular conv's on ``N``, computed exactly by its frequency matrices. Strides select every
``s``-th output, a selection of a circularly shifted circular conv, so taking ``N`` a multiple
of ``s`` the strided (polyphase) matrices above apply. ``"REFLECT"`` padding is a VALID conv of
the reflected input, whose reflection map has norm ``sqrt(m)`` for ``m`` the most copies of one
pixel: the bound includes that factor. Without an input size the bound is the supremum of the
transfer function's largest singular value over all frequencies, which bounds the conv at
every input size, stride and dilation, for zero and circular padding (dilating by ``d`` only
reparametrizes the frequencies; ``"REFLECT"`` needs the input size for its factor):
the Gram iterate is then computed on a grid fine enough to hold all its taps exactly, and
bounded by the sum of the taps' Frobenius norms (a looser bound for the same ``t``, as the
frequency matrices are not sampled at the maximum; give ``input_size`` when you have it).

Zero kernels stay zero (sigma = 0 is replaced by 1) with finite gradients; a power-iteration
step that maps ``u`` to exactly zero keeps the previous ``u``. A Dense kernel ``(in, out)`` is a
conv with no spatial axes: its norm is the matrix's, and it needs no geometry. Complex kernels
are not supported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.parametrizations import convops, numerics
from paramx._src.parametrizations.convops import ConvGeometry
from paramx._src.parametrizations.numerics import compute_dtype, missing_state

_OWNER = "ConvSpectralNorm"
_METHODS = ("power", "fft", "gram")
_WARMUP_ITERATIONS = 15  # torch runs 15 power iterations when the parametrization is built
_GRAM_ITERATIONS = 6
_MEASURE_ITERATIONS = 500
_HIGHEST = jax.lax.Precision.HIGHEST


# ----- small numerics ---------------------------------------------------------------------------


def _safe_sqrt(sq: jax.Array) -> jax.Array:
    """``sqrt(sq)`` for ``sq >= 0`` with a finite (zero) gradient at zero."""
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, jnp.ones_like(sq))), 0)


def _norm(x: jax.Array) -> jax.Array:
    return _safe_sqrt(jnp.sum(jnp.real(x * jnp.conj(x))))


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    return x / jnp.maximum(_norm(x), eps).astype(x.dtype)


def _normalize_or_keep(x: jax.Array, previous: jax.Array, eps: float) -> jax.Array:
    norm = _norm(x)
    return jnp.where(norm > 0, x / jnp.maximum(norm, eps).astype(x.dtype), previous)


def _work_dtype(kernel: jax.Array) -> Any:
    return compute_dtype(kernel.dtype)


def _geometry(geometry: ConvGeometry | None) -> ConvGeometry:
    return ConvGeometry() if geometry is None else geometry


def _rank(kernel: Any) -> int:
    return len(kernel.shape) - 2


def _per_axis(geometry: ConvGeometry, value: Any, rank: int, name: str) -> tuple[int, ...]:
    return tuple(geometry._per_axis(value, rank, name))


# ----- the conv as frequency matrices -----------------------------------------------------------


def _reflect_copies(n: int, lo: int, hi: int) -> int:
    """The most copies of one input pixel in a reflect-padded axis (numpy's / Flax's mode)."""
    counts = np.bincount(np.pad(np.arange(n), (lo, hi), mode="reflect"), minlength=n)
    return int(counts.max())


def _round_up(n: int, s: int) -> int:
    return -(-n // s) * s


def spectral_blocks(
    kernel: jax.Array, geometry: ConvGeometry | None
) -> tuple[jax.Array, float, bool]:
    """Matrices whose largest singular value, times a factor, bounds the conv's operator norm.

    Returns ``(blocks, factor, exact)``: ``blocks`` is ``(B, out, m)`` (complex), and the norm
    of the conv ``kernel`` applies under ``geometry`` is at most ``factor * max sigma(blocks)``,
    with equality when ``exact`` (a circular conv whose strides divide the input size, or a
    Dense kernel). See the module notes for the proof. ``geometry.input_size`` is required for
    a conv kernel.
    """
    rank = _rank(kernel)
    work = _work_dtype(kernel)
    if rank == 0:
        return jnp.swapaxes(kernel.astype(work), -1, -2)[None], 1.0, True
    g = _geometry(geometry)
    size = g.spatial_size(rank)
    strides = _per_axis(g, g.strides, rank, "strides")
    dilation = _per_axis(g, g.kernel_dilation, rank, "kernel_dilation")
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:rank], dilation)]
    factor, exact = 1.0, False
    if g.padding == "CIRCULAR":
        grid = list(size)
        phases = [s if n % s == 0 else 1 for n, s in zip(size, strides)]
        exact = all(p == s for p, s in zip(phases, strides))
    else:
        padded = list(size)
        if g.padding == "REFLECT":
            copies = [_reflect_copies(n, (k - 1) // 2, k // 2) for n, k in zip(size, dilated)]
            factor = math.sqrt(math.prod(copies))
            padded = [n + k - 1 for n, k in zip(size, dilated)]
        grid = [_round_up(n + k - 1, s) for n, k, s in zip(padded, dilated, strides)]
        phases = list(strides)
    resp = _response(kernel.astype(work), grid, dilation)  # (*grid, out, in)
    out, cin = resp.shape[-2:]
    # Polyphase: frequency f = a * (N / s) + xi; the strided conv's matrix at xi stacks the
    # stride-1 matrices at the s aliases of xi side by side, over sqrt(s) (per axis).
    split: list[int] = []
    for n, s in zip(grid, phases):
        split += [s, n // s]
    resp = resp.reshape(*split, out, cin)
    xi = [2 * a + 1 for a in range(rank)]
    alias = [2 * a for a in range(rank)]
    resp = jnp.transpose(resp, (*xi, 2 * rank, *alias, 2 * rank + 1))
    n_phase = math.prod(phases)
    blocks = resp.reshape(-1, out, n_phase * cin)
    if n_phase > 1:
        blocks = blocks / jnp.asarray(math.sqrt(n_phase), blocks.dtype)
    return blocks, factor, exact


def _response(kernel: jax.Array, grid: Any, dilation: Any = 1) -> jax.Array:
    """``convops.frequency_response`` (complex ``(*grid, out, in)``), in the kernel's precision.

    Its dtype arithmetic (``result_type(float64, complex64)``) is an implicit promotion, refused
    under strict promotion; the result is the same as the promotion it asks for."""
    with jax.numpy_dtype_promotion("standard"):
        return convops.frequency_response(kernel, grid, dilation)


def _sq_frobenius(g: jax.Array) -> jax.Array:
    return jnp.sum(jnp.real(g * jnp.conj(g)), axis=(-2, -1))


def _gram_steps(blocks: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array]:
    """``iterations`` rescaled Gram steps on each block: ``(G, log_scale)`` with the true
    iterate ``exp(log_scale) * G``."""
    g = blocks
    log_scale = jnp.zeros((), blocks.real.dtype)
    for i in range(iterations):
        r = _safe_sqrt(jnp.max(_sq_frobenius(g)))
        r = jnp.where(r > 0, r, jnp.ones_like(r))
        g = g / r.astype(g.dtype)
        log_scale = 2 * (log_scale + jnp.log(r))
        if i == 0 and g.shape[-2] < g.shape[-1]:  # the smaller Gram matrix: same eigenvalues
            g = jnp.einsum("bij,bkj->bik", g, jnp.conj(g), precision=_HIGHEST)
        else:
            g = jnp.einsum("bji,bjk->bik", jnp.conj(g), g, precision=_HIGHEST)
    return g, log_scale


def _root(log_scale: jax.Array, value: jax.Array, iterations: int) -> jax.Array:
    """``(exp(log_scale) * value) ** (2 ** -iterations)``; 0 where ``value`` is 0."""
    positive = value > 0
    safe = jnp.where(positive, value, jnp.ones_like(value))
    return jnp.where(positive, jnp.exp((log_scale + jnp.log(safe)) / 2**iterations), 0)


def _gram_on_blocks(blocks: jax.Array, iterations: int) -> jax.Array:
    g, log_scale = _gram_steps(blocks, iterations)
    return _root(log_scale, _safe_sqrt(jnp.max(_sq_frobenius(g))), iterations)


def _gram_any_size(kernel: jax.Array, iterations: int) -> jax.Array:
    """A bound on ``sup_w sigma(K(w))`` over all frequencies: every input size, padding, stride
    and dilation. The Gram iterate of the transfer function is a trigonometric polynomial of
    width ``2^t (k - 1) + 1`` per axis; sampled on that many frequencies its coefficients
    (taps) come back exactly by an inverse DFT, and ``sup ||G(w)|| <= sum_x ||G_x||_F``."""
    rank = _rank(kernel)
    work = _work_dtype(kernel)
    grid = [2**iterations * (k - 1) + 1 for k in kernel.shape[:rank]]
    resp = _response(kernel.astype(work), grid)
    blocks = resp.reshape(-1, *resp.shape[-2:])
    g, log_scale = _gram_steps(blocks, iterations)
    taps = jnp.fft.ifftn(g.reshape(*grid, *g.shape[-2:]), axes=tuple(range(rank)))
    total = jnp.sum(_safe_sqrt(_sq_frobenius(taps)))
    return _root(log_scale, total, iterations)


def gram_bound(
    kernel: jax.Array, geometry: ConvGeometry | None = None, iterations: int = _GRAM_ITERATIONS
) -> jax.Array:
    """A certified upper bound on the operator norm of the conv (see the module notes).

    With ``geometry.input_size`` the bound is for that input size (tight for circular
    padding, within the zero-versus-circular padding gap otherwise); without it, for every
    input size. A Dense kernel needs no geometry. Differentiable; the result is in the
    kernel's compute dtype (float32 for bfloat16), times a rounding margin of a few ulps
    (``1 + c·eps``) so that rounding never puts it below the norm.

    Examples:
      >>> import jax
      >>> from paramx.lipschitz import ConvGeometry, circular_singular_values, gram_bound
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
      >>> exact = circular_singular_values(k, (8, 8)).max()
      >>> g = gram_bound(k, ConvGeometry(input_size=(8, 8), padding="CIRCULAR"))
      >>> bool(exact <= g <= exact * (1 + 1e-4))  # tight for a circular conv
      True
      >>> bool(gram_bound(k) >= g)  # no input size: a bound for every size and padding
      True
    """
    if _rank(kernel) > 0 and (geometry is None or geometry.input_size is None):
        if geometry is not None and geometry.padding == "REFLECT":
            raise ValueError(
                "The Gram bound of a conv with REFLECT padding needs its input size (the "
                "reflection copies border pixels, by a factor that depends on it): give "
                "ConvGeometry(input_size=(H, W), padding='REFLECT', ...)."
            )
        bound = _gram_any_size(kernel, iterations)
    else:
        blocks, factor, _ = spectral_blocks(kernel, geometry)
        bound = _gram_on_blocks(blocks, iterations)
        bound = bound * factor if factor != 1.0 else bound
    return bound * _rounding_margin(kernel, bound.dtype)


def _rounding_margin(kernel: Any, dtype: Any) -> jax.Array:
    """``1 + c·eps``: the bound is computed in floating point, and where it is tight (a
    circular conv, where Gram iteration converges to the norm itself) rounding alone could put
    it a few ulps below the exact norm. The margin covers the relative rounding error of the
    transform and the Gram products (each about ``(channels + log2(taps))·eps``, and the
    ``2^-t`` root only shrinks it), with a factor of 4 to spare."""
    channels = int(kernel.shape[-1]) + int(kernel.shape[-2])
    taps = max(1, math.prod(int(k) for k in kernel.shape[:-2]))
    eps = float(jnp.finfo(dtype).eps)
    return jnp.asarray(1 + 4 * (channels + math.log2(taps) + 8) * eps, dtype)


def _exact_circular(kernel: jax.Array, geometry: ConvGeometry | None) -> jax.Array:
    blocks, factor, _ = spectral_blocks(kernel, geometry)
    s = numerics.lapack(jnp.linalg.svd, blocks, compute_uv=False)
    return jnp.max(s) * factor


# ----- power iteration on the conv --------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 3, 4))  # one program when called eagerly (init)
def _power(
    kernel: jax.Array, geometry: ConvGeometry, u: jax.Array, n: int, eps: float
) -> jax.Array:
    def body(_: Any, u: jax.Array) -> jax.Array:
        y = convops.conv(u, kernel, geometry)
        return _normalize_or_keep(convops.conv_transpose(y, kernel, geometry), u, eps)

    return jax.lax.fori_loop(0, n, body, u)


def _input_shape(kernel: Any, geometry: ConvGeometry) -> tuple[int, ...]:
    rank = _rank(kernel)
    size = geometry.spatial_size(rank) if rank else ()
    return (1, *size, kernel.shape[-2])


def operator_norm(
    kernel: jax.Array,
    geometry: ConvGeometry | None = None,
    *,
    method: str = "power",
    iterations: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """The operator norm (l2 -> l2) of the conv that a Flax conv with ``geometry`` applies.

    A measurement, separate from any parametrization: ``"power"`` runs ``iterations``
    (default 500) power iterations on the actual conv (:func:`~paramx.lipschitz.conv`) and its
    adjoint from a random start and returns ``||conv(u)||`` for the final unit ``u``: a lower
    bound that converges to the norm (slowly when the top singular values are close, as they
    are for large inputs). ``"fft"``: the exact norm of a circular conv (any stride; exact when
    the strides divide the input size, else the stride-1 norm, an upper bound). ``"gram"``: a
    certified upper bound (``iterations`` Gram steps, default 6; see the module notes).
    ``"reshaped"``: what torch's ``spectral_norm`` divides by, the largest singular value of
    the kernel reshaped to ``(rest, out)``, which is NOT the conv's norm.

    Args:
      kernel: A conv kernel ``(*spatial, in, out)``, or a Dense kernel ``(in, out)``.
      geometry: The conv's options; ``input_size`` is needed by ``"power"`` and ``"fft"``
        (and makes ``"gram"`` tighter). Not needed for a Dense kernel.
      method: ``"power"``, ``"fft"``, ``"gram"`` or ``"reshaped"``.
      iterations: Power iterations, or Gram steps.
      key: PRNG key for the power iteration's start (default: a fixed key).

    Returns:
      A scalar in the kernel's compute dtype.

    Raises:
      ValueError: For an unknown method, a missing ``input_size``, or ``"fft"`` on a padding
        that is not circular.

    Examples:
      >>> import jax
      >>> from paramx.lipschitz import ConvGeometry, operator_norm
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> exact = operator_norm(k, g, method="fft")
      >>> bool(operator_norm(k, g, method="gram") >= exact)
      True
      >>> bool(abs(operator_norm(k, g) - exact) < 1e-3 * exact)
      True
      >>> bool(operator_norm(k, g, method="reshaped") < exact)  # the reshaped kernel's sigma
      True
    """
    _check_kernel(kernel, "operator_norm")
    if method not in (*_METHODS, "reshaped"):
        raise ValueError(
            f"operator_norm: method must be 'power', 'fft', 'gram' or 'reshaped'; got {method!r}."
        )
    if iterations is not None:
        iterations = numerics.option_int("operator_norm", "iterations", iterations)
        if iterations < 0:
            raise ValueError(f"operator_norm: iterations must be >= 0, got {iterations}.")
    work = _work_dtype(kernel)
    k = kernel.astype(work)
    if method == "reshaped":
        return jnp.linalg.norm(k.reshape(-1, k.shape[-1]), 2)
    if method == "gram":
        return gram_bound(k, geometry, _GRAM_ITERATIONS if iterations is None else iterations)
    if method == "fft":
        _check_fft(k, geometry, "operator_norm")
        return _exact_circular(k, geometry)
    g = _geometry(geometry)
    _check_power(k, geometry, "operator_norm")
    key = jax.random.key(0) if key is None else key
    u = _normalize(jax.random.normal(key, _input_shape(k, g), work), 1e-30)
    n = _MEASURE_ITERATIONS if iterations is None else iterations
    u = _power(k, g, u, n, 1e-30)
    return _norm(convops.conv(u, k, g))


# ----- checks ------------------------------------------------------------------------------------


def _check_kernel(kernel: Any, owner: str) -> None:
    shape = tuple(getattr(kernel, "shape", ()))
    if len(shape) < 2:
        raise ValueError(
            f"{owner} expects a Dense kernel (in, out) or a conv kernel (*spatial, in, out); got "
            f"shape {list(shape)}. Register it on a layer's kernel, not on a bias or a scalar."
        )
    if len(shape) > 5:
        raise ValueError(
            f"{owner}: a conv kernel has at most 3 spatial axes (*spatial, in, out); got shape "
            f"{list(shape)}. For a stack of kernels, pass batch_axes."
        )
    numerics.check_dtype(
        kernel, owner, complex_ok=False, hint="Register it on a real (float) kernel."
    )


def _check_geometry_rank(kernel: Any, geometry: ConvGeometry | None, owner: str) -> None:
    rank = _rank(kernel)
    if rank == 0 or geometry is None:
        return
    for value, name in (
        (geometry.strides, "strides"),
        (geometry.kernel_dilation, "kernel_dilation"),
        (geometry.input_size, "input_size"),
    ):
        if value is not None and not isinstance(value, int) and len(value) != rank:
            raise ValueError(
                f"{owner}: geometry.{name}={value} has {len(value)} entries, but the kernel of "
                f"shape {list(kernel.shape)} has {rank} spatial axes. Give one entry per spatial "
                f"axis (or an int)."
            )
    if isinstance(geometry.padding, tuple) and len(geometry.padding) != rank:
        raise ValueError(
            f"{owner}: geometry.padding={geometry.padding} has {len(geometry.padding)} pairs, "
            f"but the kernel of shape {list(kernel.shape)} has {rank} spatial axes."
        )


def _check_power(kernel: Any, geometry: ConvGeometry | None, owner: str) -> None:
    _check_geometry_rank(kernel, geometry, owner)
    if _rank(kernel) > 0 and (geometry is None or geometry.input_size is None):
        raise ValueError(
            f"{owner} with method='power' on the conv kernel of shape {list(kernel.shape)} needs "
            f"the conv's input size: the power iterate has the input's shape. Give "
            f"geometry=ConvGeometry(input_size=(H, W), strides=..., padding=..., "
            f"kernel_dilation=...) as the layer has them, or use method='gram', which bounds "
            f"the norm at every input size without one."
        )


def _check_fft(kernel: Any, geometry: ConvGeometry | None, owner: str) -> None:
    _check_geometry_rank(kernel, geometry, owner)
    if _rank(kernel) == 0:
        return
    if geometry is None or geometry.input_size is None:
        raise ValueError(
            f"{owner} with method='fft' on the conv kernel of shape {list(kernel.shape)} needs "
            f"geometry=ConvGeometry(input_size=(H, W), padding='CIRCULAR', ...): the spectrum "
            f"is taken at the input's DFT frequencies."
        )
    if not geometry.is_circular():
        raise ValueError(
            f"{owner}: method='fft' is the exact spectrum of a CIRCULAR conv; the geometry has "
            f"padding={geometry.padding!r}. Use method='power' (power iteration on the actual "
            f"conv, any padding) or method='gram' (a certified upper bound, any padding)."
        )


# ----- the parametrization ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvSpectralNorm:
    """Divides a conv (or Dense) kernel by the operator norm of its convolution; register it
    with :func:`conv_spectral_norm`.

    State (``method="power"`` only) is ``{'u': (1, *input_size, in)}``, the power iterate in
    the conv's input space; a Dense kernel ``(in, out)`` has ``u`` of shape ``(1, in)``.
    ``"fft"`` and ``"gram"`` have no state: they compute the norm from the kernel on every
    read, differentiably. See the module notes for what each method computes.

    Attributes:
      geometry: The conv's options (:class:`~paramx.lipschitz.ConvGeometry`): needed for a
        conv kernel with ``"power"`` and ``"fft"`` (with ``input_size``); ``"gram"`` without
        ``input_size`` bounds every input size. ``None`` for a Dense kernel.
      method: ``"power"`` (estimate, any geometry), ``"fft"`` (exact, circular padding) or
        ``"gram"`` (certified upper bound, any geometry).
      n_power_iterations: Power iterations per state update (training step), ``"power"``.
      eps: Floor of the norms in the power iteration's normalizations.
      axis_name: If set, ``u`` is averaged over this named axis after each update (data
        parallel), so replicas agree.
      gram_iterations: Gram steps for ``"gram"`` (and for :meth:`lipschitz_bound`).
      name: The display name.

    Examples:
      >>> import jax
      >>> import paramx as px
      >>> from paramx.lipschitz import ConvGeometry, operator_norm
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
      >>> tree = px.register_parametrization(
      ...     {"kernel": k}, "kernel", ConvSpectralNorm(g, method="fft"))
      >>> w = px.materialize(tree)["kernel"]
      >>> round(float(operator_norm(w, g, method="fft")), 4)
      1.0
    """

    geometry: ConvGeometry | None = None
    method: str = "power"
    n_power_iterations: int = 1
    eps: float = 1e-12
    axis_name: Any = None
    gram_iterations: int = _GRAM_ITERATIONS
    name: str = "conv_spectral_norm"

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "conv_spectral_norm"
    torch_function_positional = ()
    torch_function_keyword = (
        "geometry",
        "method",
        "n_power_iterations",
        "eps",
        "axis_name",
        "gram_iterations",
    )
    torch_function_takes_key = True
    traceable = True
    nnx_doc = """Divides ``module.<name>`` (a conv or Dense kernel) by the operator norm of
    its convolution, in place.

    Registers ``ConvSpectralNorm``. Unlike ``spectral_norm``, which divides a conv kernel by
    the norm of the reshaped kernel, this divides by the norm of the convolution the layer
    applies, which depends on its input size, strides, padding and dilation: give them as
    ``geometry``. With ``method="power"`` the iterate ``u`` is
    :class:`ParametrizationState`, updated on each read in training mode as for
    ``spectral_norm``; ``"fft"`` (circular padding, exact) and ``"gram"`` (certified upper
    bound) are stateless.

    Args:
      module: The module (``nnx.Conv``, ``nnx.Linear``).
      name: The attribute to normalize.
      geometry: ``ConvGeometry(input_size=..., strides=..., padding=..., kernel_dilation=...)``
        as the layer has them; ``None`` for a Dense kernel.
      method: ``"power"``, ``"fft"`` or ``"gram"``.
      n_power_iterations: Power iterations per read in training mode.
      eps: Floor of the norms.
      axis_name: Average ``u`` over this named axis after each update.
      gram_iterations: Gram steps for ``"gram"``.
      key: PRNG key for the initial ``u``.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> from paramx.lipschitz import ConvGeometry, operator_norm
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> layer = pnx.conv_spectral_norm(
      ...     nnx.Conv(4, 4, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0)),
      ...     geometry=g, method="fft")
      >>> round(float(operator_norm(layer.kernel, g, method="fft")), 4)
      1.0
    """

    def __post_init__(self) -> None:
        if self.geometry is not None and not isinstance(self.geometry, ConvGeometry):
            raise TypeError(
                f"{_OWNER}: geometry must be a ConvGeometry (paramx.lipschitz.ConvGeometry) or "
                f"None; got {self.geometry!r} ({type(self.geometry).__name__})."
            )
        if self.method not in _METHODS:
            raise ValueError(
                f"{_OWNER}: method must be one of {_METHODS}; got {self.method!r}. 'power' "
                f"estimates the norm by power iteration (any geometry), 'fft' computes it "
                f"exactly (circular padding), 'gram' bounds it from above (any geometry)."
            )
        if self.method == "fft" and self.geometry is not None and not self.geometry.is_circular():
            raise ValueError(
                f"{_OWNER}: method='fft' is the exact spectrum of a CIRCULAR conv; the geometry "
                f"has padding={self.geometry.padding!r}. Use method='power' (power iteration on "
                f"the actual conv, any padding) or method='gram' (a certified upper bound, any "
                f"padding)."
            )
        for field in ("n_power_iterations", "gram_iterations"):
            n = numerics.option_int(_OWNER, field, getattr(self, field))
            if n <= 0:
                raise ValueError(
                    f"{_OWNER}: {field} must be positive, got {field}={n}. The default is "
                    f"{1 if field == 'n_power_iterations' else _GRAM_ITERATIONS}."
                )
            object.__setattr__(self, field, n)
        object.__setattr__(self, "eps", numerics.option_positive_float(_OWNER, "eps", self.eps))
        try:
            hash(self.axis_name)
        except TypeError:
            raise TypeError(
                f"{_OWNER}: axis_name must be a hashable axis name (a str, or a tuple of them) "
                f"or None; got {self.axis_name!r} ({type(self.axis_name).__name__})."
            ) from None
        numerics.option_name(_OWNER, self.name)

    def _check(self, w: Any) -> None:
        _check_kernel(w, "conv_spectral_norm")
        if self.method == "power":
            _check_power(w, self.geometry, "conv_spectral_norm")
        elif self.method == "fft":
            _check_fft(w, self.geometry, "conv_spectral_norm")
        else:
            _check_geometry_rank(w, self.geometry, "conv_spectral_norm")

    def sigma(self, w: jax.Array, state: Any = None) -> jax.Array:
        """The norm ``forward`` divides by (compute dtype); ``state`` for ``"power"``."""
        if self.method == "power":
            if state is None:
                raise missing_state("conv_spectral_norm", "the power iterate u")
            u = state["u"]
            return _norm(convops.conv(u, w.astype(u.dtype), _geometry(self.geometry)))
        k = w.astype(_work_dtype(w))
        if self.method == "fft":
            return _exact_circular(k, self.geometry)
        return gram_bound(k, self.geometry, self.gram_iterations)

    # ----- the protocol --------------------------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        self._check(value)
        if self.method != "power":
            return None, None
        g = _geometry(self.geometry)
        work = _work_dtype(value)
        k = value.astype(work)
        u = _normalize(jax.random.normal(key, _input_shape(value, g), work), self.eps)
        return None, {"u": _power(k, g, u, _WARMUP_ITERATIONS, self.eps)}

    def update_state(self, w: jax.Array, *, params: Any, state: Any) -> Any:
        if state is None:
            return None
        u = state["u"]
        u = _power(
            w.astype(u.dtype), _geometry(self.geometry), u, self.n_power_iterations, self.eps
        )
        if self.axis_name is not None:
            u = _normalize(jax.lax.pmean(u, self.axis_name), self.eps)
        return {"u": u}

    def forward(self, w: jax.Array, *, params: Any, state: Any) -> jax.Array:
        self._check(w)
        sigma = self.sigma(w, state)
        # A zero kernel stays zero (no 0 / 0).
        sigma = jnp.where(sigma == 0, jnp.ones_like(sigma), sigma)
        return (w.astype(sigma.dtype) / sigma).astype(w.dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        self._check(value)
        if state is not None:
            want = state["u"].shape[-1]
            if value.shape[-2] != want:
                raise ValueError(
                    f"conv_spectral_norm: expected a kernel with {want} input channels, as the "
                    f"registered one; got shape {list(value.shape)}. Assign a value of the "
                    f"kernel's own shape."
                )
        return value, state

    # ----- the Lipschitz protocol (paramx.lipschitz) ---------------------------------------
    def lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified upper bound on the operator norm of the conv whose kernel is ``value``
        (this parametrization's output), under ``self.geometry``.

        ``"fft"``: the exact norm of the circular conv (1 up to float rounding, about 1e-6 in
        float32) times the rounding margin of :func:`gram_bound` (computed in floating point,
        the norm alone came out up to 1e-7 below the float64 one). ``"gram"``: the Gram bound
        (1 up to rounding). ``"power"``: the power
        estimate is not certified (it approaches the norm from below, so the normalized
        conv's norm may be slightly above 1); this returns the Gram bound of ``value`` instead
        (``gram_iterations`` steps), slightly above the norm. For zero padding, the Gram bound
        is that of the circular conv on the zero-extended input, which exceeds the conv's own
        norm by the boundary's effect (a few percent on 8x8 inputs, less on larger ones).
        """
        self._check(value)
        k = value.astype(_work_dtype(value))
        if self.method == "fft":  # exact up to rounding: the same margin as the Gram bound's
            bound = _exact_circular(k, self.geometry)
            return bound * _rounding_margin(k, bound.dtype)
        return gram_bound(k, self.geometry, self.gram_iterations)


def conv_spectral_norm(
    tree: Any,
    where: Any,
    *,
    geometry: ConvGeometry | None,
    method: str = "power",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    axis_name: Any = None,
    gram_iterations: int = _GRAM_ITERATIONS,
    batch_axes: int = 0,
    key: jax.Array | None = None,
) -> Any:
    """Registers :class:`ConvSpectralNorm`: each selected conv kernel is divided by the
    operator norm of its convolution (not of its reshaped kernel, as torch's
    ``spectral_norm``).

    With ``method="power"``, ``u`` starts from a random unit input (from ``key``, one per
    leaf) followed by 15 power iterations; it is state, updated by ``n_power_iterations`` in
    ``materialize(..., update_state=True)`` (training mode) and never differentiated.
    Registration does not change the kernel's raw value.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      geometry: The conv's options (``ConvGeometry(input_size=..., strides=..., padding=...,
        kernel_dilation=...)``, as the layer has them); ``None`` for Dense kernels.
      method: ``"power"``, ``"fft"`` (circular padding) or ``"gram"`` (certified bound).
      n_power_iterations: Power iterations per state update.
      eps: Floor of the norms in the power iteration.
      axis_name: Average ``u`` over this named axis after each update (data parallel).
      gram_iterations: Gram steps for ``"gram"``.
      batch_axes: Leading axes that index a stack of kernels (``nn.scan`` / ``nn.vmap``);
        each kernel of the stack is normalized by its own norm.
      key: PRNG key for the initial ``u``.

    Returns:
      The new tree.

    Raises:
      ValueError: For a kernel with fewer than 2 axes, a geometry that does not fit the
        kernel, a conv kernel without ``input_size`` for ``"power"`` / ``"fft"``, ``"fft"`` on
        a padding that is not circular, or a non-positive option.
      TypeError: For an option of the wrong type, or an integer, boolean or complex kernel.

    Examples:
      >>> import jax
      >>> import paramx as px
      >>> from paramx.lipschitz import conv_spectral_norm, operator_norm
      >>> from paramx.lipschitz import ConvGeometry
      >>> g = ConvGeometry(input_size=(8, 8), strides=2)  # SAME padding
      >>> k = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
      >>> tree = conv_spectral_norm({"conv": {"kernel": k}}, "conv/kernel", geometry=g,
      ...                           method="gram")
      >>> w = px.materialize(tree)["conv"]["kernel"]
      >>> bool(operator_norm(w, g) <= 1.0)  # the true norm, by power iteration
      True
    """
    from paramx._src.core.register import register_parametrization

    p = ConvSpectralNorm(geometry, method, n_power_iterations, eps, axis_name, gram_iterations)
    return register_parametrization(tree, where, p, key=key, batch_axes=batch_axes)
