"""expm_skew and cayley: values, unitarity, gradients, batching, dtypes and structure.

Every jitted function takes its data as arguments and most tests use 4 x 4 matrices, so the
suite compiles each (function, shape, dtype) once.
"""

import math
from fractions import Fraction

import jax
import jax.extend
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import run_python
from jax.scipy.linalg import expm

from paramx._src.core import stacks
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


def _control_flow(fn, *args):
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("cond["), text.count("while[")


def test_vmap_keeps_the_degree_choice_a_branch():
    # Under vmap a data-dependent cond gets a batched predicate and runs every branch (all
    # degrees, each with its LU solve); the expm's vmap rules hand the stack to the
    # batch-native forward and backward instead: the decisions stay real branches and loops.
    a = skew(7, (3, N, N), jnp.float64, scale=np.array([0.01, 1.0, 30.0]).reshape(3, 1, 1))
    c = skew(8, (3, N, N), jnp.float64, shift=0.2)
    one = jax.grad(loss(expm_skew), has_aux=True)
    assert _control_flow(jax.vmap(one), a, c) == _control_flow(one, a, c) == (5, 4)
    assert _control_flow(jax.vmap(expm_skew), a) == _control_flow(expm_skew, a) == (3, 2)


def test_vmap_variants_match_single_matrices():
    # Nested vmaps, a cotangent shared by the batch, and jacrev (only the cotangent batched:
    # the plain vmap fallback) all give the per-matrix gradients.
    norms = np.array([1e-3, 0.7, 9.0, 120.0]).reshape(2, 2, 1, 1)
    a = skew(9, (2, 2, N, N), jnp.float64, scale=norms)
    c = skew(10, (2, 2, N, N), jnp.float64, shift=0.3)
    one = jax.grad(lambda a, c: jnp.sum(expm_skew(a) * c))
    refs = [[grad("jax", a[i, j], c[i, j]) for j in range(2)] for i in range(2)]
    nested = jax.jit(jax.vmap(jax.vmap(one)))(a, c)
    shared = jax.jit(jax.vmap(one, in_axes=(0, None)))(a[0], c[1, 1])
    for i in range(2):
        for j in range(2):
            np.testing.assert_allclose(nested[i, j], refs[i][j], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(shared[i], grad("jax", a[0, i], c[1, 1]), rtol=1e-8, atol=1e-10)
    jac = jax.jit(jax.jacrev(expm_skew))(a[1, 0])
    reference = jax.jit(jax.jacfwd(expm))(a[1, 0])
    np.testing.assert_allclose(jac, reference, rtol=1e-8, atol=1e-10)


def test_second_order_derivatives_through_a_stack_and_a_tangent_basis():
    # jax.hessian is jacfwd of the gradient: the forward's vmap rule runs with only tangents
    # batched (it used to recurse without end), and vmap of jvp of the gradient batches the
    # residuals' integer parts apart from the others (it used to fail a cotangent check).
    a = skew(13, (2, 4, 4), jnp.float64, scale=np.array([0.3, 9.0]).reshape(2, 1, 1))
    t = skew(14, (2, 4, 4), jnp.float64)

    def loss(fn):
        return lambda a: jnp.sum(fn(a)[0] ** 3)

    ours, ref = loss(expm_skew), loss(expm)
    for i in range(2):
        np.testing.assert_allclose(
            jax.hessian(ours)(a[i]), jax.hessian(ref)(a[i]), rtol=1e-8, atol=1e-10
        )
    hvp = lambda f: jax.vmap(lambda a, t: jax.jvp(jax.grad(f), (a,), (t,))[1])
    np.testing.assert_allclose(hvp(ours)(a, t), hvp(ref)(a, t), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("plan", ["adaptive", "static"])
def test_beyond_the_reach_the_value_and_gradient_are_nan(dtype, plan):
    # Squaring amplifies the angles' rounding; past the documented reach (2^s u = 2^-9) the
    # result used to be finite and meaningless (norm 1e115, or a zero matrix).
    if plan == "adaptive":
        cfg = linalg._config(dtype)
        reach = cfg.thetas[-1] * 2.0**cfg.max_squarings
    else:
        reach = linalg._taylor_config(dtype).nan_beyond
    one = jnp.array([[0.0, -1.0], [1.0, 0.0]], dtype)  # spectral radius (and eta) 1
    f = lambda a: expm_skew(a, plan=plan)
    within, beyond = one * (0.9 * reach), jnp.stack([one * 0.5, one * (1.1 * reach)])
    assert unitarity_error(f(within)) < 2**-8
    q = f(beyond)
    assert unitarity_error(q[0]) < 10 * eps(dtype) and bool(jnp.all(jnp.isnan(q[1])))
    g = jax.grad(lambda a: jnp.sum(f(a) * one[None]))(beyond)
    assert bool(jnp.all(jnp.isfinite(g[0]))) and bool(jnp.all(jnp.isnan(g[1])))
    for t in (1e19, 1e30):  # absurd angles, in both dtypes
        assert bool(jnp.all(jnp.isnan(f(one * jnp.asarray(t, dtype)))))


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


@pytest.mark.parametrize("plan", ["adaptive", "static"])
def test_vmap_over_an_empty_stack(plan):
    # vmap over 0 matrices (a zero-length nn.scan stack) reaches the adaptive plan's vmap
    # rule with an empty batch, whose squaring count was a max over nothing (ValueError).
    a = jnp.zeros((0, 3, 3), jnp.float32)
    f = lambda x: expm_skew(x, plan=plan)
    assert jax.vmap(f)(a).shape == (0, 3, 3)
    assert jax.vmap(jax.grad(lambda x: jnp.sum(f(x))))(a).shape == (0, 3, 3)


def test_nan_propagates_and_large_norms_stay_unitary():
    a = skew(11, (N, N), jnp.float32, shift=np.where(np.eye(N) > 0, np.nan, 0.0))
    assert bool(jnp.all(jnp.isnan(ours_expm(a))))
    a = skew(11, (N, N), jnp.float64, norm1=1e9)
    assert unitarity_error(ours_expm(a)) < 1e-6  # about 28 squarings (the cap is 44)


# --- one factorization ---------------------------------------------------------------------------
def _count(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count(sub, name)
    return count


@pytest.mark.parametrize("fn", [expm_skew, cayley])
def test_one_lu_and_no_solve_in_the_backward(fn):
    """One LU and two triangular solves, all in the forward. The backward multiplies instead:
    expm by the forward's ``Q^{-1}`` (``Q = p(-A_s)``), cayley by ``(I + C) / 2 = M^{-1}``."""
    a = skew(12, (N, N), jnp.float64, norm1=3.0)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda x: jnp.sum(fn(x) ** 2)))(a).jaxpr
    assert _count(jaxpr, "lu") == 1
    assert _count(jaxpr, "triangular_solve") == 2
    assert _count(jax.make_jaxpr(fn)(a).jaxpr, "triangular_solve") == 2


def _loops_holding(jaxpr, names):
    """For each loop (``scan``, ``while``) in ``jaxpr`` at any depth, how many of ``names``'
    primitives its body holds; loops holding none are left out."""
    found = []
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if eqn.primitive.name in ("scan", "while"):
                n = sum(_count(sub, name) for name in names)
                if n:
                    found.append(n)
            else:
                found += _loops_holding(sub, names)
    return found


@pytest.mark.parametrize("fn", [expm_skew, cayley])
def test_a_stack_runs_each_matrix_factorization_and_solves_together(fn, monkeypatch):
    """Over jaxlib's threshold a stack's LAPACK work is cut into chunks run by a loop; the
    LU and its two solves of a matrix form one chunked chain (one loop), not three chunked
    stages: chunks side by side then overlap, 2x faster on 2 cores for 16 inverses of
    256 x 256 (``_lu_solve``)."""
    monkeypatch.setattr(stacks, "on_cpu", lambda: True)
    monkeypatch.setattr(stacks, "lanes", lambda: 2)
    a = skew(12, (8, N, N), jnp.float32, norm1=3.0)
    # One matrix per call (as for 64 x 64 and larger): two side by side, four rounds.
    monkeypatch.setattr(stacks, "LAPACK_TASK_FLOPS", stacks.lapack_flops(a.shape, a.dtype) + 1)
    jaxpr = jax.make_jaxpr(fn)(a).jaxpr
    assert _loops_holding(jaxpr, ("lu", "triangular_solve")) == [3 * 2]


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


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
@pytest.mark.parametrize("k", [N, N - 1])
def test_based_cayley_is_the_product_and_differentiates_as_it(dtype, k):
    """``based_cayley(B, A, k) = B @ cayley(A)[..., :k]``, and its VJP (both arguments) equals
    autodiff through the solve and the product."""
    a = skew(16, (2, N, N), dtype, norm1=2.0)
    base = jnp.linalg.qr(skew(17, (2, N, N), dtype, shift=0.3))[0]
    c = skew(18, (2, N, N), dtype, shift=0.4)[..., :k]

    def plain(b, a):
        return jnp.matmul(b, plain_cayley(a)[..., :k], precision="highest")

    def scalar(fn):
        return jax.jit(jax.value_and_grad(lambda b, a: jnp.sum(jnp.real(fn(b, a) * c)), (0, 1)))

    (v, ours), (v_ref, ref) = (
        scalar(lambda b, a: linalg.based_cayley(b, a, k))(base, a),
        scalar(plain)(base, a),
    )
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-12)
    for x, y in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-12)


def test_based_cayley_saves_a_product_in_the_compiled_step():
    """A square Cayley map with its base: one product in the forward, two in the backward,
    against four for the product followed by ``cayley`` (XLA's optimized program)."""
    a = skew(19, (N, N), jnp.float32, norm1=1.0)
    base = jnp.linalg.qr(skew(20, (N, N), jnp.float32, shift=0.3))[0]
    c = skew(21, (N, N), jnp.float32, shift=0.4)

    def dots(fn):
        step = jax.jit(jax.value_and_grad(lambda b, a: jnp.sum(fn(b, a) * c), argnums=1))
        return step.lower(base, a).compile().as_text().count(" dot(")

    assert dots(lambda b, a: linalg.based_cayley(b, a, N)) == 3
    assert dots(lambda b, a: jnp.matmul(b, cayley(a), precision="highest")) == 4


# --- the static plan (Taylor 18, masked squarings) -----------------------------------------------
static_expm = jax.jit(lambda a: expm_skew(a, plan="static"))
static_value_and_grad = jax.jit(jax.grad(loss(lambda a: expm_skew(a, plan="static")), has_aux=True))


def _taylor18_scheme_coefficients():
    """The Bader-Blanes-Casas scheme expanded into its power series (float64 coefficients)."""
    poly = np.polynomial.polynomial

    def q(row, powers):
        return sum(c * np.eye(1, 7, p)[0] for c, p in zip(row, powers))

    a = q(linalg._T18_A, (0, 1, 2, 3))
    b = [q(row, (0, 1, 2, 3, 6)) for row in linalg._T18_B]
    q9 = poly.polyadd(poly.polymul(a, b[3]), b[2])
    return poly.polyadd(b[0], poly.polymul(poly.polyadd(b[1], q9), q9))


def test_taylor18_scheme_is_the_taylor_polynomial():
    # The scheme's 19 coefficients are 1/k! (checks every digit that matters of the table).
    c = _taylor18_scheme_coefficients()
    assert len(np.trim_zeros(c, "b")) == 19
    expected = np.array([1.0 / math.factorial(k) for k in range(19)])
    np.testing.assert_allclose(c[:19], expected, rtol=1e-13, atol=1e-30)
    # The identity split off in _expm_static: c2 c9 = 1.
    c9 = linalg._T18_B[2][0]
    assert abs((linalg._T18_B[1][0] + c9) * c9 - 1.0) < 1e-15


def _taylor_relative_backward_error(theta, terms=100):
    """|h(i theta)| / theta for h(x) = log(e^{-x} T18(x)), exact rational series."""
    c = [Fraction(1, math.factorial(j)) for j in range(19)]
    h = _log_series(c, terms)
    h[1] -= 1
    y = Fraction(theta)
    re = sum(h[k] * (-1) ** (k // 2) * y**k for k in range(2, terms + 1, 2))
    im = sum(h[k] * (-1) ** ((k - 1) // 2) * y**k for k in range(1, terms + 1, 2))
    return abs(complex(float(re), float(im))) / float(y)


@pytest.mark.parametrize("config, unit", [(linalg._TAYLOR32, 2**-24), (linalg._TAYLOR64, 2**-53)])
def test_taylor_thresholds_are_safe_for_the_spectral_radius(config, unit):
    # The static plan uses a theta below the largest admissible one (3.53 in float32, 1.155
    # in float64): its squarings are paid for anyway, and the rounding is smaller there.
    assert _taylor_relative_backward_error(config.theta) <= unit
    assert config.theta * 2**config.max_squarings >= 1000.0  # the tested range


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n", [4, 64])
def test_static_plan_accuracy_over_norms(dtype, n):
    # Value against scipy (float64) and unitarity, over 1-norms 1e-3 .. 1e3 (within the
    # plan's reach): no worse than the adaptive plan beyond a small factor (measured: equal
    # below norm 1, 1-3x at larger norms, where both are near u * ||A||).
    import scipy.linalg

    worst = 0.0
    for i, norm in enumerate([1e-3, 1e-1, 1.0, 10.0, 100.0, 1e3]):
        a = skew(100 + i, (n, n), jnp.float64, norm1=norm)
        ref = scipy.linalg.expm(np.asarray(a))
        errors = []
        for q in (static_expm(a.astype(dtype)), ours_expm(a.astype(dtype))):
            q = np.asarray(q, np.float64)
            errors.append(max(np.abs(q - ref).max(), unitarity_error(q)))
        floor = 4 * eps(dtype) * max(1.0, norm)
        worst = max(worst, errors[0] / max(errors[1], floor))
        assert unitarity_error(static_expm(a.astype(dtype))) <= 10 * n * eps(dtype) * max(1, norm)
    assert worst <= 4.0, worst


def test_static_plan_gradients_and_batches():
    a, c = skew(7, (3, N, N), jnp.float64), skew(8, (3, N, N), jnp.float64, shift=0.3)
    g_static, q = static_value_and_grad(a, c)
    g_ours, _ = value_and_grad["ours"](a, c)
    np.testing.assert_allclose(g_static, g_ours, rtol=1e-9, atol=1e-11)
    single = jnp.stack([static_expm(a[i]) for i in range(3)])
    np.testing.assert_allclose(q, single, rtol=1e-12, atol=1e-14)
    # complex (skew-Hermitian): values
    a = skew(9, (N, N), jnp.complex128)
    np.testing.assert_allclose(static_expm(a), jax_expm(a), rtol=1e-12, atol=1e-13)


def test_static_plan_limits():
    # Within the reach theta * 2^max_squarings of the spectral-radius bound: unitary. Beyond
    # it the Taylor polynomial is used outside its range and the result is NOT unitary (the
    # documented limit; the adaptive plan goes much further).
    reach = linalg._TAYLOR32.theta * 2**linalg._TAYLOR32.max_squarings
    a = skew(12, (N, N), jnp.float32, norm1=1.0)
    rho = spectral_radius(a)
    assert unitarity_error(static_expm(a * (0.9 * reach / rho))) < 1e-3
    beyond = unitarity_error(static_expm(a * (8 * reach / rho)))
    assert not beyond < 1e-2  # a large error, or NaN once the correction overflows
    assert unitarity_error(ours_expm(a * (8 * reach / rho))) < 1e-3
    with pytest.raises(ValueError, match="adaptive"):
        expm_skew(a, plan="fast")
    with pytest.raises(TypeError, match="plan"):
        expm_skew(a, plan=1)
    assert linalg.default_plan() == ("adaptive" if jax.default_backend() == "cpu" else "static")


def test_the_default_plan_follows_where_the_program_runs(monkeypatch):
    # An accelerator host runs the device plan, unless the work is placed on the CPU.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert linalg.default_plan() == "static"
    with jax.default_device(jax.devices("cpu")[0]):
        assert linalg.default_plan() == "adaptive"


# --- polar ---------------------------------------------------------------------------------------
def _with_singular_values(seed, n, k, kappa, dtype):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    s = np.geomspace(1.0, 1.0 / kappa, k)
    return jnp.asarray((u * s) @ v.T, dtype), u @ v.T


def test_polar_coefficients_map_the_design_interval_near_one():
    s = np.linspace(linalg._POLAR_LOW, 1.0, 20001)
    for a, b, c in linalg._POLAR_STEPS:
        s = s * (a + b * s**2 + c * s**4)
    assert np.abs(s - 1).max() < 0.0067


polar_jit = jax.jit(linalg.polar)


@pytest.mark.parametrize("n, k", [(64, 64), (64, 16)])
def test_polar_float32_orthogonality_and_accuracy(n, k):
    for kappa in (1.0, 2.0, 10.0):
        x, exact = _with_singular_values(int(kappa), n, k, kappa, jnp.float32)
        q = polar_jit(x)
        assert unitarity_error(q) <= 10 * n * eps(jnp.float32)
        assert np.abs(np.asarray(q, np.float64) - exact).max() < 1e-2  # bfloat16 phase
    # An orthogonal input is its own polar factor, to float32 rounding.
    x, exact = _with_singular_values(3, n, k, 1.0, jnp.float32)
    np.testing.assert_allclose(polar_jit(x), x, atol=1e-6)
    # Scaling does not matter; bfloat16 inputs compute in float32.
    np.testing.assert_allclose(polar_jit(x * 1e3), x, atol=1e-6)
    assert polar_jit(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def _exact_polar_jvp(x, dx):
    """d polar(X)[dX] for a tall X = Q H, from the Sylvester equation H W + W H = C."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    q, v = u @ vt, vt.T
    c = q.T @ dx - dx.T @ q
    w = v @ ((v.T @ c @ v) / (s[:, None] + s[None, :])) @ v.T
    h_inv = v @ np.diag(1 / s) @ v.T
    return q @ w + (np.eye(x.shape[0]) - q @ q.T) @ dx @ h_inv


@pytest.mark.parametrize("n, k", [(6, 6), (7, 4)])
def test_polar_derivative_matches_the_sylvester_solution(n, k):
    x, _ = _with_singular_values(5, n, k, 3.0, jnp.float64)
    dx = jnp.asarray(np.random.default_rng(6).standard_normal((n, k)))
    exact = _exact_polar_jvp(np.asarray(x), np.asarray(dx))
    polar_jvp = jax.jit(lambda x, dx: jax.jvp(linalg.polar, (x,), (dx,))[1])
    tangent = polar_jvp(x, dx)  # float64: no bfloat16 phase, one finishing step more
    np.testing.assert_allclose(tangent, exact, rtol=1e-10, atol=1e-10)
    # float32 with the bfloat16 phase: autodiff through it is accurate to about 1e-2.
    tangent32 = polar_jvp(x.astype(jnp.float32), dx.astype(jnp.float32))
    assert np.abs(np.asarray(tangent32, np.float64) - exact).max() < 3e-2 * np.abs(exact).max()
    # The VJP is the transpose of that JVP (autodiff).
    ct = jnp.asarray(np.random.default_rng(7).standard_normal((n, k)))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(linalg.polar(x) * ct)))(x)
    np.testing.assert_allclose(jnp.sum(grad * dx), jnp.sum(ct * exact), rtol=1e-6)


@pytest.mark.parametrize("kappa, bound", [(2.0, 0.06), (10.0, 0.25)])
def test_polar_float32_gradient_of_a_small_spread_matrix(kappa, bound):
    # The bfloat16 phase's right factor grows like kappa, its derivative like kappa^2: its
    # tangents run at full precision (bfloat16 tangents: 3.7% and 34% here).
    rot = lambda t: np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    x = rot(0.7) @ np.diag([1.0, 1.0 / kappa]) @ rot(0.4)
    ct = np.array([[1.0, -2.0], [0.5, 1.5]])
    exact = np.array(
        [[np.sum(ct * _exact_polar_jvp(x, np.eye(2)[:, [i]] @ np.eye(2)[[j]])) for j in range(2)]
         for i in range(2)]
    )  # fmt: skip
    loss = lambda x: jnp.sum(linalg.polar(x) * jnp.asarray(ct, jnp.float32))
    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.abs(g - exact).max() < bound * np.abs(exact).max()


def test_polar_float64_is_orthogonal_to_its_rounding():
    q = np.linalg.qr(np.random.default_rng(8).standard_normal((5, 5)))[0]
    x, _ = _with_singular_values(9, 6, 4, 5.0, jnp.float64)
    for y, exact in ((jnp.asarray(q), q), (x, None)):
        p = np.asarray(polar_jit(y))
        assert np.abs(p.T @ p - np.eye(p.shape[1])).max() < 1e-14
        if exact is not None:  # an orthogonal matrix is its own polar factor
            np.testing.assert_allclose(p, exact, atol=1e-14)


def test_polar_input_checks():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="finishing_steps"):
            linalg.polar(jnp.eye(3), finishing_steps=bad)
    with pytest.raises(ValueError, match="tall"):
        linalg.polar(jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="real floating"):
        linalg.polar(jnp.zeros((3, 3), jnp.complex64))
    assert linalg.polar(jnp.zeros((0, 3, 2))).shape == (0, 3, 2)


@pytest.mark.parametrize(
    "dtype, scales", [(jnp.float32, (1e-20, 1e-10, 1e10, 1e20)), (jnp.float64, (1e-90, 1e90))]
)
def test_polar_is_scale_invariant(dtype, scales):
    # polar(c X) = polar(X): X^T X squared used to under- or overflow (NaN) for singular
    # values outside about [1e-9, 4e9] (float32) or [1e-77, 1e77] (float64).
    q = jnp.asarray(np.linalg.qr(np.random.default_rng(3).standard_normal((6, 4)))[0], dtype)
    for c in scales:
        np.testing.assert_allclose(linalg.polar(q * c), q, atol=10 * eps(dtype))


def test_concurrent_complex_cayley_transforms_finish():
    # Four complex Cayley transforms (and their VJPs) in one program: their batched LU
    # factorizations and triangular solves, side by side, hung XLA:CPU with two threads (every
    # pool thread waiting for tasks of jaxlib's own; numerics.lapack now chunks them). A fresh
    # interpreter with a deadline, so a hang fails instead of blocking.
    script = (
        "import os\n"
        "os.sched_setaffinity(0, range(os.cpu_count()))\n"  # the suite pins workers to 1 CPU
        "import jax, jax.numpy as jnp\n"
        "from paramx._src.parametrizations import linalg\n"
        "def mk(i, b):\n"
        "    a = jax.random.normal(jax.random.key(i), (b, 8, 8)).astype(jnp.complex64)\n"
        "    return a - jnp.swapaxes(a, -1, -2).conj()\n"
        "ms = [mk(i, b) for i, b in enumerate([256, 256, 64, 64])]\n"
        "f = lambda ms: sum(jnp.sum(jnp.abs(linalg.cayley(m)) ** 2) for m in ms)\n"
        "print(float(jax.jit(jax.grad(lambda ms: f(ms).real))(ms)[0].real.sum()))\n"
    )
    run = run_python("-c", script, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda a: expm_skew(a, plan="adaptive"), (2, 13, 13)),
        (lambda a: expm_skew(a, plan="static"), (2, 13, 13)),
        (cayley, (2, 13, 13)),
        (lambda a: linalg.polar(a[..., :5]), (2, 13, 13)),
    ],
    ids=["expm_adaptive", "expm_static", "cayley", "polar"],
)
def test_an_eager_call_compiles_one_program(fn, shape):
    """Called outside ``jit`` (registration, a notebook), a kernel runs as one compiled
    program, as ``jax.numpy``'s functions do, not operation by operation (the adaptive
    exponential compiled 89 programs for a new shape, 0.13 s per call on small matrices)."""
    import logging

    compiled = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                compiled.append(record.getMessage())

    a = skew(7, shape, jnp.float32)
    jax.block_until_ready(a)
    handler = Count()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            jax.block_until_ready(fn(a))
    finally:
        logger.removeHandler(handler)
    kernels = [m for m in compiled if "jit(_" in m]
    others = [m for m in compiled if "jit(_" not in m]
    assert len(kernels) <= 1, kernels
    assert len(others) <= 3, [m[:80] for m in others]  # argument preparation (eye, slices)
