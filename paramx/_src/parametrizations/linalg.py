"""Matrix functions of skew(-Hermitian) matrices for the orthogonal parametrization.

Two maps send a skew-symmetric (real) or skew-Hermitian (complex) matrix ``A`` (``A^H = -A``)
to an orthogonal or unitary one, each with a hand-written VJP:

* :func:`expm_skew`: the matrix exponential ``exp(A)``;
* :func:`cayley`: the Cayley transform ``(I - A/2)^{-1} (I + A/2)``.

Both take batches ``(..., n, n)``, compute bfloat16/float16 inputs in float32 and work under
``jit``, ``vmap`` and strict dtype/rank promotion.

Matrix exponential: scaling and squaring with a diagonal Padé approximant
------------------------------------------------------------------------
``r_m(x) = p_m(x) / p_m(-x)`` is the ``[m/m]`` Padé approximant of ``e^x``. ``p_m`` has real
coefficients, so for skew-Hermitian ``A`` we have ``p_m(-A) = p_m(A^H) = p_m(A)^H``, and
``p_m(A)`` is normal: ``r_m(A) = p_m(A)^{-H} p_m(A)`` is *exactly* unitary in exact arithmetic
(its eigenvalues ``p(iy) / conj(p(iy))`` have modulus one), and so is every square of it. A
truncated Taylor series has no such property. Splitting ``p_m(A) = V + U`` into its even part
``V`` and odd part ``U = A W`` (``V``, ``W`` polynomials in ``A^2``) gives ``p_m(-A) = V - U``
for free, and we evaluate ``R = I + 2 (V - U)^{-1} U``, which equals ``(V - U)^{-1} (V + U)``
but rounds to a matrix much closer to unitary when ``A`` is small (only the correction to
``I`` is rounded).

*Choosing the degree m and the number of squarings s.* ``A`` is normal, so
``r_m(A) = exp(A + h(A))`` with ``h(x) = log(e^{-x} r_m(x))``, and the backward error
``h(A)`` is itself skew-Hermitian with ``||h(A)||_2 = max |h(iy)|`` over the eigenvalues
``iy`` of ``A``: only the spectral radius ``rho(A) = ||A||_2`` matters. ``theta_m`` is the
largest ``rho`` with ``|h(i rho)| <= u rho`` (``u`` the unit roundoff), computed from the
exact power series of ``h`` on the imaginary axis. They are a little larger than Higham's
(2005) values, which bound the same series by the sum of absolute values:

========  =====================================  =================================
dtype     degrees                                theta_m
========  =====================================  =================================
float32   3, 5, 7                                0.4268, 1.912, 4.081
float64   3, 5, 7, 13                            0.01495, 0.2540, 0.9525, 5.486
========  =====================================  =================================

``rho`` is bounded by ``eta = min_k ||A^k||_1^{1/k}`` over the powers ``A^2, A^4, A^6``
that the Padé evaluation needs anyway (``rho(A) <= ||A^k||^{1/k}`` for any norm). For a
random skew matrix ``eta`` is several times smaller than ``||A||_1`` (55 against 330 for
n = 256), which saves two to three squarings compared with a 1-norm rule (Al-Mohy and Higham
2009 use the same idea for general matrices). The powers are computed lazily with
``lax.cond``: after ``A^2``, degree 3 is used if ``eta <= theta_3``; else after ``A^4``
degree 5 if ``eta <= theta_5``; else ``A^6`` is formed and the largest degree is used (in
float64, degree 7 with at most one squaring if ``eta <= 2 theta_7``, else 13), with
``s = max(0, ceil(log2(eta / theta_m)))``. Degree 9 is left out: it never costs fewer
products than 7 or 13. Scaling by ``2^-s`` is exact and folded into the scalar coefficients
(``(A/2^s)^{2k} = 2^{-2ks} A^{2k}``), so it costs no extra pass over the matrices. The
squarings run in a ``lax.while_loop`` with the data-dependent trip count ``s``. With a batch,
the degree is shared (the largest needed), ``s`` is per matrix and finished matrices are
masked. Inputs with ``||A||_1`` beyond about ``2^21`` (float32) or ``2^170`` (float64)
overflow ``A^6`` and give NaN (``jax.scipy.linalg.expm`` returns NaN from about ``5e5``).

*Backward.* JAX's VJP of ``exp`` at ``A`` for a cotangent ``G`` is the Fréchet derivative
``L_exp(A^T, G)``, with a plain transpose also for complex ``A`` (JAX transposes linear maps
rather than taking adjoints; in PyTorch's conjugate convention the same gradient reads
``L_exp(A^H, G)``). We differentiate our own chain by hand, reusing what the forward stored:

* squaring ``X_{k+1} = X_k^2``: ``Gbar_k = Gbar_{k+1} X_k^T + X_k^T Gbar_{k+1}`` (two
  products per squaring; the first squares are stored, later ones recomputed);
* Padé: with ``Q = V - U``, ``Y = Q^{-T} Rbar`` by the stored LU factors (transposed solve,
  no new factorization), ``T = Y R^T``, ``Ubar = Y + T``, ``Vbar = Y - T``;
* ``U = A W`` and the powers ``A^2, A^4, A^6``: two products for each forward product.

All these steps are functions of left and right multiplication by ``A^T``, so they commute;
this lets squares that were not stored be applied in forward order. The total is about three
times the forward's products plus one LU factorization and two pairs of triangular solves,
instead of autodiff through a generic ``expm`` (which also runs its 1-norm-based extra
squarings) or a ``2n x 2n`` block exponential. Only reverse mode is defined (``custom_vjp``).

*Cost.* ``benchmarks/linalg_cost.py`` times ``value_and_grad`` of ``sum(expm_skew(A) * C)``
in float32 against one jitted ``n x n`` product. On a 2-core AMD EPYC at n = 256 it is about
12-14 products for ``||A||_1 = 1`` (degree 3, no squaring: 7 products, the LU and four
triangular solves) and about 29-31 for ``A = X - X^T`` with ``X ~ N(0, 1)`` (degree 7, four
squarings: 25 products and the same LAPACK work), against about 19-22 and 38-42 for autodiff
through ``jax.scipy.linalg.expm``. The LAPACK part (about five products' worth: it runs on
one thread while XLA's products use two) and the three products per squaring are the floor
of this design.

Cayley transform
----------------
``C = (I - A/2)^{-1} (I + A/2) = I + M^{-1} A`` with ``M = I - A/2``. It is exactly unitary
for skew-Hermitian ``A`` and needs one LU factorization of ``M``, which the VJP
``Abar = (Y + Y C^T) / 2`` with ``Y = M^{-T} Cbar`` reuses for its single transposed solve.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from math import factorial
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["cayley", "expm_skew"]

_HIGHEST = lax.Precision.HIGHEST


class _Config(NamedTuple):
    """Per-precision constants of :func:`expm_skew`."""

    degrees: tuple[int, ...]  # Padé degrees, the last one is used with squaring
    thetas: tuple[float, ...]  # spectral-radius thresholds, one per degree
    stored_squares: int  # squares X_1..X_k kept for the backward; later ones are recomputed
    max_squarings: int  # bound on s (only reached by non-finite or absurdly large inputs)


_FLOAT32 = _Config((3, 5, 7), (0.4268, 1.912, 4.081), 4, 128)
_FLOAT64 = _Config((3, 5, 7, 13), (0.01495, 0.2540, 0.9525, 5.486), 4, 1024)


def _pade_fractions(m: int) -> tuple[Fraction, ...]:
    """Exact coefficients ``c_j`` of the ``[m/m]`` Padé numerator ``p_m(x) = sum_j c_j x^j``."""
    return tuple(
        Fraction(
            factorial(2 * m - j) * factorial(m),
            factorial(2 * m) * factorial(j) * factorial(m - j),
        )
        for j in range(m + 1)
    )


def _pade_coefficients(m: int) -> tuple[float, ...]:
    """``_pade_fractions(m)`` as floats (``c_0 = 1``, so ``p_m(A)`` stays near ``I``)."""
    return tuple(float(c) for c in _pade_fractions(m))


# ----------------------------------------------------------------------------------------------
# Small helpers.


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix product at full precision (matters on accelerators with TF32/bf16 defaults)."""
    return jnp.matmul(a, b, precision=_HIGHEST)


def _mT(a: jax.Array) -> jax.Array:
    """Transpose of the last two axes (no conjugation: JAX's VJPs transpose)."""
    return jnp.swapaxes(a, -1, -2)


def _norm1(x: jax.Array) -> jax.Array:
    """Largest absolute row sum; the 1-norm of the (skew-)Hermitian matrices used here."""
    return jnp.max(jnp.sum(jnp.abs(x), axis=-1), axis=-1)


def _pow2(k: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Exactly ``2.0**k`` in the real ``dtype``, built from the exponent bits."""
    if jnp.finfo(dtype).bits == 64:
        k = jnp.clip(k, -1022, 1023).astype(jnp.int64)
        return lax.bitcast_convert_type((k + 1023) << 52, jnp.float64)
    k = jnp.clip(k, -126, 127).astype(jnp.int32)
    return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _ceil_log2(x: jax.Array, cap: int) -> jax.Array:
    """``clip(ceil(log2(x)), 0, cap)`` as int32; NaN gives 0 (the NaN then propagates)."""
    e = jnp.ceil(jnp.log2(x))
    e = jnp.where(jnp.isnan(e), 0.0, e)
    return jnp.clip(e, 0, cap).astype(jnp.int32)


def _matrix_scalar(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A per-matrix scalar of shape ``batch`` as ``(*batch, 1, 1)`` in ``dtype``."""
    return x[..., None, None].astype(dtype)


def _eye(a: jax.Array) -> jax.Array:
    """The identity, broadcastable against ``a`` under rank promotion ``"raise"``."""
    n = a.shape[-1]
    return jnp.eye(n, dtype=a.dtype).reshape((1,) * (a.ndim - 2) + (n, n))


def _take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[..., rows, :]`` with batched ``rows``."""
    if x.ndim > 2:
        return jax.vmap(_take_rows)(x, rows)
    return x[rows, :]


def _inverse_permutation(perm: jax.Array) -> jax.Array:
    """``inv`` with ``inv[perm] = arange(n)``, batched."""
    if perm.ndim > 1:
        return jax.vmap(_inverse_permutation)(perm)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _pivots_to_permutation(piv: jax.Array) -> jax.Array:
    """The row permutation of LAPACK's interchanges ``piv``, without a length-n loop.

    Step ``k`` swaps rows ``k`` and ``piv[k] >= k``; the result ``perm`` has row ``perm[k]``
    of the input in position ``k``. Position ``k`` receives, at step ``k``, what position
    ``piv[k]`` holds then: row ``piv[k]`` itself, unless an earlier step ``j`` with
    ``piv[j] == piv[k]`` (the latest one, ``g[k]``) moved there what position ``j`` held just
    before step ``j``. That content ``D[j]`` is, by the same argument, ``D[f[j]]`` where
    ``f[j]`` is the latest ``i < j`` with ``piv[i] == j`` (or ``j`` itself if there is none),
    resolved by pointer jumping. ``jax.lax.linalg.lu``'s own conversion runs an n-step loop,
    about 0.4 matrix products at n = 256 on CPU; this one is a sort and a few gathers.
    """
    if piv.ndim > 1:
        return jax.vmap(_pivots_to_permutation)(piv)
    n = piv.shape[0]
    idx = jnp.arange(n, dtype=piv.dtype)
    f = jnp.full((n,), -1, piv.dtype).at[piv].max(jnp.where(piv > idx, idx, -1))
    d = jnp.where(f >= 0, f, idx)
    for _ in range(max(1, (n - 1).bit_length())):
        d = d[d]
    key, order = lax.sort_key_val(piv * n + idx, idx)
    same = jnp.concatenate([jnp.zeros((1,), bool), key[1:] // n == key[:-1] // n])
    prev = jnp.concatenate([jnp.full((1,), -1, piv.dtype), order[:-1]])
    g = jnp.zeros((n,), piv.dtype).at[order].set(jnp.where(same, prev, -1))
    return jnp.where(g >= 0, d[jnp.maximum(g, 0)], piv)


class _LU(NamedTuple):
    """LU factors of ``M^T`` (``M^T[perm] = L U``), used for solves with ``M`` and ``M^T``.

    Factoring the transpose lets XLA hand row-major matrices to LAPACK's column-major
    kernels without transposing copies.
    """

    lu: jax.Array
    perm: jax.Array

    @classmethod
    def of(cls, m: jax.Array) -> _LU:
        lu, pivots, _ = lax.linalg.lu(_mT(m))
        return cls(lu, _pivots_to_permutation(pivots))

    def solve(self, b: jax.Array) -> jax.Array:
        """``M^{-1} b``: with ``M = U^T L^T P``, ``(M^{-1} b)^T = b^T U^{-1} L^{-1} P``."""
        x = lax.linalg.triangular_solve(self.lu, _mT(b), left_side=False, lower=False)
        x = lax.linalg.triangular_solve(self.lu, x, left_side=False, lower=True, unit_diagonal=True)
        return _take_rows(_mT(x), _inverse_permutation(self.perm))

    def solve_transposed(self, b: jax.Array) -> jax.Array:
        """``M^{-T} b = U^{-1} L^{-1} P b``."""
        x = _mT(_take_rows(b, self.perm))
        x = lax.linalg.triangular_solve(
            self.lu, x, left_side=False, lower=True, unit_diagonal=True, transpose_a=True
        )
        x = lax.linalg.triangular_solve(self.lu, x, left_side=False, lower=False, transpose_a=True)
        return _mT(x)


def _promote(fn: Callable[[jax.Array], jax.Array], a: jax.Array, name: str) -> jax.Array:
    """Validate ``a``; run ``fn`` in float32 for bfloat16/float16 and cast back."""
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} expects a (batch of) square matrices (..., n, n), got {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        raise TypeError(f"{name} expects a floating or complex dtype, got {a.dtype}")
    if a.size == 0:
        return a
    if a.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return fn(a.astype(jnp.float32)).astype(a.dtype)
    return fn(a)


# ----------------------------------------------------------------------------------------------
# expm_skew: forward.


class _ExpmResiduals(NamedTuple):
    """What the forward computed and the backward reuses."""

    a: jax.Array  # the input A (unscaled)
    a2: jax.Array  # A^2, A^4, A^6 of the unscaled A (zeros when the degree does not use them)
    a4: jax.Array
    a6: jax.Array
    w: jax.Array  # odd part U = A_s W of the Padé numerator, A_s = A / 2^s
    w1: jax.Array  # degree 13 only: W = A_s^6 W1 + ..., V = A_s^6 Z1 + ...
    z1: jax.Array
    lu: _LU  # factors of Q = p(-A_s) = V - U
    r: jax.Array  # R = r_m(A_s)
    squares: jax.Array  # X_1, ..., X_k (k = stored_squares), X_j = R^(2^j)
    s: jax.Array  # number of squarings, per matrix
    scale: jax.Array  # 2^-s, per matrix (real)
    degree: jax.Array  # index into _Config.degrees


def _config(dtype: jnp.dtype) -> _Config:
    return _FLOAT64 if jnp.finfo(dtype).bits == 64 else _FLOAT32


def _choose_degree(
    a: jax.Array, a2: jax.Array, cfg: _Config
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Compute ``A^4``, ``A^6`` only if needed; return them, the degree index and ``eta``.

    ``eta`` bounds the spectral radius by the smallest ``||A^k||_1^{1/k}`` seen. The degree
    is shared by a batch (the largest any matrix needs), so the conditions use ``all``.
    """
    th = cfg.thetas
    eta = jnp.sqrt(_norm1(a2))  # never more than ||A||_1, which is thus not needed
    zeros = jnp.zeros_like(a)

    def degree3() -> tuple[jax.Array, ...]:
        return zeros, zeros, jnp.int32(0), eta

    def higher() -> tuple[jax.Array, ...]:
        a4 = _mm(a2, a2)
        eta4 = jnp.sqrt(jnp.sqrt(_norm1(a4)))  # <= eta as ||A^4|| <= ||A^2||^2

        def degree5() -> tuple[jax.Array, ...]:
            return a4, zeros, jnp.int32(1), eta4

        def largest() -> tuple[jax.Array, ...]:
            a6 = _mm(a4, a2)
            eta6 = jnp.minimum(eta4, _norm1(a6) ** (1.0 / 6.0))
            index: jax.Array | int = 2
            if len(cfg.degrees) == 4:  # degree 7 with s <= 1 beats degree 13
                index = jnp.where(jnp.all(eta6 <= 2.0 * th[2]), 2, 3)
            return a4, a6, jnp.asarray(index, jnp.int32), eta6

        return lax.cond(jnp.all(eta4 <= th[1]), degree5, largest)

    return lax.cond(jnp.all(eta <= th[0]), degree3, higher)


def _small_degree_coefficients(cfg: _Config) -> tuple[tuple[tuple[float, ...], ...], ...]:
    """``[degree][parity][k]``: the coefficient of ``A^{2k}`` in ``W`` (parity 0) or ``V``.

    One table for degrees 3, 5 and 7 (zero-padded) lets one kernel serve all three.
    """
    rows = []
    for m in cfg.degrees[:3]:
        c = _pade_coefficients(m) + (0.0,) * (7 - m)
        rows.append((tuple(c[1::2]), tuple(c[0::2])))
    return tuple(rows)


def _pade_parts(
    degree: jax.Array, powers: tuple[jax.Array, ...], g: tuple[jax.Array, ...], cfg: _Config
) -> tuple[jax.Array, ...]:
    """``W, V`` (and ``W1, Z1`` for degree 13) of ``p_m(A_s) = V + A_s W``.

    ``powers`` are ``(I, A^2, A^4, A^6)`` unscaled (unused ones are zero) and ``g[k]`` is
    ``2^{-2ks}`` per matrix (real), which rescales ``A^{2k}`` to ``A_s^{2k}``.
    """
    eye, a2, a4, a6 = powers
    dtype = a2.dtype
    zeros = jnp.zeros_like(a2)

    def small() -> tuple[jax.Array, ...]:
        table = jnp.asarray(_small_degree_coefficients(cfg), g[1].dtype)
        coef = table[jnp.minimum(degree, 2)]
        w, v = (
            sum(_matrix_scalar(coef[parity, k] * g[k], dtype) * powers[k] for k in range(4))
            for parity in (0, 1)
        )
        return cast(jax.Array, w), cast(jax.Array, v), zeros, zeros

    def thirteen() -> tuple[jax.Array, ...]:
        c = _pade_coefficients(13)
        s2, s4, s6 = (_matrix_scalar(gk, dtype) for gk in g[1:])
        w1 = c[13] * s6 * a6 + c[11] * s4 * a4 + c[9] * s2 * a2
        z1 = c[12] * s6 * a6 + c[10] * s4 * a4 + c[8] * s2 * a2
        w = s6 * _mm(a6, w1) + c[7] * s6 * a6 + c[5] * s4 * a4 + c[3] * s2 * a2 + c[1] * eye
        v = s6 * _mm(a6, z1) + c[6] * s6 * a6 + c[4] * s4 * a4 + c[2] * s2 * a2 + c[0] * eye
        return w, v, w1, z1

    if len(cfg.degrees) == 3:
        return small()
    return lax.cond(degree == 3, thirteen, small)


def _even_scales(scale: jax.Array) -> tuple[jax.Array, ...]:
    """``(1, 2^{-2s}, 2^{-4s}, 2^{-6s})`` per matrix: they rescale ``A^{2k}`` to ``A_s^{2k}``."""
    g1 = scale * scale
    return jnp.ones_like(scale), g1, g1 * g1, g1 * g1 * g1


def _mask(k: jax.Array | int, s: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` for the matrices of a batch that still have squarings left at step ``k``."""
    if s.ndim == 0:
        return new
    return jnp.where(_matrix_scalar(k < s, jnp.bool_), new, old)


def _square(r: jax.Array, s: jax.Array, stored: int) -> tuple[jax.Array, jax.Array]:
    """``X_s`` with ``X_0 = R``, ``X_{k+1} = X_k^2``; also returns ``X_1..X_stored``."""
    s_max = jnp.max(s)
    squares = jnp.zeros((stored, *r.shape), r.dtype)

    def store_step(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, x, squares = c
        x = _mask(k, s, _mm(x, x), x)
        return k + 1, x, lax.dynamic_update_index_in_dim(squares, x, k, 0)

    def plain_step(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, x = c
        return k + 1, _mask(k, s, _mm(x, x), x)

    init: tuple[jax.Array, ...] = (jnp.int32(0), r, squares)
    k, x, squares = lax.while_loop(lambda c: c[0] < jnp.minimum(s_max, stored), store_step, init)
    plain: tuple[jax.Array, ...] = (k, x)
    _, x = lax.while_loop(lambda c: c[0] < s_max, plain_step, plain)
    return x, squares


def _expm_forward(a: jax.Array) -> tuple[jax.Array, _ExpmResiduals]:
    cfg = _config(a.dtype)
    real = jnp.finfo(a.dtype).dtype
    a2 = _mm(a, a)
    a4, a6, degree, eta = _choose_degree(a, a2, cfg)
    s = _ceil_log2(eta / jnp.asarray(cfg.thetas, real)[degree], cfg.max_squarings)
    scale = _pow2(-s, real)
    eye = _eye(a)
    g = _even_scales(scale)
    w, v, w1, z1 = _pade_parts(degree, (eye, a2, a4, a6), g, cfg)
    u = _matrix_scalar(scale, a.dtype) * _mm(a, w)
    lu = _LU.of(v - u)
    r = eye + 2.0 * lu.solve(u)
    x, squares = _square(r, s, cfg.stored_squares)
    return x, _ExpmResiduals(a, a2, a4, a6, w, w1, z1, lu, r, squares, s, scale, degree)


# ----------------------------------------------------------------------------------------------
# expm_skew: backward.


def _square_vjp(
    g: jax.Array, r: jax.Array, squares: jax.Array, s: jax.Array, stored: int
) -> jax.Array:
    """Pull ``g`` back through the squarings: ``g <- g X_k^T + X_k^T g`` for ``k < s``."""
    s_max = jnp.max(s)

    def step(k: jax.Array | int, g: jax.Array, x: jax.Array) -> jax.Array:
        xt = _mT(x)
        return _mask(k, s, _mm(g, xt) + _mm(xt, g), g)

    # Squares beyond the stored ones, in forward order (the step operators commute).
    def recomputed(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, g, x = c
        x = _mm(x, x)
        return k + 1, step(k, g, x), x

    start: tuple[jax.Array, ...] = (jnp.int32(stored + 1), g, squares[stored - 1])
    _, g, _ = lax.while_loop(lambda c: c[0] < s_max, recomputed, start)

    def stored_step(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, g = c
        return k - 1, step(k - 1, g, lax.dynamic_index_in_dim(squares, k - 2, 0, False))

    rest: tuple[jax.Array, ...] = (jnp.minimum(s_max, stored + 1), g)
    _, g = lax.while_loop(lambda c: c[0] > 1, stored_step, rest)
    if s.ndim == 0:
        return lax.cond(s_max > 0, lambda: step(0, g, r), lambda: g)
    return step(0, g, r)


def _powers_vjp(res: _ExpmResiduals, bars: list[jax.Array]) -> jax.Array:
    """Pull cotangents of ``A^2`` and, if given, ``A^4 = A^2 A^2``, ``A^6 = A^4 A^2`` to ``A^2``."""
    if len(bars) == 3:
        a2bar, a4bar, a6bar = bars
        a4bar = a4bar + _mm(a6bar, _mT(res.a2))
        bars = [a2bar + _mm(_mT(res.a4), a6bar), a4bar]
    if len(bars) == 2:
        a2bar, a4bar = bars
        bars = [a2bar + _mm(a4bar, _mT(res.a2)) + _mm(_mT(res.a2), a4bar)]
    return bars[0]


def _pade_vjp(res: _ExpmResiduals, wbar: jax.Array, vbar: jax.Array, cfg: _Config) -> jax.Array:
    """Pull ``Wbar, Vbar`` back through the Padé polynomials and powers to ``A^2``."""
    dtype = wbar.dtype
    g = _even_scales(res.scale)

    def small() -> jax.Array:
        table = jnp.asarray(_small_degree_coefficients(cfg), g[1].dtype)
        coef = table[jnp.minimum(res.degree, 2)]
        bars = [
            _matrix_scalar(coef[0, k] * g[k], dtype) * wbar
            + _matrix_scalar(coef[1, k] * g[k], dtype) * vbar
            for k in (1, 2, 3)
        ]
        chains = [lambda k=k: _powers_vjp(res, bars[: k + 1]) for k in range(3)]
        return lax.switch(jnp.minimum(res.degree, 2), chains)

    def thirteen() -> jax.Array:
        c = _pade_coefficients(13)
        s2, s4, s6 = (_matrix_scalar(gk, dtype) for gk in g[1:])
        a6t = _mT(res.a6)
        w1bar = s6 * _mm(a6t, wbar)
        z1bar = s6 * _mm(a6t, vbar)
        a6bar = s6 * (
            _mm(wbar, _mT(res.w1))
            + _mm(vbar, _mT(res.z1))
            + c[13] * w1bar
            + c[12] * z1bar
            + c[7] * wbar
            + c[6] * vbar
        )
        a4bar = s4 * (c[11] * w1bar + c[10] * z1bar + c[5] * wbar + c[4] * vbar)
        a2bar = s2 * (c[9] * w1bar + c[8] * z1bar + c[3] * wbar + c[2] * vbar)
        return _powers_vjp(res, [a2bar, a4bar, a6bar])

    if len(cfg.degrees) == 3:
        return small()
    return lax.cond(res.degree == 3, thirteen, small)


def _expm_backward(res: _ExpmResiduals, gbar: jax.Array) -> tuple[jax.Array]:
    cfg = _config(gbar.dtype)
    dtype = gbar.dtype
    rbar = _square_vjp(gbar, res.r, res.squares, res.s, cfg.stored_squares)
    # R = I + 2 Q^{-1} U, Q = V - U: Ubar = Y + Y R^T, Vbar = Y - Y R^T with Y = Q^{-T} Rbar.
    y = res.lu.solve_transposed(rbar)
    yrt = _mm(y, _mT(res.r))
    ubar = y + yrt
    vbar = y - yrt
    # U = 2^-s A W.
    scale = _matrix_scalar(res.scale, dtype)
    abar = scale * _mm(ubar, _mT(res.w))
    wbar = scale * _mm(_mT(res.a), ubar)
    a2bar = _pade_vjp(res, wbar, vbar, cfg)
    # A^2 = A A.
    abar = abar + _mm(a2bar, _mT(res.a)) + _mm(_mT(res.a), a2bar)
    return (abar,)


@jax.custom_vjp
def _expm(a: jax.Array) -> jax.Array:
    return _expm_forward(a)[0]


_expm.defvjp(_expm_forward, _expm_backward)


def expm_skew(a: jax.Array) -> jax.Array:
    """Matrix exponential of a skew-symmetric or skew-Hermitian matrix.

    Scaling and squaring with a diagonal Padé approximant (see the module docstring), with
    its own VJP: the Fréchet derivative ``L_exp(A^T, G)`` computed by differentiating the
    approximation by hand, reusing the forward's powers, LU factors and squares.

    Args:
        a: array of shape ``(..., n, n)`` with ``a^H == -a`` (not checked: for other inputs
            the result approximates ``exp(a)`` less accurately). float32, float64, complex64
            and complex128 are computed as is; bfloat16 and float16 in float32.

    Returns:
        ``exp(a)``, orthogonal or unitary to working precision, same shape and dtype as ``a``.

    Raises:
        ValueError: if ``a`` is not a (batch of) square matrices.
        TypeError: if ``a`` is not floating point or complex.
    """
    return _promote(_expm, a, "expm_skew")


# ----------------------------------------------------------------------------------------------
# cayley.


def _cayley_forward(a: jax.Array) -> tuple[jax.Array, tuple[_LU, jax.Array]]:
    eye = _eye(a)
    lu = _LU.of(eye - 0.5 * a)
    c = eye + lu.solve(a)
    return c, (lu, c)


def _cayley_backward(res: tuple[_LU, jax.Array], cbar: jax.Array) -> tuple[jax.Array]:
    # dC = M^{-1} dA (I + C) / 2 with M = I - A/2.
    lu, c = res
    y = lu.solve_transposed(cbar)
    return (0.5 * (y + _mm(y, _mT(c))),)


@jax.custom_vjp
def _cayley(a: jax.Array) -> jax.Array:
    return _cayley_forward(a)[0]


_cayley.defvjp(_cayley_forward, _cayley_backward)


def cayley(a: jax.Array) -> jax.Array:
    """Cayley transform ``(I - A/2)^{-1} (I + A/2)`` of a skew(-Hermitian) matrix.

    One LU factorization of ``I - A/2``; the VJP reuses it for a single transposed solve.

    Args:
        a: array of shape ``(..., n, n)`` with ``a^H == -a`` (not checked). float32, float64,
            complex64 and complex128 are computed as is; bfloat16 and float16 in float32.

    Returns:
        The Cayley transform, orthogonal or unitary for skew(-Hermitian) ``a``, same shape
        and dtype as ``a``.

    Raises:
        ValueError: if ``a`` is not a (batch of) square matrices.
        TypeError: if ``a`` is not floating point or complex.
    """
    return _promote(_cayley, a, "cayley")
