"""expm_skew and cayley: values, unitarity, gradients, batching, dtypes and structure.

Every jitted function takes its data as arguments and most tests use 4 x 4 matrices, so the
suite compiles each (function, shape, dtype) once.
"""

from fractions import Fraction

import jax
import jax.extend
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.scipy.linalg import expm

from paramx._src.parametrizations import linalg
from paramx._src.parametrizations.linalg import cayley, expm_skew

ALL = [jnp.float32, jnp.float64, jnp.complex64, jnp.complex128]
N = 4


def skew(seed, shape, dtype, *, norm1=None, scale=1.0, shift=0.0):
    """``X - X^H`` with X ~ N(0, 1) (complex: both parts), optionally rescaled to a 1-norm.

    ``shift`` adds a constant (a general, non-skew matrix, used as a cotangent).

    Built with NumPy, so test data costs no compilation.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    a = x - np.conj(np.swapaxes(x, -1, -2))
    if norm1 is not None:
        a = a * (norm1 / np.abs(a).sum(axis=-2).max(axis=-1))[..., None, None]
    return jnp.asarray(a * scale + shift, dtype)


def eps(dtype):
    return float(jnp.finfo(dtype).eps)


def unitarity_error(q):
    q = np.asarray(q).astype(np.complex128)
    return np.abs(np.conj(np.swapaxes(q, -1, -2)) @ q - np.eye(q.shape[-1])).max()


def spectral_radius(a):
    return float(np.abs(np.linalg.eigvals(np.asarray(a, np.complex128))).max())


def wide(a):
    return a.astype(jnp.complex128 if jnp.issubdtype(a.dtype, jnp.complexfloating) else jnp.float64)


def plain_cayley(a):
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    return jnp.linalg.solve(eye - 0.5 * a, eye + 0.5 * a)


def loss(fn):
    """A scalar of fn(a) against a general cotangent ``c``, with fn(a) as auxiliary output."""

    def scalar(a, c):
        q = fn(a)
        return jnp.sum(jnp.real(q * c)), q

    return scalar


ours_expm = jax.jit(expm_skew)
jax_expm = jax.jit(expm)
ours_cayley = jax.jit(cayley)
forward_residuals = jax.jit(linalg._expm_forward)
# (gradient, value) of loss(fn) at (a, c), compiled once per function, shape and dtype.
value_and_grad = {
    name: jax.jit(jax.grad(loss(fn), has_aux=True))
    for name, fn in [
        ("ours", expm_skew),
        ("jax", expm),
        ("cayley", cayley),
        ("plain_cayley", plain_cayley),
        ("ours_vmap", jax.vmap(expm_skew)),
    ]
}


def grad(name, a, c):
    return value_and_grad[name](a, c)[0]


# --- the Padé thresholds -------------------------------------------------------------------------
def _log_series(c, terms):
    """Exact power series of ``log(sum_j c_j x^j)`` (c_0 = 1) up to ``x^terms``."""
    c = list(c) + [Fraction(0)] * (terms + 1 - len(c))
    out = [Fraction(0)] * (terms + 1)
    for k in range(1, terms + 1):  # p * (log p)' = p'
        out[k] = (k * c[k] - sum(c[i] * (k - i) * out[k - i] for i in range(1, k))) / k
    return out


def _relative_backward_error(m, theta, terms=60):
    """|h(i theta)| / theta for h(x) = log(e^{-x} r_m(x)), in exact rational arithmetic."""
    c = linalg._pade_fractions(m)
    plus = _log_series(c, terms)
    minus = _log_series([cj * (-1) ** j for j, cj in enumerate(c)], terms)
    theta = Fraction(theta)
    # h is odd; on the imaginary axis h(iy) = i sum_k h_k (-1)^((k-1)/2) y^k.
    h = sum(
        (plus[k] - minus[k] - (k == 1)) * (-1) ** ((k - 1) // 2) * theta**k
        for k in range(1, terms + 1, 2)
    )
    return abs(h) / theta


@pytest.mark.parametrize("config, unit", [(linalg._FLOAT32, 2**-24), (linalg._FLOAT64, 2**-53)])
def test_thresholds_are_tight_for_the_spectral_radius(config, unit):
    for m, theta in zip(config.degrees, config.thetas):
        assert _relative_backward_error(m, theta) <= Fraction(unit), (m, theta)
        assert _relative_backward_error(m, 1.01 * theta) > Fraction(unit), (m, theta)


def test_pade_coefficients_match_highams_table():
    assert linalg._pade_fractions(3) == (1, Fraction(1, 2), Fraction(1, 10), Fraction(1, 120))
    c13 = linalg._pade_fractions(13)
    assert c13[1] == Fraction(32382376266240000, 64764752532480000)
    assert c13[13] == Fraction(1, 64764752532480000)


# --- values and unitarity ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL)
def test_values_match_expm(dtype):
    for scale in (1e-6, 0.1, 1.0, 4.0, 40.0):
        a = skew(1, (N, N), dtype, scale=scale)
        q = ours_expm(a)
        assert q.dtype == a.dtype and q.shape == a.shape
        # exp at a normal matrix is ||A||-conditioned; each squaring can double rounding errors.
        rho = spectral_radius(a)
        tol = 20 * N * eps(dtype) * max(1.0, rho)
        np.testing.assert_allclose(np.asarray(q), np.asarray(jax_expm(wide(a))), atol=tol)
        assert unitarity_error(q) <= 10 * (N + rho) * eps(dtype), scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n", [4, 64, 256])
def test_unitarity_is_no_worse_than_expm(dtype, n):
    for case in ("norm1", "random"):
        ours, theirs = [], []
        for seed in range(3):
            a = skew(seed, (n, n), dtype, norm1=1.0 if case == "norm1" else None)
            ours.append(unitarity_error(ours_expm(a)))
            theirs.append(unitarity_error(jax_expm(a)))
            assert ours[-1] <= 10 * n * eps(dtype), (case, ours[-1] / eps(dtype))
        # Small norms: I + 2 Q^{-1} U keeps R closer to unitary than expm's Q^{-1} P. Large
        # ones: single matrices differ by rounding noise (a few ulps); on average no worse.
        slack = (1.0, 0.0) if case == "norm1" else (1.25, 2 * eps(dtype))
        assert np.mean(ours) <= slack[0] * np.mean(theirs) + slack[1], (case, ours, theirs)


def test_powers_bound_the_spectral_radius_and_save_squarings():
    # At n = 64, ||A||_1 of a random skew matrix is about 4x its spectral radius; the norms of
    # A^2, A^4, A^6 see through most of that, so fewer squarings than a 1-norm rule takes.
    a = skew(0, (64, 64), jnp.float64)
    _, res = forward_residuals(a)
    theta = linalg._FLOAT64.thetas[-1]
    assert int(res.degree) == 3
    assert int(res.s) <= int(np.ceil(np.log2(1.3 * spectral_radius(a) / theta)))
    norm1 = float(np.abs(np.asarray(a)).sum(axis=0).max())
    assert int(res.s) < int(np.ceil(np.log2(norm1 / theta)))


def test_degree_and_squarings_grow_with_the_norm():
    config = linalg._FLOAT64
    chosen = []
    for norm1 in (1e-4, 0.01, 0.3, 1.5, 3.0, 50.0, 5000.0):
        _, res = forward_residuals(skew(0, (64, 64), jnp.float64, norm1=norm1))
        chosen.append((config.degrees[int(res.degree)], int(res.s)))
    assert chosen == sorted(chosen)
    assert chosen[0] == (3, 0)
    assert chosen[-1][0] == 13 and chosen[-1][1] > config.stored_squares


# --- gradients -----------------------------------------------------------------------------------
def test_check_grads():
    for norm1 in (1e-3, 0.05, 0.5, 3.0, 60.0):
        a = skew(2, (N, N), jnp.float64, norm1=norm1)
        jax.test_util.check_grads(ours_expm, (a,), order=1, modes=["rev"])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
def test_gradient_matches_autodiff_through_expm(dtype):
    # A general cotangent: the VJP is the full Fréchet adjoint L(A^T, G), not only its skew
    # part. The largest norm needs more squarings than are stored (recomputed ones).
    c = skew(7, (N, N), dtype, shift=0.5)
    for norm1 in (1e-3, 0.2, 1.0, 2.5, 30.0, 3000.0):
        a = skew(3, (N, N), dtype, norm1=norm1)
        ours, ref = grad("ours", a, c), grad("jax", a, c)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-8, atol=1e-10)
        ours = np.asarray(ours)
        assert np.abs(ours + np.conj(ours.T)).max() > 1e-3  # has a Hermitian part


# --- batching and vmap ---------------------------------------------------------------------------
def test_batches_and_vmap_match_single_matrices():
    # Different norms in one batch: a shared degree, per-matrix squarings (one recomputed).
    norms = np.array([1e-3, 0.7, 9.0, 120.0, 4000.0, 2.0])
    a = skew(5, (2, 3, N, N), jnp.float64, scale=norms.reshape(2, 3, 1, 1))
    c = skew(6, (2, 3, N, N), jnp.float64, shift=0.3)
    batched_grad, batched = value_and_grad["ours"](a, c)
    vmapped_grad, vmapped = value_and_grad["ours_vmap"](a.reshape(6, N, N), c.reshape(6, N, N))
    batched, batched_grad = batched.reshape(6, N, N), batched_grad.reshape(6, N, N)
    for i, (ai, ci) in enumerate(zip(a.reshape(6, N, N), c.reshape(6, N, N))):
        ref_grad, ref = value_and_grad["jax"](ai, ci)
        tol = 1e-13 * (1 + norms[i])
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(ref), atol=tol)
        np.testing.assert_allclose(np.asarray(vmapped[i]), np.asarray(ref), atol=tol)
        for ours in (batched_grad[i], vmapped_grad[i]):
            np.testing.assert_allclose(
                np.asarray(ours), np.asarray(ref_grad), rtol=1e-8, atol=1e-10
            )


# --- dtypes, shapes, edge cases ------------------------------------------------------------------
@pytest.mark.parametrize("fn, f32", [(expm_skew, ours_expm), (cayley, ours_cayley)])
def test_bfloat16_computes_in_float32(fn, f32):
    low = skew(10, (N, N), jnp.bfloat16, scale=0.5)
    q = jax.jit(fn)(low)
    assert q.dtype == jnp.bfloat16
    ref = f32(low.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(ref), atol=eps(jnp.bfloat16))


@pytest.mark.parametrize("fn", [expm_skew, cayley])
def test_input_checks_and_empty_inputs(fn):
    with pytest.raises(ValueError, match="square"):
        fn(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="square"):
        fn(jnp.zeros((3,), jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        fn(jnp.zeros((2, 2), jnp.int32))
    for shape in [(0, 0), (0, 3, 3), (2, 0, 0)]:
        assert fn(jnp.zeros(shape, jnp.float16)).shape == shape


def test_nan_propagates_and_large_norms_stay_unitary():
    a = skew(11, (N, N), jnp.float32, shift=np.where(np.eye(N) > 0, np.nan, 0.0))
    assert bool(jnp.all(jnp.isnan(ours_expm(a))))
    a = skew(11, (N, N), jnp.float64, norm1=1e9)
    assert unitarity_error(ours_expm(a)) < 1e-6  # about 28 squarings


# --- one factorization ---------------------------------------------------------------------------
def _count(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count(sub, name)
    return count


@pytest.mark.parametrize("fn", [expm_skew, cayley])
def test_forward_and_backward_share_one_lu(fn):
    a = skew(12, (N, N), jnp.float64, norm1=3.0)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda x: jnp.sum(fn(x) ** 2)))(a).jaxpr
    assert _count(jaxpr, "lu") == 1
    assert _count(jaxpr, "triangular_solve") == 4  # two in the forward, two in the backward


# --- cayley --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL)
def test_cayley_values_and_unitarity(dtype):
    for scale in (1e-3, 1.0, 30.0):
        a = skew(13, (N, N), dtype, scale=scale)
        q = ours_cayley(a)
        assert q.dtype == dtype
        cond = float(np.linalg.cond(np.eye(N) - 0.5 * np.asarray(a, np.complex128)))
        ref = np.asarray(jax.jit(plain_cayley)(wide(a)))
        np.testing.assert_allclose(np.asarray(q), ref, atol=20 * cond * eps(dtype))
        assert unitarity_error(q) <= 10 * N * cond * eps(dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
def test_cayley_gradients_match_autodiff_through_the_solve(dtype):
    a = skew(14, (2, N, N), dtype, norm1=2.0)
    c = skew(15, (2, N, N), dtype, shift=0.4)
    ours, ref = grad("cayley", a, c), grad("plain_cayley", a, c)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-10, atol=1e-12)
