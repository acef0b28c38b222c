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
masked. Under ``jax.vmap`` (batched materialization, ``nn.vmap`` stacks, a user's own vmap)
the same happens: the forward has a ``custom_vmap`` rule that calls it on the stack, where
plain vmap would turn each ``lax.cond`` into a select of all its branches (every degree
computed, each with its LU solve); the degree it returns is shared, so the backward's
conditionals stay conditionals under plain vmap. Each squaring doubles the rounding error
of the angles, so ``s`` is capped where ``2^s u`` reaches ``2^-9``: 15 squarings in float32
(``eta`` up to ``4.081 * 2^15``, about ``1.3e5``), 44 in float64 (about ``9.7e13``). Beyond,
the value and its gradient are NaN rather than amplified rounding (``jax.scipy.linalg.expm``
returns NaN from about ``5e5``).

*Backward.* JAX's VJP of ``exp`` at ``A`` for a cotangent ``G`` is the Fréchet derivative
``L_exp(A^T, G)``, with a plain transpose also for complex ``A`` (JAX transposes linear maps
rather than taking adjoints; in PyTorch's conjugate convention the same gradient reads
``L_exp(A^H, G)``). We differentiate our own chain by hand, reusing what the forward stored:

* squaring ``X_{k+1} = X_k^2``: ``Gbar_k = Gbar_{k+1} X_k^T + X_k^T Gbar_{k+1}`` (two
  products per squaring; the first squares are stored, later ones recomputed);
* Padé: with ``Q = V - U``, ``Y = Q^{-T} Rbar`` by the stored ``Q^{-1}`` (one product: the
  forward computes ``Q^{-1}`` from its LU and then ``R = I + 2 Q^{-1} U`` by a product, so no
  triangular solve is left for the backward; ``Q`` is well conditioned by the choice of
  degree and scaling), ``T = Y R^T``, ``Ubar = Y + T``, ``Vbar = Y - T``;
* ``U = A W`` and the powers ``A^2, A^4, A^6``: two products for each forward product.

All these steps are functions of left and right multiplication by ``A^T``, so they commute;
this lets squares that were not stored be applied in forward order. The total is about three
times the forward's products plus one LU factorization and one pair of triangular solves,
instead of autodiff through a generic ``expm`` (which also runs its 1-norm-based extra
squarings) or a ``2n x 2n`` block exponential. Only reverse mode is defined (``custom_vjp``);
forward over reverse works (``jax.hessian``, Hessian-vector products ``jax.jvp`` of
``jax.grad``, also under ``vmap``), reverse over reverse does not (``jax.grad`` of a gradient:
the backward's squaring loops are ``while`` loops); ``plan="static"`` and :func:`cayley`
support both.

*Cost.* ``benchmarks/linalg_cost.py`` times ``value_and_grad`` of ``sum(expm_skew(A) * C)``
in float32 against one jitted ``n x n`` product. On a 2-core AMD Zen 4 at n = 256 it is about
14 products for ``||A||_1 = 1`` (degree 3, no squaring: 9 products, the LU and two triangular
solves) and about 34 for ``A = X - X^T`` with ``X ~ N(0, 1)`` (degree 7, four squarings: 27
products and the same LAPACK work), against about 25 and 47 for autodiff through
``jax.scipy.linalg.expm``. The counts depend on the CPU: the LAPACK part runs on one thread
while XLA's products use every core, so a faster product makes the same time more products
(an older host with a 17% slower product measured 12-14 and 29-31 with two more solves).
The LAPACK part and the three products per squaring are the floor of this design.

Matrix exponential: the static plan (``plan="static"``)
------------------------------------------------------
The adaptive plan above decides at run time (``lax.cond`` on the degree, ``lax.while_loop``
over the squarings: 4 ``while`` and 4 ``cond`` in a forward+backward), and on a GPU or TPU
each decision is a device-to-host round trip. The static plan has no data-dependent control
flow in its forward or its (autodiff) backward, and only matrix products:

* the degree-18 Taylor polynomial in 5 products (Bader, Blanes and Casas 2019), always;
* the spectral-radius bound ``eta = min(||A^2||^(1/2), ||A^3||^(1/3), ||A^6||^(1/6))`` from
  the powers the scheme needs anyway, and ``s = ceil(log2(eta / theta))`` computed on the
  device, the scaling ``2^-s`` folded exactly into the powers;
* ``max_squarings`` squarings, each masked (``jnp.where(k < s, X^2, X)``), so every matrix
  runs the same straight-line program (s is per matrix in a batch).

Accuracy: the scheme forms ``I`` from products of coefficients near 11 and 0.09, which in
float32 costs ten times the adaptive plan's error for small ``A``; splitting the identity off
(``T18 = I + E``, ``E`` from the same two products) and squaring the correction
(``(I + E)^2 = I + (2E + E E)``) removes that. ``theta`` (1.0 in float32, 0.6 in float64) is
below the largest admissible one (3.53 and 1.155 by the same backward-error rule as the Padé
thresholds, checked in tests/test_linalg.py) because the squarings are run anyway and fewer
rounding errors then accumulate. Against ``scipy.linalg.expm`` over 1-norms 1e-3 .. 1e3 its
error equals the adaptive plan's below norm 1 and is within 1-3x of it above (both near
``u ||A||`` there). Reach: ``theta * 2^max_squarings`` = 2048 (float32, 11 squarings) or 2458
(float64, 12) for ``eta``; beyond, the error grows like ``(eta / reach)^19``, and from
where that reaches ``2^-9`` (``eta`` above about 3540 in float32, 12240 in float64) the value
and its gradient are NaN. Cost: 5 + ``max_squarings`` products forward, about twice that backward,
whatever the norm: on CPU 1.5-4.5x the adaptive plan's time (n = 64, 256), so ``plan=None``
picks it only when JAX's default backend is an accelerator.

Polar factor by matrix products (:func:`polar`)
-----------------------------------------------
For a tall ``X = Q H``, ``Q = X (X^T X)^{-1/2}``. Scaled by ``min(||G||_inf, ||G^2||_inf^(1/2),
||G||_F)^(1/2)`` (``G = X^T X``; all bound ``sigma_max^2``, the second is tight for
near-orthogonal ``X``), three odd quintic steps ``Z <- Z p(Z^T Z)`` with Polar Express
coefficients (the paper's greedy minimax rule, for a lower singular-value bound of 0.05) map
``[0.05, 1]`` into ``[0.9934, 1.0066]``. For float32 inputs those steps multiply in bfloat16
(float32 accumulation): each Gram matrix is recomputed from ``Z``, and the right factor
``P = p_1 p_2 p_3`` is accumulated at full precision (it grows like ``1/sigma_min``, so bfloat16
would cost ``kappa`` times its rounding). Then ``Y = X sym(P)`` and cubic Newton-Schulz steps at
full precision. ``sym(P)`` is symmetric positive definite, so ``polar(X sym(P)) = polar(X)``
exactly whenever ``X`` is orthogonal: ``polar(Q) = Q`` to float32 rounding even though the
phase rounds to bfloat16. In general the result is ``X``'s polar factor to about 1e-3. For a
square ``X`` the forward is 15 products with ``Orthogonal``'s final step (10 in the phase, 1
for ``Y``, 2 + 2 finishing). The backward is autodiff, with one-product derivative rules
(``custom_jvp``) for the Gram matrices ``Z^T Z`` and the squares ``G G`` of symmetric
matrices: 23 products, so forward+backward is 38 (2.5x the forward; autodiff alone: 45). The
tangents of the bfloat16 phase run at full precision (its right factor grows like
``1 / sigma_min``, its derivative like ``1 / sigma_min^2``: bfloat16 tangents cost ``kappa^2``
times their rounding). Accuracy against the polar factor's derivative (the Sylvester equation,
tests/test_linalg.py): 1e-10 in float64 (one finishing step more than float32); in float32,
set by the phase's bfloat16 values, 4% at a singular-value spread ``kappa = 2`` and 18% at
``kappa = 10`` on a 2 x 2 matrix (:func:`polar` lists the value's accuracy).

Cayley transform
----------------
``C = (I - A/2)^{-1} (I + A/2) = I + M^{-1} A`` with ``M = I - A/2``. It is exactly unitary
for skew-Hermitian ``A`` and needs one LU factorization of ``M`` and two triangular solves.
The VJP needs no solve: ``I + C = 2 M^{-1}``, so ``dC = M^{-1} dA M^{-1}`` gives
``Abar = M^{-T} Cbar M^{-T}`` with ``M^{-1} = (I + C) / 2``, two products (LAPACK's solves run
on one thread, XLA's products on every core: forward + backward at n = 512 on 2 cores took
10.7 ms against 14.9 ms with a transposed solve and a product). ``based_cayley(B, A, k)``,
``B C[:, :k]`` for ``Orthogonal``'s base ``B``, folds ``B`` into the left factor,
``B M^{-1} = (B + B C) / 2``: still two products, where the base's own VJP would add a third.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from functools import partial
from math import factorial
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import custom_batching, lax

from paramx._src.core import stacks
from paramx._src.parametrizations.numerics import lapack

__all__ = ["PLANS", "cayley", "check_plan", "default_plan", "expm_skew", "polar"]

_HIGHEST = lax.Precision.HIGHEST


class _Config(NamedTuple):
    """Per-precision constants of :func:`expm_skew`."""

    degrees: tuple[int, ...]  # Padé degrees, the last one is used with squaring
    thetas: tuple[float, ...]  # spectral-radius thresholds, one per degree
    stored_squares: int  # squares X_1..X_k kept for the backward; later ones are recomputed
    # The most squarings: 2^max_squarings u = 2^-9 (u the unit roundoff). Squaring doubles
    # the rounding error of the angles each time, so past this reach the result would be
    # rounding amplified to meaningless values: it is NaN instead.
    max_squarings: int


_FLOAT32 = _Config((3, 5, 7), (0.4268, 1.912, 4.081), 4, 15)
_FLOAT64 = _Config((3, 5, 7, 13), (0.01495, 0.2540, 0.9525, 5.486), 4, 44)


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
    """LU factors of ``M^T`` (``M^T[perm] = L U``), used for solves with ``M``.

    Factoring the transpose lets XLA hand row-major matrices to LAPACK's column-major
    kernels without transposing copies.
    """

    lu: jax.Array
    perm: jax.Array

    @classmethod
    def of(cls, m: jax.Array) -> _LU:
        lu, pivots, _ = lapack(lax.linalg.lu, jnp.matrix_transpose(m))
        return cls(lu, _pivots_to_permutation(pivots))

    def solve(self, b: jax.Array) -> jax.Array:
        """``M^{-1} b``: with ``M = U^T L^T P``, ``(M^{-1} b)^T = b^T U^{-1} L^{-1} P``."""
        x = lapack(
            lax.linalg.triangular_solve,
            self.lu,
            jnp.matrix_transpose(b),
            left_side=False,
            lower=False,
        )
        x = lapack(
            lax.linalg.triangular_solve, self.lu, x, left_side=False, lower=True, unit_diagonal=True
        )
        return _take_rows(jnp.matrix_transpose(x), _inverse_permutation(self.perm))


def _lu_solve(m: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """``M^{-1} b`` (``M^{-1}`` when ``b`` is None): one LU and two triangular solves.

    For a stack the whole chain is one :func:`lapack` call, so on the CPU each chunk runs its
    matrices' factorization and solves back to back and chunks side by side overlap (16
    inverses of 256 x 256, 2 cores: 9.6 ms, against 19.7 ms with the factorizations, then
    the solves, each chunked on its own; ``tests/test_linalg.py`` holds the structure).
    """

    def chain(m: jax.Array, *b: jax.Array) -> jax.Array:
        rhs = b[0] if b else jnp.broadcast_to(_eye(m), m.shape)
        return _LU.of(m).solve(rhs)

    return cast(jax.Array, lapack(chain, m, *(() if b is None else (b,))))


# The entry points below call their kernels through ``jax.jit``, as ``jax.numpy``'s functions
# do: inside a traced program the call is inlined, and an eager call (registration, a
# notebook cell) runs one compiled program instead of dispatching each of the kernel's
# operations, its loops and branches, one by one (the adaptive exponential of a 4 x 4 matrix:
# 0.13 s eagerly, most of it compiling each operation on its own).
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
    qinv: jax.Array  # Q^{-1}, Q = p(-A_s) = V - U
    r: jax.Array  # R = r_m(A_s)
    squares: jax.Array  # (..., k, n, n): X_1, ..., X_k (k = stored_squares), X_j = R^(2^j)
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
    s_max = jnp.max(s, initial=0)  # an empty stack (vmap over 0 matrices) has no squarings
    axis = r.ndim - 2  # the squares' axis: batch axes lead, as the vmap rules below need
    squares = jnp.zeros((*r.shape[:-2], stored, *r.shape[-2:]), r.dtype)

    def store_step(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, x, squares = c
        x = _mask(k, s, _mm(x, x), x)
        return k + 1, x, lax.dynamic_update_index_in_dim(squares, x, k, axis)

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
    ratio = eta / jnp.asarray(cfg.thetas, real)[degree]
    s = _ceil_log2(ratio, cfg.max_squarings)
    # Beyond the reach (max_squarings), a NaN scale makes the value and its gradient NaN.
    scale = jnp.where(ratio > 2.0**cfg.max_squarings, jnp.nan, _pow2(-s, real))
    eye = _eye(a)
    g = _even_scales(scale)
    w, v, w1, z1 = _pade_parts(degree, (eye, a2, a4, a6), g, cfg)
    u = _matrix_scalar(scale, a.dtype) * _mm(a, w)
    # Q^{-1} itself rather than a solve with U: the backward then needs a product with
    # Q^{-T} instead of two more triangular solves (LAPACK, one thread). Q is well conditioned
    # by the choice of degree and scaling; measured against SciPy's float64 expm at n = 256,
    # float32 orthogonality and gradients stay within 1.7x of the solve's, some better.
    qinv = _lu_solve(v - u)
    r = eye + 2.0 * _mm(qinv, u)
    x, squares = _square(r, s, cfg.stored_squares)
    return x, _ExpmResiduals(a, a2, a4, a6, w, w1, z1, qinv, r, squares, s, scale, degree)


# ----------------------------------------------------------------------------------------------
# expm_skew: backward.


def _square_vjp(
    g: jax.Array, r: jax.Array, squares: jax.Array, s: jax.Array, stored: int
) -> jax.Array:
    """Pull ``g`` back through the squarings: ``g <- g X_k^T + X_k^T g`` for ``k < s``."""
    s_max = jnp.max(s, initial=0)  # an empty stack (vmap over 0 matrices) has no squarings

    def step(k: jax.Array | int, g: jax.Array, x: jax.Array) -> jax.Array:
        xt = jnp.matrix_transpose(x)
        return _mask(k, s, _mm(g, xt) + _mm(xt, g), g)

    # Squares beyond the stored ones, in forward order (the step operators commute).
    def recomputed(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, g, x = c
        x = _mm(x, x)
        return k + 1, step(k, g, x), x

    axis = squares.ndim - 3
    start: tuple[jax.Array, ...] = (jnp.int32(stored + 1), g, squares[..., stored - 1, :, :])
    _, g, _ = lax.while_loop(lambda c: c[0] < s_max, recomputed, start)

    def stored_step(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k, g = c
        return k - 1, step(k - 1, g, lax.dynamic_index_in_dim(squares, k - 2, axis, False))

    rest: tuple[jax.Array, ...] = (jnp.minimum(s_max, stored + 1), g)
    _, g = lax.while_loop(lambda c: c[0] > 1, stored_step, rest)
    if s.ndim == 0:
        return lax.cond(s_max > 0, lambda: step(0, g, r), lambda: g)
    return step(0, g, r)


def _powers_vjp(res: _ExpmResiduals, bars: list[jax.Array]) -> jax.Array:
    """Pull cotangents of ``A^2`` and, if given, ``A^4 = A^2 A^2``, ``A^6 = A^4 A^2`` to ``A^2``."""
    if len(bars) == 3:
        a2bar, a4bar, a6bar = bars
        a4bar = a4bar + _mm(a6bar, jnp.matrix_transpose(res.a2))
        bars = [a2bar + _mm(jnp.matrix_transpose(res.a4), a6bar), a4bar]
    if len(bars) == 2:
        a2bar, a4bar = bars
        bars = [
            a2bar
            + _mm(a4bar, jnp.matrix_transpose(res.a2))
            + _mm(jnp.matrix_transpose(res.a2), a4bar)
        ]
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
        a6t = jnp.matrix_transpose(res.a6)
        w1bar = s6 * _mm(a6t, wbar)
        z1bar = s6 * _mm(a6t, vbar)
        a6bar = s6 * (
            _mm(wbar, jnp.matrix_transpose(res.w1))
            + _mm(vbar, jnp.matrix_transpose(res.z1))
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
    y = _mm(jnp.matrix_transpose(res.qinv), rbar)
    yrt = _mm(y, jnp.matrix_transpose(res.r))
    ubar = y + yrt
    vbar = y - yrt
    # U = 2^-s A W.
    scale = _matrix_scalar(res.scale, dtype)
    abar = scale * _mm(ubar, jnp.matrix_transpose(res.w))
    wbar = scale * _mm(jnp.matrix_transpose(res.a), ubar)
    a2bar = _pade_vjp(res, wbar, vbar, cfg)
    # A^2 = A A.
    abar = abar + _mm(a2bar, jnp.matrix_transpose(res.a)) + _mm(jnp.matrix_transpose(res.a), a2bar)
    return (abar,)


# Under ``jax.vmap`` (batched materialization, ``nn.vmap`` stacks, a user's own vmap) the
# data-dependent ``lax.cond``s above would get a batched predicate, and vmap then runs every
# branch (all three degrees, each with its LU solve) and selects. The forward handles leading
# batch axes itself (one degree for the batch, squarings masked per matrix), so its vmap rule
# calls it on the stack; the degree it returns is unbatched, so the backward's conditionals
# stay conditionals under plain vmap, and its squaring loops batch as JAX batches while loops
# (finished matrices masked). A vmap rule for the backward too (removed) was no faster, and
# JAX's JVP of such a rule mis-batches its integer residuals (``jax.vmap`` of ``jax.jvp`` of a
# gradient failed).


def _all(tree: Any, flag: bool) -> Any:
    return jax.tree_util.tree_map(lambda _: flag, tree)


_expm_forward_batched = custom_batching.custom_vmap(_expm_forward)


@_expm_forward_batched.def_vmap
def _expm_forward_rule(
    axis_size: int, in_batched: tuple[bool], a: jax.Array
) -> tuple[tuple[jax.Array, _ExpmResiduals], Any]:
    """The stack's forward: one degree for all (a scalar residual), squarings per matrix.
    ``a`` unbatched: the rule of a JVP batched over its tangents only (``jax.jacfwd`` of a
    gradient), where calling the batched function again would recurse without end."""
    if not in_batched[0]:
        out = _expm_forward(a)
        return out, _all(out, False)
    out = _expm_forward_batched(a)
    flags = _all(out, True)
    return out, (flags[0], flags[1]._replace(degree=False))


@jax.custom_vjp
def _expm(a: jax.Array) -> jax.Array:
    return cast(jax.Array, _expm_forward_batched(a)[0])


_expm.defvjp(_expm_forward_batched, _expm_backward)
_expm_jit = jax.jit(_expm)


# ----------------------------------------------------------------------------------------------
# expm_skew: the static (device) plan.


class _TaylorConfig(NamedTuple):
    """Per-precision constants of the static plan."""

    theta: float  # spectral-radius threshold of the degree-18 Taylor polynomial
    max_squarings: int  # squarings always run (masked); the plan's reach is theta * 2^this
    # Beyond the reach the truncation error grows like (eta / reach)^19; the result is NaN
    # from where that reaches 2^-9 (u the unit roundoff): eta > reach (2^-9 / u)^(1/19).
    nan_beyond: float


_TAYLOR32 = _TaylorConfig(1.0, 11, 2.0**11 * 2.0 ** (15 / 19))  # 3539
_TAYLOR64 = _TaylorConfig(0.6, 12, 0.6 * 2.0**12 * 2.0 ** (44 / 19))  # 12241

# Bader, Blanes and Casas (2019), "Computing the matrix exponential with an optimized Taylor
# polynomial approximation", Mathematics 7(12):1174, the degree-18 scheme in 5 products:
#   q3 = sum_j a_j A^j (j = 0..3), q6_i = sum_j b_ij A^j (j = 0, 1, 2, 3, 6),
#   q9 = q3 q6_4 + q6_3,  T18 = q6_1 + (q6_2 + q9) q9.
# Columns: the coefficients of I, A, A^2, A^3 (and A^6 for the b's). tests/test_linalg.py
# expands the scheme exactly and checks it against sum_k A^k / k!, k <= 18.
_T18_A = (
    0.0,
    -0.10036558103014462001461493940,
    -0.0080292464824115696011691951524,
    -0.00089213849804572995568546612805,
)
_T18_B = (
    (
        0.0,
        0.39784974949964507614519612771028,
        1.3678377846041171992252370687822,
        0.49828962252538267755685881726227,
        -0.00063789819459472330924155005649193,
    ),
    (
        -10.967639605296206259351746267537,
        1.6801581387890619718278540172481,
        0.057177984647886551270287171322525,
        -0.0069821012248805208429046648380155,
        0.000033497501708607053831336734066844,
    ),
    (
        -0.090431683239081056197146887701835,
        -0.067640451907138190756007990037971,
        0.067596130177045964608279919507894,
        0.029555257042931552742606918224223,
        -0.000013918025751606070112473997934374,
    ),
    (
        0.0,
        0.0,
        -0.0923364619367118592764570775143,
        -0.0169364939002081717191385115723,
        -0.0000140086798182036159794363205726,
    ),
)


def _taylor_config(dtype: jnp.dtype) -> _TaylorConfig:
    return _TAYLOR64 if jnp.finfo(dtype).bits == 64 else _TAYLOR32


def _expm_static(a: jax.Array) -> jax.Array:
    """``exp(A)`` by degree-18 Taylor and masked squarings: no data-dependent control flow.

    Every matrix of a batch runs the same 5 + ``max_squarings`` products; the squarings a
    matrix does not need keep their input (``jnp.where``). Differentiated by autodiff, which
    sees the same straight-line program (about twice the forward's products).
    """
    cfg = _taylor_config(a.dtype)
    real = jnp.finfo(a.dtype).dtype
    a2 = _mm(a, a)
    a3 = _mm(a2, a)
    a6 = _mm(a3, a3)
    # The spectral radius bound (as in the adaptive plan), from the powers the scheme needs.
    eta = lax.stop_gradient(
        jnp.minimum(
            jnp.minimum(jnp.sqrt(_norm1(a2)), _norm1(a3) ** (1.0 / 3.0)),
            _norm1(a6) ** (1.0 / 6.0),
        )
    )
    s = _ceil_log2(eta / cfg.theta, cfg.max_squarings)
    # Far beyond the reach, a NaN scale makes the value and its gradient NaN.
    scale = jnp.where(eta > cfg.nan_beyond, jnp.nan, _pow2(-s, real))
    # A_s^j = 2^{-js} A^j exactly, so the scaling is folded into the powers.
    powers = [_matrix_scalar(scale**j, a.dtype) * p for j, p in ((1, a), (2, a2), (3, a3), (6, a6))]
    # The scheme with its identity terms split off: q9 = c9 I + M9, q6_2 + q9 = c2 I + M2,
    # T18 = (c2 c9) I + (q6_1 + c2 M9 + c9 M2 + M2 M9) with c2 c9 = 1 (T18(0) = 1). Only the
    # correction E = T18 - I is rounded, and the squarings keep that form,
    # (I + E)^2 = I + (2 E + E E): the result is accurate relative to I even for small A
    # (the plain scheme forms I from products of coefficients near 11 and 0.09).
    b = [row[1:] for row in _T18_B]  # the identity's coefficients are b[i][0]
    q3 = _combine(_T18_A[1:], powers[:3])
    m9 = _mm(q3, _combine(b[3], powers)) + _combine(b[2], powers)
    m2 = _combine(b[1], powers) + m9
    c9 = _T18_B[2][0]
    c2 = _T18_B[1][0] + c9
    e = _combine(b[0], powers) + c2 * m9 + c9 * m2 + _mm(m2, m9)
    for k in range(cfg.max_squarings):
        e = jnp.where((k < s)[..., None, None], 2.0 * e + _mm(e, e), e)
    return _eye(a) + e


_expm_static_jit = jax.jit(_expm_static)


def _combine(coefficients: tuple[float, ...], matrices: list[jax.Array]) -> jax.Array:
    """``sum_j c_j M_j`` over the nonzero coefficients."""
    terms = [c * m for c, m in zip(coefficients, matrices) if c]
    return sum(terms[1:], terms[0])


PLANS = ("adaptive", "static")


def default_plan() -> str:
    """The plan ``plan=None`` resolves to: ``"static"`` when the program runs on an
    accelerator (GPU, TPU: JAX's default backend, unless ``jax.default_device`` names a CPU),
    ``"adaptive"`` on CPU, where it is faster (see the module docstring). Decided when the
    function is traced."""
    return "adaptive" if stacks.on_cpu() else "static"


def check_plan(plan: object, owner: str = "expm_skew") -> str | None:
    """``plan`` if it is None or one of :data:`PLANS`; else a ValueError/TypeError that says
    what to pass."""
    if plan is None or (isinstance(plan, str) and plan in PLANS):
        return plan
    error = ValueError if isinstance(plan, str) else TypeError
    raise error(
        f'{owner}: the matrix exponential plan has to be "adaptive", "static" or None (the '
        f'default: "static" on GPU/TPU, "adaptive" on CPU); got {plan!r}.'
    )


def expm_skew(a: jax.Array, *, plan: str | None = None) -> jax.Array:
    """Matrix exponential of a skew-symmetric or skew-Hermitian matrix.

    Two plans (see the module docstring):

    * ``"adaptive"``: scaling and squaring with a diagonal Padé approximant whose degree and
      squaring count are chosen at run time (``lax.cond``/``while_loop``), with its own VJP:
      the Fréchet derivative ``L_exp(A^T, G)`` computed by differentiating the approximation
      by hand, reusing the forward's powers, ``Q^{-1}`` and squares. Fewest products.
    * ``"static"``: degree-18 Taylor (Bader-Blanes-Casas, 5 products) and a fixed number of
      masked squarings: no data-dependent control flow in the forward or the backward, and
      matrix products only, for accelerators. Accurate up to a spectral-radius bound of
      ``2^11`` (float32) or ``0.6 * 2^12`` (float64); beyond, the error grows like
      ``(eta / reach)^19``: the result is not orthogonal, and far beyond it is NaN.

    Args:
        a: array of shape ``(..., n, n)`` with ``a^H == -a`` (not checked: for other inputs
            the result approximates ``exp(a)`` less accurately). float32, float64, complex64
            and complex128 are computed as is; bfloat16 and float16 in float32.
        plan: ``"adaptive"``, ``"static"`` or None for :func:`default_plan`.

    Returns:
        ``exp(a)``, orthogonal or unitary to working precision, same shape and dtype as ``a``.

    Raises:
        ValueError: if ``a`` is not a (batch of) square matrices, or for an unknown plan.
        TypeError: if ``a`` is not floating point or complex.

    Examples:
        >>> import jax.numpy as jnp
        >>> from paramx._src.parametrizations.linalg import expm_skew
        >>> a = jnp.array([[0.0, -1.0], [1.0, 0.0]])
        >>> q = expm_skew(a, plan="static")  # the rotation by 1 radian
        >>> bool(jnp.allclose(q, expm_skew(a, plan="adaptive"), atol=1e-6))
        True
    """
    plan = check_plan(plan) or default_plan()
    return _promote(_expm_jit if plan == "adaptive" else _expm_static_jit, a, "expm_skew")


# ----------------------------------------------------------------------------------------------
# cayley.


def _cayley_forward(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    eye = _eye(a)
    c = eye + _lu_solve(eye - 0.5 * a, a)
    return c, c


def _cayley_backward(c: jax.Array, cbar: jax.Array) -> tuple[jax.Array]:
    # With M = I - A/2: dC = M^{-1} dA (I + C) / 2 and I + C = 2 M^{-1}, so
    # Abar = M^{-T} Cbar M^{-T} with M^{-1} = (I + C) / 2: two products instead of a pair of
    # triangular solves and a product (LAPACK's solves run on one thread, XLA's products on
    # all cores; forward + backward at n = 512 on 2 cores: 14.9 -> 10.7 ms). Its accuracy is
    # that of C, which the forward's solve makes accurate to rounding.
    ct = jnp.matrix_transpose(c)
    w = 0.25 * (cbar + _mm(ct, cbar))
    return (w + _mm(w, ct),)


@jax.custom_vjp
def _cayley(a: jax.Array) -> jax.Array:
    return _cayley_forward(a)[0]


_cayley.defvjp(_cayley_forward, _cayley_backward)
_cayley_jit = jax.jit(_cayley)


def cayley(a: jax.Array) -> jax.Array:
    """Cayley transform ``(I - A/2)^{-1} (I + A/2)`` of a skew(-Hermitian) matrix.

    One LU factorization of ``I - A/2`` and two triangular solves; the VJP is two matrix
    products with ``(I + C) / 2 = (I - A/2)^{-1}``.

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
    return _promote(_cayley_jit, a, "cayley")


def _based_cayley_forward(
    base: jax.Array, a: jax.Array, k: int
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    c, _ = _cayley_forward(a)
    q = _mm(base, c[..., :k])
    return q, (base, c, q)


def _based_cayley_backward(
    k: int, res: tuple[jax.Array, ...], qbar: jax.Array
) -> tuple[jax.Array, jax.Array]:
    # Q = B C E_k (E_k the first k columns) and dC = M^{-1} dA M^{-1} with M^{-1} = (I + C) / 2:
    # Abar = (B M^{-1})^T Qbar (M^{-1} E_k)^T, where B M^{-1} = (B + B C) / 2 and B C is the
    # forward's Q when k = n: two products, against three for the base product's VJP
    # followed by cayley's (when k < n, forming B C is the third).
    base, c, q = res
    bc = q if k == c.shape[-1] else _mm(base, c)
    abar = 0.25 * _mm(
        _mm(jnp.matrix_transpose(base + bc), qbar), jnp.matrix_transpose((_eye(c) + c)[..., :k])
    )
    return _mm(qbar, jnp.matrix_transpose(c[..., :k])), abar


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _based_cayley(base: jax.Array, a: jax.Array, k: int) -> jax.Array:
    return _based_cayley_forward(base, a, k)[0]


_based_cayley.defvjp(_based_cayley_forward, _based_cayley_backward)
_based_cayley_jit = jax.jit(_based_cayley, static_argnums=2)


def based_cayley(base: jax.Array, a: jax.Array, k: int) -> jax.Array:
    """``base @ cayley(a)[..., :k]`` for float32, float64 or complex ``a`` and ``base`` of the
    same shape and dtype (``Orthogonal``'s trivialized Cayley map); its VJP spends two products
    where the product followed by :func:`cayley` would spend three (a Cayley map's VJP is
    a product from each side, and the base's joins the left one)."""
    return _based_cayley_jit(base, a, k)


# ----------------------------------------------------------------------------------------------
# polar: the orthogonal polar factor by matrix products only.

# Greedy minimax odd quintics p(s) = s (a + b s^2 + c s^4), the Polar Express rule (Amsel,
# Persson, Musco and Gower 2025, "The Polar Express", Alg. 1: each step is the best uniform
# approximation of 1 on the interval the previous steps map [l, 1] to), computed for
# l = 0.05 instead of the paper's 1e-3: three steps map [0.05, 1] into [0.9934, 1.0066]
# (tests/test_linalg.py checks it); the paper's table needs five and more for any l.
_POLAR_STEPS = (
    (6.7523761403, -18.3509738780, 13.2632686576),
    (2.5378662972, -1.8746790880, 0.4412809130),
    (1.9269789096, -1.3066167641, 0.3807052725),
)
_POLAR_LOW = 0.05  # the smallest scaled singular value the steps are designed for
_POLAR_SAFETY = 1.01  # margin on the scaling bound (bfloat16 rounding of the Gram matrix)


def _sym(x: jax.Array) -> jax.Array:
    return 0.5 * (x + jnp.matrix_transpose(x))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _phase_mm(a: jax.Array, b: jax.Array, low: bool) -> jax.Array:
    """A product of the iteration phase: bfloat16 operands with float32 accumulation (on
    purpose: the phase only has to be accurate to about 1e-2) when ``low``, else full
    precision. Its derivative is the product's at full precision: the right factor grows
    like ``1 / sigma_min``, its derivative like ``1 / sigma_min^2``, so bfloat16 rounding in
    the tangents would cost ``kappa^2`` times it (34% of the gradient at ``kappa = 10``)."""
    if not low:
        return _mm(a, b)
    bf16 = jnp.bfloat16
    out = jnp.matmul(
        a.astype(bf16), b.astype(bf16), precision=_HIGHEST, preferred_element_type=jnp.float32
    )
    return out.astype(a.dtype)


@_phase_mm.defjvp
def _phase_mm_jvp(
    low: bool, primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (a, b), (da, db) = primals, tangents
    return _phase_mm(a, b, low), _mm(da, b) + _mm(a, db)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _gram(z: jax.Array, low: bool) -> jax.Array:
    """``Z^T Z`` (symmetrized). Its JVP ``T + T^T`` with ``T = Z^T dZ`` is one product, and
    so is its transpose, the VJP ``Z (Gbar + Gbar^T)`` (autodiff would use two)."""
    return _sym(_phase_mm(jnp.matrix_transpose(z), z, low))


@_gram.defjvp
def _gram_jvp(
    low: bool, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (z,), (dz,) = primals, tangents
    t = _mm(jnp.matrix_transpose(z), dz)  # full precision, as in _phase_mm's derivative
    return _gram(z, low), t + jnp.matrix_transpose(t)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _square_symmetric(g: jax.Array, low: bool) -> jax.Array:
    """``G G`` for a ``G`` that is symmetric for every input (a Gram matrix, a ``_sym``).

    With a symmetric tangent, ``dG G + G dG = U + U^T`` with ``U = dG G``: one product, and
    one in the transpose (the VJP ``(Sbar + Sbar^T) G``, whose symmetric part is the true
    cotangent; the rest is mapped to zero by whatever produced the symmetric ``G``).
    """
    return _phase_mm(g, g, low)


@_square_symmetric.defjvp
def _square_jvp(
    low: bool, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (g,), (dg,) = primals, tangents
    u = _mm(dg, g)  # full precision, as in _phase_mm's derivative
    return _square_symmetric(g, low), u + jnp.matrix_transpose(u)


def _polar(x: jax.Array, finishing_steps: int) -> jax.Array:
    low = jnp.finfo(x.dtype).bits == 32
    k = x.shape[-1]
    eye = jnp.eye(k, dtype=x.dtype).reshape((1,) * (x.ndim - 2) + (k, k))
    # polar(c X) = polar(X) for c > 0: a power of two (exact, so polar(Q) = Q is unchanged)
    # brings the largest entry into [0.5, 1). Unscaled, G^2 under- or overflows for singular
    # values outside about [1e-9, 4e9] in float32 ([1e-77, 1e77] in float64): NaN.
    amax = lax.stop_gradient(jnp.max(jnp.abs(x), axis=(-2, -1)))
    x = x * _matrix_scalar(_pow2(-jnp.frexp(amax)[1], x.dtype), x.dtype)
    g = _gram(x, low)  # the Gram matrix X^T X, k x k
    g2 = _square_symmetric(g, low)  # needed by the first step anyway
    # Scale so the singular values are at most 1: lambda_max(G) is at most ||G||_inf,
    # ||G^2||_inf^(1/2) (the tightest for near-orthogonal X) and ||G||_F.
    bound = jnp.minimum(_norm1(g), jnp.sqrt(jnp.sum(g * g, axis=(-2, -1))))
    bound = jnp.minimum(bound, jnp.sqrt(_norm1(g2)))
    bound = lax.stop_gradient(jnp.maximum(bound * _POLAR_SAFETY, jnp.finfo(x.dtype).tiny))
    inv = (1.0 / bound)[..., None, None]
    root = lax.rsqrt(bound)[..., None, None]
    g, g2 = g * inv, g2 * (inv * inv)
    # Z <- Z p(Z^T Z) (the Polar Express steps, Z_0 = X / sqrt(bound)) in the phase's
    # precision, each Gram matrix fresh from Z (its rounding is not carried over); the
    # right factor P <- P p is accumulated at full precision (it grows like 1 / sigma_min).
    z = x * root
    p_total = eye
    for i, (a, b, c) in enumerate(_POLAR_STEPS):
        if i > 0:
            g = _gram(z, low)
            g2 = _square_symmetric(g, low)
        p = _sym(a * eye + b * g + c * g2)
        p_total = p if i == 0 else _mm(p_total, p)
        if i + 1 < len(_POLAR_STEPS):
            z = _phase_mm(z, p, low)
    # P symmetric positive definite: polar(X P) = polar(X) exactly when X is orthogonal.
    y = _mm(x, _sym(p_total)) * root
    # The cubic steps square the distance to orthogonality (6.6e-3 after the phase: 6.5e-5,
    # 6.4e-9, 6e-17): float64 needs one step more than float32 to reach its rounding.
    for _ in range(finishing_steps + (not low)):  # cubic Newton-Schulz at full precision
        y = _mm(y, 1.5 * eye - 0.5 * _gram(y, False))
    return y


_polar_jit = jax.jit(_polar, static_argnums=1)


def polar(x: jax.Array, *, finishing_steps: int = 2) -> jax.Array:
    """The orthogonal polar factor ``Q`` of ``X = Q H`` (tall ``X``), by matrix products only.

    A Newton-Schulz-type iteration on the Gram matrix ``G = X^T X`` (``k x k``) builds a
    symmetric ``P`` close to ``G^{-1/2}`` (three Polar Express quintic steps, ten ``k x k``
    products in bfloat16 for float32 inputs), then ``Y = X P`` at full precision and
    ``finishing_steps`` cubic Newton-Schulz steps ``Y <- Y (3 I - Y^T Y) / 2`` at full
    precision (two products each). No data-dependent control flow; differentiated by
    autodiff (see the module docstring for its accuracy).

    Accuracy (float32): orthogonal to float32 rounding (``|Y^T Y - I| <= 10 k eps``) when
    the singular values of ``X`` lie within a factor 20 (``1 / 0.05``) of its scaling bound
    ``min(||X^T X||_inf, ||X^T X||_F)^{1/2}``, as for near-orthogonal ``X``; beyond, the
    smallest singular values are not brought to 1 and the result is not orthogonal. The
    factor differs from the exact polar factor by about the bfloat16 rounding (1e-3) in
    general, and not at all when ``X`` is orthogonal (``polar(Q) = Q`` to float32 rounding):
    ``P`` is symmetric positive definite and ``polar(Q P) = Q``. float64 inputs run the
    whole iteration in float64, with one finishing step more (orthogonal to float64
    rounding; ``polar(Q) = Q`` to it).

    Accuracy of the float32 value (against the exact factor, matrices with singular values
    spread by ``kappa``, ``k x k``, 2026-12-05): at ``kappa`` 1.5 / 3 / 10 / 20 about 7e-4 /
    4e-3 / 1.3e-2 / 3.5e-2 for ``k <= 16``, 1.3e-4 / 3.8e-4 / 1.5e-3 / 2.6e-3 at ``k = 256``
    (the bfloat16 phase's rounding times ``kappa``); orthogonality within ``10 k eps`` up to
    ``kappa = 3``, and up to 260 ``k eps`` at ``kappa = 20`` for small ``k``. Its gradient
    is autodiff of the iteration with the tangents at full precision: within 4% of the exact
    polar factor's at ``kappa = 2`` and 18% at ``kappa = 10`` (2 x 2; the derivative of the
    bfloat16 phase's right factor grows like ``kappa^2``). Trivialization
    (``Orthogonal("polar")``'s default) keeps the originals near orthogonal, ``kappa``
    near 1; for exact gradients at any ``kappa``, use float64 or another map.

    Args:
        x: array ``(..., n, k)`` with ``n >= k``, real floating point; bfloat16 and float16
            are computed in float32.
        finishing_steps: full-precision cubic steps for float32 (default 2; ``Orthogonal``
            uses 1 and its own final step); float64 runs one more. A non-negative int.

    Returns:
        ``Q`` with orthonormal columns, same shape and dtype as ``x``.

    Raises:
        ValueError: if ``x`` is not a (batch of) tall or square matrices.
        TypeError: if ``x`` is not real floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> from paramx._src.parametrizations.linalg import polar
        >>> x = jnp.array([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
        >>> bool(jnp.allclose(polar(x), jnp.eye(3, 2), atol=1e-6))
        True
    """
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[-2] < x.shape[-1]:
        raise ValueError(
            f"polar expects a (batch of) tall or square matrices (..., n, k) with n >= k, got "
            f"{x.shape}; transpose a wide matrix first."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"polar expects a real floating dtype, got {x.dtype}")
    if (
        isinstance(finishing_steps, bool)
        or not isinstance(finishing_steps, int)
        or (finishing_steps < 0)
    ):
        raise ValueError(
            f"polar: finishing_steps must be a non-negative int (default 2); got "
            f"{finishing_steps!r}."
        )
    if x.size == 0:
        return x
    if jnp.finfo(x.dtype).bits < 32:
        return _polar_jit(x.astype(jnp.float32), finishing_steps).astype(x.dtype)
    return _polar_jit(x, finishing_steps)
