"""Complex analogues: unitary (a complex Orthogonal), Hermitian and skew-Hermitian matrices.

Training uses a local variant of tests/catalogue.py's harness: the loss is ``sum(|q e|²)`` (real
for complex errors), and the gradient is conjugated before optax sees it. For a real loss of
complex parameters ``jax.grad`` returns ``∂L/∂Re − i ∂L/∂Im``, the conjugate of the steepest
ascent direction, and optax applies updates as they come (see Orthogonal's docstring).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import paramx as px
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations import linalg
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.skew import Skew, SkewHermitian, skew_hermitian
from paramx._src.parametrizations.symmetric import Hermitian, Symmetric, hermitian

COMPLEX = [jnp.complex64, jnp.complex128]
HIGHEST = jax.lax.Precision.HIGHEST


def _cn(shape, dtype=jnp.complex128, seed=0):
    """Standard complex normal entries (real and imaginary parts N(0, 1/2))."""
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _mH(x):
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def _eps(dtype):
    return float(jnp.finfo(dtype).eps)


# ----- the training harness (catalogue.py's, for complex parameters) ----------------------------
def _loss(w, target, q):
    e = (w - target).reshape(-1)
    return jnp.sum(jnp.abs(jnp.matmul(q, e, precision=HIGHEST)) ** 2)


@jax.jit
def _run(tree, target, q, lr, steps):
    params, pstate = px.split_state(tree)  # Orthogonal's base is state, not trained

    def value(params):
        return px.materialize(params, pstate)["w"]

    opt = optax.adam(lr)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)

        def step(_, carry):
            n, s = carry
            g = jax.grad(lambda n: _loss(value(n), target, q))(n)
            g = jax.tree_util.tree_map(jnp.conj, g)  # the steepest-descent direction
            upd, s = opt.update(g, s, n)
            return optax.apply_updates(n, upd), s

        params, _ = jax.lax.fori_loop(0, steps, step, (params, state))
    w = value(params)
    return w, _loss(w, target, q)


def _adam_fit(p, x0, target, q=None, *, steps=1000, lr=1e-2):
    tree = px.register_parametrization({"w": x0}, "w", p)
    if q is None:  # the relative squared error |w - target|² / |target|²
        scale = 1 / jnp.sqrt(jnp.sum(jnp.abs(target) ** 2))
        q = jnp.eye(target.size, dtype=target.dtype) * scale.astype(target.dtype)
    lr = jnp.asarray(lr, jnp.float32)
    return _run(tree, target, q, lr, jnp.asarray(steps, jnp.int32))


def _random_quadratic(key, shape, dtype):
    k1, k2 = jax.random.split(key)
    size = int(np.prod(shape))
    q = jax.random.normal(k2, (size, size), dtype) / jnp.sqrt(jnp.asarray(size, dtype))
    return jax.random.normal(k1, shape, dtype), q


# (parametrization, shape): one compiled training program per entry and dtype, shared by the
# quality test and the fitting-power test.
TRAINED = {
    "unitary-matrix_exp": (Orthogonal("matrix_exp"), (4, 4)),
    "unitary-cayley": (Orthogonal("cayley"), (4, 4)),
    "hermitian": (Hermitian(), (4, 4)),
    "skew_hermitian": (SkewHermitian(), (4, 4)),
}


def _in_set(name, w, dtype):
    p, shape = TRAINED[name]
    n = shape[-1]
    if isinstance(p, Orthogonal):
        return bool(jnp.all(p.in_manifold(w, atol=10 * n * _eps(dtype))))
    scale = max(float(jnp.max(jnp.abs(w))), 1.0)
    return bool(jnp.all(p.in_manifold(w, atol=10 * n * _eps(dtype) * scale)))


# Both dtypes for each family; one per unitary map (their programs are the slow ones to compile).
QUALITY = [
    ("unitary-matrix_exp", jnp.complex64),
    ("unitary-cayley", jnp.complex128),
    *((name, dtype) for name in ("hermitian", "skew_hermitian") for dtype in COMPLEX),
]


@pytest.mark.parametrize("name,dtype", QUALITY)
def test_quality_after_training_the_value_stays_in_the_set(name, dtype):
    p, shape = TRAINED[name]
    target, q = _random_quadratic(jax.random.key(1), shape, dtype)
    x0 = _cn(shape, dtype, seed=2)
    w, loss = _adam_fit(p, x0, target, q)
    assert w.dtype == dtype and bool(jnp.isfinite(loss))
    assert _in_set(name, w, dtype)
    # It learned: the loss went down from the registered value's.
    w0 = px.tensor.materialize(px.tensor.register(x0, p))
    assert float(loss) < 0.9 * float(_loss(w0, target, q))


# The Cayley chart is left out: it reaches base·C only where C has no eigenvalue −1, and a
# Haar target far from the base needs a long way through it (relative loss 2e-2 after 1,000
# steps); update_base every few hundred steps would fix that, as for real matrices.
@pytest.mark.parametrize("name", [n for n in TRAINED if n != "unitary-cayley"])
def test_fitting_power_reaches_a_sampled_target(name):
    dtype = jnp.complex64
    p, shape = TRAINED[name]
    target = p.sample(jax.random.key(7), shape, dtype)
    w, loss = _adam_fit(p, _cn(shape, dtype, seed=8), target)
    assert float(loss) < 1e-4
    assert _in_set(name, w, dtype)


@functools.partial(jax.jit, static_argnums=1)
def _adam_on_abs_squared(z0, conj):
    opt = optax.adam(0.1)
    with jax.numpy_dtype_promotion("standard"):

        def step(_, carry):
            z, s = carry
            g = jax.grad(lambda z: jnp.sum(jnp.abs(z) ** 2))(z)
            u, s = opt.update(jnp.conj(g) if conj else g, s, z)
            return optax.apply_updates(z, u), s

        return jax.lax.fori_loop(0, 100, step, (z0, opt.init(z0)))[0]


def test_optax_needs_the_conjugated_gradient():
    # The convention the harness relies on: jax.grad of |z|² at z is 2 conj(z), and Adam on it
    # sends the imaginary part uphill; conjugated, it converges.
    z0 = jnp.array([3 + 4j, -1 - 2j], jnp.complex64)
    assert complex(jax.grad(lambda z: jnp.abs(z[0]) ** 2)(z0)[0]) == 6 - 8j
    assert np.max(np.abs(_adam_on_abs_squared(z0, True))) < 0.5
    assert np.max(np.abs(_adam_on_abs_squared(z0, False))) > 5


# ----- unitary: Orthogonal on complex tensors ---------------------------------------------------
def _q_factor(w):
    """The Q factor with a real positive diagonal of R, in forward's orientation (NumPy)."""
    w = np.asarray(w, np.complex128)
    flip = w.shape[-2] <= w.shape[-1]
    t = np.swapaxes(w, -1, -2) if flip else w
    q, r = np.linalg.qr(t)
    d = np.diagonal(r, axis1=-2, axis2=-1)
    q = q * (d / np.abs(d))[..., None, :]
    return np.swapaxes(q, -1, -2) if flip else q


@functools.partial(jax.jit, static_argnums=0)
def _unitary_checks(p, w, u, noise):
    """Registration, assignment, update_base, a stack and vmap in one compiled program."""
    tree = px.register_parametrization({"w": w}, "w", p)
    assigned = px.assign(tree, "w", u)
    node = assigned["w"]
    moved = node.replace(originals=(node.original + noise,))
    raw = px.register_parametrization({"w": w}, "w", Orthogonal(p.orthogonal_map, False))
    stack = px.register_parametrization({"w": w}, "w", p, batch_axes=w.ndim - 2)["w"]
    return {
        "value": px.materialize(tree)["w"],
        "assigned": px.materialize(assigned)["w"],
        "moved": px.tensor.materialize(moved),
        "recentred": px.materialize(px.update_base({"w": moved}))["w"],
        "raw": px.materialize(raw)["w"],
        "vmapped": jax.vmap(px.tensor.materialize)(stack) if w.ndim > 2 else None,
    }


# (map, dtype, shape): square, wide and a batch, both maps and both dtypes, in two programs
# (tall matrices are trained below).
UNITARY_CASES = [("matrix_exp", jnp.complex64, (4, 4)), ("cayley", jnp.complex128, (2, 3, 5))]


@pytest.mark.parametrize("omap,dtype,shape", UNITARY_CASES)
def test_unitary_registration_membership_exactness_update_base_and_vmap(omap, dtype, shape):
    tol = 100 * _eps(dtype)
    p = Orthogonal(omap)
    w = _cn(shape, dtype)
    u = p.sample(jax.random.key(1), shape, dtype)
    out = _unitary_checks(p, w, u, 0.3 * _cn(shape, dtype, seed=2))
    q = out["value"]
    assert q.dtype == dtype and q.shape == w.shape
    assert bool(jnp.all(p.in_manifold(q))) and float(jnp.max(p.distance(q))) <= tol
    np.testing.assert_allclose(q, _q_factor(w), atol=tol)  # the Q factor, R's diagonal > 0
    # Exact on the set: assigning a unitary value gives it back; update_base keeps the value.
    np.testing.assert_allclose(out["assigned"], u, atol=tol)
    assert bool(jnp.all(p.in_manifold(out["moved"])))
    assert float(jnp.max(jnp.abs(out["moved"] - u))) > 0.1  # the noise moved it
    np.testing.assert_allclose(out["recentred"], out["moved"], atol=tol)
    # Without trivialization the value is the map of the raw original, unitary too.
    assert bool(jnp.all(p.in_manifold(out["raw"])))
    # A stack (batch_axes), computed per matrix under vmap, gives the same values.
    if out["vmapped"] is not None:
        np.testing.assert_allclose(out["vmapped"], q, atol=tol)
    assert Orthogonal().map_for(w) == "matrix_exp"  # torch's default for complex tensors


def test_unitary_gradient_matches_finite_differences():
    # JAX's convention: for a real L, the derivative along V is Re(sum(grad * V)). A tall
    # matrix: the skew-Hermitian generator is padded, and the base multiplies the map.
    shape = (5, 3)
    node = px.tensor.register(_cn(shape), Orthogonal("matrix_exp"))
    c = _cn(shape, seed=2)
    x = node.original + 0.3 * _cn(shape, seed=4)
    v = _cn(shape, seed=3)
    h = 1e-6

    def loss(o):
        w = px.tensor.materialize(node.replace(originals=(o,)))
        return jnp.sum(jnp.abs(w - c) ** 2)

    # One traced call of the parametrization (and its VJP) for the three points.
    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(
        jnp.stack([x, x + h * v, x - h * v])
    )
    fd = (losses[1] - losses[2]) / (2 * h)
    np.testing.assert_allclose(float(jnp.real(jnp.sum(grads[0] * v))), float(fd), rtol=1e-6)


@jax.jit
def _linalg_checks(a, c, v):
    """expm_skew(A); cayley at A and A ± hV and its gradient at A, from one call (and one VJP)."""
    h = 1e-6

    def loss(a):
        u = linalg.cayley(a)
        return jnp.real(jnp.sum(u * c)), u

    points = jnp.stack([a, a + h * v, a - h * v])
    (losses, u), grads = jax.vmap(jax.value_and_grad(loss, has_aux=True))(points)
    fd = (losses[1] - losses[2]) / (2 * h)
    return {"expm": linalg.expm_skew(a), "cayley": u[0]}, jnp.real(jnp.sum(grads[0] * v)), fd


def test_expm_skew_and_cayley_on_skew_hermitian_inputs():
    # expm_skew's VJP on complex inputs is checked through the parametrization above (the
    # finite-difference test) and by training; cayley's here.
    n = 5
    x, y = _cn((3, n, n)), _cn((3, n, n), seed=2)
    scales = jnp.array([0.05, 1.0, 4.0])[:, None, None].astype(x.dtype)
    a = scales * (x - _mH(x))  # skew-Hermitian, of three sizes
    v = y - _mH(y)  # a skew-Hermitian direction (the tangent the parametrization uses)
    values, directional, fd = _linalg_checks(a, _cn((3, n, n), seed=1), v)
    np.testing.assert_allclose(float(directional), float(fd), rtol=1e-7)
    # References from the eigendecomposition A = i H, H Hermitian: f(A) = V f(i Λ) Vᴴ.
    lam, vec = np.linalg.eigh(np.asarray(-1j * a))
    fs = {"expm": np.exp(1j * lam), "cayley": (1 + 0.5j * lam) / (1 - 0.5j * lam)}
    eye = np.eye(n)[None]
    for name, u in values.items():
        u = np.asarray(u)
        ref = vec @ (fs[name][..., :, None] * _npH(vec))
        assert np.max(np.abs(_npH(u) @ u - eye)) <= 10 * n * _eps(a.dtype), name
        np.testing.assert_allclose(u, ref, atol=1e-13, err_msg=name)


def test_haar_on_u_n_is_the_circular_unitary_ensemble():
    n, draws = 3, 4000
    p = Orthogonal()
    u = p.sample(jax.random.key(5), (draws, n, n), jnp.complex128)
    assert u.dtype == jnp.complex128 and bool(jnp.all(p.in_manifold(u)))
    u = np.asarray(u)
    tr = np.trace(u, axis1=-2, axis2=-1)
    # CUE moments: E tr U = 0, E|tr U|² = 1, E|tr U|⁴ = 2 (n >= 2). Standard errors: 0.016,
    # 0.016 and 0.07 (|tr U|² is roughly exponential).
    assert abs(np.mean(tr)) < 0.07
    assert abs(np.mean(np.abs(tr) ** 2) - 1) < 0.07
    assert abs(np.mean(np.abs(tr) ** 4) - 2) < 0.3
    # Eigenvalue angles are uniform on the circle (Weyl's density is invariant under rotation):
    # 12,000 angles in 8 bins, each bin within 5 sigma of 1,500 (sigma ~ 36; CUE angles are
    # repulsive, which makes the counts less variable, not more).
    counts, _ = np.histogram(np.angle(np.linalg.eigvals(u)), bins=8, range=(-np.pi, np.pi))
    assert np.all(np.abs(counts - draws * n / 8) < 180), counts
    # Without the phase correction QR's Q is not Haar: LAPACK's R has a real diagonal of either
    # sign, which biases the phases of Q's entries. With it, E u_ij = 0 and E|u_ij|² = 1/n.
    np.testing.assert_allclose(np.mean(np.abs(u) ** 2, axis=0), 1 / n, atol=0.03)
    assert np.max(np.abs(np.mean(u, axis=0))) < 0.04


def test_stiefel_and_torus_samples_for_complex_dtypes():
    p = Orthogonal()
    tall = p.sample(jax.random.key(0), (1000, 5, 3), jnp.complex64)
    torus = p.sample(jax.random.key(2), (2000, 3, 3), jnp.complex64, distribution="torus")
    assert bool(jnp.all(p.in_manifold(tall))) and bool(jnp.all(p.in_manifold(torus)))
    np.testing.assert_allclose(np.mean(np.abs(np.asarray(tall)) ** 2, axis=0), 1 / 5, atol=0.03)
    d = np.diagonal(np.asarray(torus), axis1=-2, axis2=-1)
    np.testing.assert_allclose(np.abs(d), 1.0, atol=1e-6)
    assert np.max(np.abs(np.mean(d, axis=0))) < 0.07  # uniform phases


def test_unitary_in_manifold_and_distance_off_the_set():
    p = Orthogonal()
    x = _cn((3, 5, 3))
    s = np.linalg.svd(np.asarray(x), compute_uv=False)
    np.testing.assert_allclose(p.distance(x), np.sqrt(np.sum((s - 1) ** 2, axis=-1)), rtol=1e-12)
    assert not bool(jnp.any(p.in_manifold(x)))
    # The distance is attained by the polar factor: the nearest unitary-column matrix.
    uu, _, vh = np.linalg.svd(np.asarray(x[0]), full_matrices=False)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x[0]) - uu @ vh), p.distance(x[0]))


def test_householder_still_refuses_complex_with_the_path():
    with pytest.raises(ValueError, match=r"householder.*complex.*fc/kernel"):
        px.orthogonal({"fc": {"kernel": _cn((5, 3), jnp.complex64)}}, "fc/kernel", "householder")


# ----- Hermitian and skew-Hermitian -------------------------------------------------------------
# Statistics and comparisons run in NumPy; the parametrizations' own functions run in one
# compiled program per test, so the file compiles few small programs.
FAMILIES = {
    "hermitian": (Hermitian(), hermitian, 1, Symmetric()),
    "skew_hermitian": (SkewHermitian(), skew_hermitian, -1, Skew()),
}


def _npH(x):
    return np.conj(np.swapaxes(np.asarray(x), -1, -2))


def _part(a, sign):
    return (np.asarray(a) + sign * _npH(a)) / 2


@functools.partial(jax.jit, static_argnums=0)
def _family_checks(family, a, s, off):
    p, register, _, _ = FAMILIES[family]
    tree = register({"fc": {"kernel": a}}, "fc/kernel")
    w = px.materialize(tree)["fc"]["kernel"]
    return {
        "value": w,
        "in": p.in_manifold(w),
        "distance": p.distance(w),
        "roundtrip": p.forward(p.right_inverse(s)),
        "assigned": px.materialize(px.assign(tree, "fc/kernel", s))["fc"]["kernel"],
        "off_in": p.in_manifold(off),
        "off_distance": p.distance(off),
    }


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", COMPLEX)
def test_value_membership_exactness_and_projection(family, dtype):
    p, _, sign, _ = FAMILIES[family]
    a = _cn((2, 4, 4), dtype)
    s = p.sample(jax.random.key(3), (2, 4, 4), dtype)
    off = s + 0.5 * _cn((2, 4, 4), dtype, seed=1)
    out = jax.tree_util.tree_map(np.asarray, _family_checks(family, a, s, off))
    w = out["value"]
    assert w.dtype == dtype
    np.testing.assert_array_equal(w, sign * _npH(w))  # exactly in the set
    assert out["in"].all() and np.max(out["distance"]) == 0.0
    np.testing.assert_allclose(w, _part(a, sign), atol=10 * _eps(dtype))
    # Exact on the set: a member comes back bit for bit, through right_inverse or assignment.
    np.testing.assert_array_equal(out["roundtrip"], s)
    np.testing.assert_array_equal(out["assigned"], s)
    # Off the set: in_manifold says no, and distance is the norm of the other part.
    assert not out["off_in"].any()
    expected = np.linalg.norm(_part(off, -sign), axis=(-2, -1))
    np.testing.assert_allclose(out["off_distance"], expected, rtol=10 * _eps(dtype))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_projection_is_the_nearest_point(family):
    p = FAMILIES[family][0]
    a = np.asarray(_cn((4, 4)))
    proj = np.asarray(p.forward(p.right_inverse(a)))
    dist = np.linalg.norm(a - proj)
    np.testing.assert_allclose(dist, float(p.distance(a)), rtol=1e-12)
    # The residual is orthogonal to the set for the real inner product Re tr(XᴴY) ...
    members = np.asarray(p.sample(jax.random.key(1), (200, 4, 4), jnp.complex128))
    inner = np.real(np.sum(np.conj(a - proj)[None] * members, axis=(-2, -1)))
    assert np.max(np.abs(inner)) < 1e-12
    # ... so no member (here 200 random ones near the projection) is nearer.
    near = proj[None] + 0.1 * members
    assert np.min(np.linalg.norm(a[None] - near, axis=(-2, -1))) > dist


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_one_triangle_and_half_of_the_diagonal_are_learned(family):
    p, _, sign, _ = FAMILIES[family]
    node = px.tensor.register(_cn((4, 4)), p)
    c = _cn((4, 4), seed=2)

    def loss(o):
        return jnp.real(jnp.sum(px.tensor.materialize(node.replace(originals=(o,))) * c))

    g = np.asarray(jax.jit(jax.grad(loss))(node.original))
    np.testing.assert_array_equal(np.triu(g, 1), 0.0)
    d = np.diagonal(g)
    # Hermitian learns the real part of the diagonal, skew-Hermitian the imaginary part.
    np.testing.assert_array_equal(d.imag if sign == 1 else d.real, 0.0)
    assert np.min(np.abs(d)) > 0 and np.min(np.abs(g[np.tril_indices(4, -1)])) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_real_dtypes_give_the_symmetric_and_skew_parametrizations(family, dtype):
    p, _, _, real = FAMILIES[family]
    a = jax.random.normal(jax.random.key(0), (3, 4, 4), jnp.float32).astype(dtype)

    @jax.jit
    def both(a):
        return [(q.forward(q.right_inverse(a)), q.forward(a)) for q in (p, real)]

    (ours, ours_raw), (theirs, theirs_raw) = both(a)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours_raw, theirs_raw)
    if dtype == jnp.float64:
        key = jax.random.key(4)
        np.testing.assert_array_equal(p.sample(key, (4, 4), dtype), real.sample(key, (4, 4), dtype))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stacks_vmap_and_bad_tensors(family):
    _, register, sign, _ = FAMILIES[family]
    stack = _cn((5, 3, 3), jnp.complex64)
    node = register({"k": stack}, "k", batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    w = jax.jit(jax.vmap(px.tensor.materialize))(node)
    np.testing.assert_allclose(w, _part(stack, sign), atol=1e-6)
    with pytest.raises(ValueError, match=r"square.*fc/kernel"):
        register({"fc": {"kernel": jnp.ones((3, 4), jnp.complex64)}}, "fc/kernel")
    with pytest.raises(TypeError, match="floating-point"):
        register({"w": jnp.ones((3, 3), jnp.int32)}, "w")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_samples_are_the_gaussian_unitary_ensemble(family):
    p, _, sign, _ = FAMILIES[family]
    h = np.asarray(p.sample(jax.random.key(0), (4000, 3, 3), jnp.complex128))
    np.testing.assert_array_equal(h, sign * _npH(h))
    if sign == -1:
        h = -1j * h  # i times the GUE
    diag = h[:, np.arange(3), np.arange(3)].ravel()  # 12,000 real N(0, 1)
    assert np.max(np.abs(diag.imag)) == 0.0
    assert abs(np.var(diag.real) - 1) < 0.05 and abs(np.mean(diag.real)) < 0.05
    off = h[:, 0, 1:].ravel()  # 8,000 draws: real and imaginary parts N(0, 1/2) each
    for part in (off.real, off.imag):
        assert abs(np.var(part) - 0.5) < 0.025 and abs(np.mean(part)) < 0.04
    assert abs(np.corrcoef(off.real, off.imag)[0, 1]) < 0.06
    # Unitarily invariant: U H Uᴴ has the same entry variances for a fixed unitary U.
    u = np.asarray(Orthogonal().sample(jax.random.key(9), (3, 3), jnp.complex128))
    r = u[None] @ h @ _npH(u)[None]
    assert abs(np.var(r[:, 0, 0].real) - 1) < 0.1 and abs(np.var(r[:, 1, 0].imag) - 0.5) < 0.05
    # E tr(H²) = n² for the GUE with density ∝ exp(−tr(H²)/2).
    assert abs(np.mean(np.real(np.trace(h @ h, axis1=-2, axis2=-1))) - 9) < 0.3


@pytest.mark.parametrize("cls", [Hermitian, SkewHermitian])
def test_nnx_functions_come_from_the_declarations(cls):
    fn = torch_function(cls)
    params = list(inspect.signature(fn).parameters)
    assert params[:2] == ["module", "name"] and "batch_axes" in params
    assert fn.__name__ == cls.torch_function
    sign = 1 if cls is Hermitian else -1
    layer = fn(nnx.Linear(3, 3, param_dtype=jnp.complex64, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(layer.kernel, sign * _npH(layer.kernel))
    new = _cn((3, 3), jnp.complex64, seed=3)
    layer.kernel = new
    np.testing.assert_allclose(layer.kernel, _part(new, sign), atol=1e-6)


def test_options_are_validated():
    with pytest.raises(TypeError, match="lower must be True or False"):
        SkewHermitian(lower=1)
    with pytest.raises(TypeError, match="name must be a str"):
        Hermitian(name=3)
    lower, upper = SkewHermitian(True), SkewHermitian(False)
    a = _cn((4, 4))
    np.testing.assert_array_equal(jnp.triu(lower.right_inverse(a), 1), 0)
    np.testing.assert_array_equal(jnp.tril(upper.right_inverse(a), -1), 0)
    np.testing.assert_allclose(upper.forward(upper.right_inverse(a)), _part(a, -1), atol=1e-15)


def test_the_defaults_are_unchanged_symmetric_and_skew_use_the_plain_transpose():
    a = np.asarray(_cn((3, 3), jnp.complex64))
    sym = np.asarray(Symmetric().forward(Symmetric().right_inverse(a)))
    skw = np.asarray(Skew().forward(Skew().right_inverse(a)))
    np.testing.assert_array_equal(sym, sym.T)
    np.testing.assert_array_equal(skw, -skw.T)
    assert np.max(np.abs(sym - _npH(sym))) > 0.1  # complex symmetric, not Hermitian
