"""Invertible / invertible (GL⁺(n), geotorch's GLp), SpecialLinear / sln (SL(n), geotorch's SL)."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from catalogue import adam_fit, random_quadratic
from flax import nnx
from scipy import stats

import paramx as px
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.general_linear import (
    Invertible,
    SpecialLinear,
    invertible,
    sln,
)

GL = Invertible()
SL = SpecialLinear()
N = 4


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _det(x):
    return np.linalg.det(np.asarray(x, np.float64))


# Eagerly, every call retraces the exponential's loops: compile the maps once.
_materialize = jax.jit(px.materialize)


@functools.partial(jax.jit, static_argnums=0)
def _forward(p, x, base):
    return p.forward(x, params=None, state={"base": base})


@functools.partial(jax.jit, static_argnums=0)
def _distance(p, x):
    return p.distance(x)


# Training: tests/catalogue.py's one compiled Adam program (the bases stay state).
_fit = adam_fit


@pytest.mark.parametrize("p", [GL, SL], ids=["GL+", "SL"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_stays_in_the_set_and_fits_a_sampled_target(p, dtype):
    eps = float(jnp.finfo(dtype).eps)
    x0 = p.sample(jax.random.key(1), (N, N), dtype)
    # Quality: 1,000 Adam steps (lr 1e-2) on a random quadratic loss.
    target, q = random_quadratic(jax.random.key(2), (N, N), dtype)
    w, loss = _fit(p, x0, target, q)
    assert w.dtype == dtype and bool(jnp.isfinite(loss))
    d = _det(w)
    if isinstance(p, SpecialLinear):
        assert abs(d - 1) <= 10 * N * eps, d
    else:
        assert d > 0 and bool(p.in_manifold(w))
    # Fitting power: the map is onto the set, so a target drawn from `sample` is reached from
    # the chart's centre, the identity (a plain I @ expm(X) cannot reach every such target).
    # The steps are an argument of the compiled program: 3,000 of them at lr 1e-2 (1,000 reach
    # 1e-2 to 1e-5). A badly conditioned base, or a target behind a critical point of the
    # rotation factor's exponential, converges slower: re-centring with update_base helps there.
    target = p.sample(jax.random.key(3), (N, N), dtype)
    _, loss = _fit(p, jnp.eye(N, dtype=dtype), target, steps=3000)
    assert float(loss) <= 1e-4, float(loss)


def test_plain_expm_cannot_reach_what_the_polar_chart_reaches():
    # diag(-1, -2, 1, 1) has det 2 > 0 but no real logarithm (two distinct negative
    # eigenvalues): base @ expm(X) with base = I misses it. The chart expm(A) expm(S) reaches it
    # exactly: A a rotation by pi in the first plane, S = diag(0, log 2, 0, 0).
    target = jnp.diag(jnp.array([-1.0, -2.0, 1.0, 1.0], jnp.float64))
    x = jnp.zeros((N, N), jnp.float64).at[1, 0].set(np.pi).at[1, 1].set(np.log(2.0))
    np.testing.assert_allclose(_forward(GL, x, jnp.eye(N, dtype=jnp.float64)), target, atol=1e-14)


# ----- registration, exactness, update_base ------------------------------------------------------


@pytest.mark.parametrize("p", [GL, SL], ids=["GL+", "SL"])
def test_registration_is_exact_and_update_base_keeps_the_value(p):
    x = p.sample(jax.random.key(5), (N, N), jnp.float64)
    tree = px.register_parametrization({"fc": {"kernel": x}}, "fc/kernel", p)
    node = tree["fc"]["kernel"]
    np.testing.assert_array_equal(node.state["0"]["base"], x)
    np.testing.assert_array_equal(node.original, 0.0)
    np.testing.assert_allclose(_materialize(tree)["fc"]["kernel"], x, atol=1e-15)
    # Move the original, then re-centre: the value is kept, the original is back at 0.
    moved = _normal((N, N), seed=6) * 0.3
    before = _forward(p, moved, x)
    orig, state = jax.jit(p.update_base)(moved, params=None, state={"base": x})
    np.testing.assert_array_equal(orig, 0.0)
    after = _forward(p, orig, state["base"])
    np.testing.assert_allclose(after, before, atol=1e-13, rtol=1e-13)
    if isinstance(p, SpecialLinear):
        np.testing.assert_allclose(_det(state["base"]), 1.0, atol=1e-14)
    # Assignment is exact too.
    y = p.sample(jax.random.key(7), (N, N), jnp.float64)
    tree = px.assign(tree, "fc/kernel", y)
    np.testing.assert_allclose(_materialize(tree)["fc"]["kernel"], y, atol=1e-15)


def test_value_and_gradient_against_independent_references():
    # The symmetric factor runs linalg.expm_skew (whose scaling relies only on normality) and
    # its hand-written VJP: the value against SciPy's expm, the gradient against central
    # differences of the compiled forward.
    base = GL.sample(jax.random.key(9), (N, N), jnp.float64)
    x = _normal((N, N), seed=10) * 0.7
    c = _normal((N, N), seed=11)
    v = _normal((N, N), seed=12)
    low, up = np.tril(np.asarray(x), -1), np.triu(np.asarray(x), 1)
    sym = up + up.T + np.diag(np.diag(np.asarray(x)))
    for p in (GL, SL):
        s = sym - np.trace(sym) / N * np.eye(N) if p is SL else sym
        want = np.asarray(base) @ scipy.linalg.expm(low - low.T) @ scipy.linalg.expm(s)
        np.testing.assert_allclose(_forward(p, x, base), want, rtol=1e-12, atol=1e-13)
        loss = lambda x, p=p: jnp.sum(_forward(p, x, base) * c)
        value_and_grad = jax.jit(jax.value_and_grad(loss))
        h = 1e-5
        fd = jnp.sum((_forward(p, x + h * v, base) - _forward(p, x - h * v, base)) * c) / (2 * h)
        np.testing.assert_allclose(jnp.sum(value_and_grad(x)[1] * v), fd, rtol=1e-8)
        # At X = 0 the derivative is dX -> base (dA + dS): each entry of X moves the value in
        # its own direction (onto all n x n matrices; for SL all but the trace of S, onto the
        # tangent space of SL(n)). With M = baseᵀ c, the gradient is M - Mᵀ below the diagonal,
        # M + Mᵀ above, diag(M) on it (minus its mean for SL).
        m = np.asarray(base.T @ c)
        want = np.tril(m - m.T, -1) + np.triu(m + m.T, 1) + np.diag(np.diag(m))
        if p is SL:
            want -= np.diag(np.full(N, np.trace(m) / N))
        np.testing.assert_allclose(value_and_grad(jnp.zeros((N, N)))[1], want, atol=1e-12)


# ----- off the set: errors naming the path -------------------------------------------------------


def test_invertible_refuses_det_not_positive_naming_the_path():
    bad = jnp.diag(jnp.array([1.0, 2.0, -3.0]))
    with pytest.raises(ValueError, match="fc/kernel") as err:
        invertible({"fc": {"kernel": bad}}, "fc/kernel")
    assert "determinant of -6" in str(err.value) and "multiply(-1)" in str(err.value)
    singular = jnp.array([[1.0, 2.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="fc/kernel.*singular|singular.*fc/kernel|GL⁺"):
        invertible({"fc": {"kernel": singular}}, "fc/kernel")
    # In a batch, the offending matrix is named; assignment checks too.
    stack = GL.sample(jax.random.key(12), (3, 3, 3)).at[1, 0].multiply(-1)
    with pytest.raises(ValueError, match=r"matrix \(1,\)"):
        invertible({"w": stack}, "w")
    tree = invertible({"fc": {"kernel": stack.at[1, 0].multiply(-1)}}, "fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel"):
        px.assign(tree, "fc/kernel", stack)


def test_sln_refuses_det_not_one_naming_the_path_and_the_fix():
    x = GL.sample(jax.random.key(13), (3, 3), jnp.float64) * 2
    with pytest.raises(ValueError, match="fc/kernel") as err:
        sln({"fc": {"kernel": x}}, "fc/kernel")
    assert "1 / n" in str(err.value)
    # The suggested fix gives a value that registers.
    fixed = x / jnp.linalg.det(x) ** (1 / 3)
    tree = sln({"fc": {"kernel": fixed}}, "fc/kernel")
    np.testing.assert_allclose(_materialize(tree)["fc"]["kernel"], fixed, atol=1e-15)
    with pytest.raises(ValueError, match="Negate one row"):
        sln({"w": -fixed}, "w")


def test_under_jit_a_value_off_the_set_reads_nan():
    # The check needs concrete values; inside a user's jit the base is poisoned instead.
    reg = jax.jit(lambda x: px.materialize(invertible({"w": x}, "w"))["w"])
    assert bool(jnp.all(jnp.isnan(reg(-jnp.eye(3)))))
    np.testing.assert_allclose(reg(2 * jnp.eye(3)), 2 * jnp.eye(3))
    reg_sl = jax.jit(lambda x: px.materialize(sln({"w": x}, "w"))["w"])
    assert bool(jnp.all(jnp.isnan(reg_sl(2 * jnp.eye(3)))))
    np.testing.assert_allclose(reg_sl(jnp.eye(3)), jnp.eye(3))


@pytest.mark.parametrize("p", [GL, SL], ids=["GL+", "SL"])
def test_shapes_and_dtypes_refused(p):
    with pytest.raises(ValueError, match="square"):
        px.register_parametrization({"w": jnp.ones((3, 4))}, "w", p)
    with pytest.raises(ValueError, match="square"):
        px.register_parametrization({"w": jnp.ones((3,))}, "w", p)
    for dtype in (jnp.int32, jnp.bool_):
        with pytest.raises(TypeError, match="float"):
            px.register_parametrization({"w": jnp.eye(3, dtype=dtype)}, "w", p)
    with pytest.raises(TypeError, match="complex"):
        px.register_parametrization({"w": jnp.eye(3, dtype=jnp.complex64)}, "w", p)
    with pytest.raises(TypeError, match="name"):
        type(p)(name=3)


# ----- membership and distance -------------------------------------------------------------------


def test_invertible_membership_and_distance():
    x = _normal((500, 3, 3), seed=14)
    det = _det(x)
    np.testing.assert_array_equal(GL.in_manifold(x), det > 0)
    s = np.linalg.svd(np.asarray(x), compute_uv=False)
    np.testing.assert_allclose(_distance(GL, x), np.where(det > 0, 0.0, s[:, -1]), atol=1e-15)
    # The distance is attained in the closure: the nearest singular matrix (drop the smallest
    # singular value) has det 0, and moving past it by any margin lands in GL⁺.
    u, sv, vt = np.linalg.svd(np.asarray(x[det < 0][:5]))
    flip = u @ np.diag([1.0, 1.0, -1.0]) if False else None
    del flip
    for ui, si, vi in zip(u, sv, vt):
        y = ui @ np.diag([si[0], si[1], 1e-6 * np.sign(np.linalg.det(ui @ vi))]) @ vi
        assert bool(GL.in_manifold(jnp.asarray(y), atol=0.0))
        np.testing.assert_allclose(np.linalg.norm(ui @ np.diag(si) @ vi - y), si[2], atol=2e-6)
    # A numerically singular matrix is out; a tolerance can be given.
    near = jnp.array([[1.0, 0.0], [0.0, 1e-9]], jnp.float32)
    assert not bool(GL.in_manifold(near)) and bool(GL.in_manifold(near, atol=0.0))


def test_sln_membership_and_distance_against_a_brute_force_fit():
    y = SL.sample(jax.random.key(15), (100, 3, 3), jnp.float64)
    assert bool(jnp.all(SL.in_manifold(y)))
    np.testing.assert_allclose(_distance(SL, y), 0.0, atol=1e-6)
    assert not bool(jnp.any(SL.in_manifold(y * 1.001)))
    # det <= 1 (negative included): the distance is the nearest point's. Fit each target with
    # the parametrization itself (Adam from several starts): none gets closer, and the best
    # gets as close (to the optimizer's accuracy).
    x = _normal((N, N), seed=16, dtype=jnp.float32) * 0.5
    wide = jnp.diag(jnp.array([3.0, 2.5, 2.0, -1.5], jnp.float32))  # det < 0, σₙ > 1
    for target in (x, x.at[0].multiply(-1), wide):
        d = float(_distance(SL, target))
        assert _det(target) < 1 and d > 0.1
        best = []
        for seed in range(3):
            x0 = (
                jnp.eye(N, dtype=jnp.float32)
                if seed == 0
                else SL.sample(jax.random.key(20 + seed), (N, N), jnp.float32)
            )
            w, _ = _fit(SL, x0, target, jnp.eye(N * N, dtype=jnp.float32), steps=3000)
            assert abs(_det(w) - 1) < 1e-4
            best.append(float(jnp.linalg.norm(w - target)))
        assert min(best) >= d * (1 - 1e-4), (best, d)
        assert min(best) <= d * (1 + 1e-3), (best, d)
    # det > 1: an upper bound, the distance to x / det^(1/n), a point of SL(n).
    big = 3 * SL.sample(jax.random.key(17), (3, 3), jnp.float64)
    np.testing.assert_allclose(_distance(SL, big), jnp.linalg.norm(big - big / 3), rtol=1e-12)


# ----- sampling ----------------------------------------------------------------------------------


def test_invertible_sample_is_the_gaussian_restricted_to_gl_plus():
    x = np.asarray(GL.sample(jax.random.key(18), (4000, 3, 3), jnp.float64))
    assert np.all(np.linalg.det(x) > 0)
    # Every entry N(0, 1/3): the row flip keeps the Gaussian law (the first row included).
    for i, j in ((0, 0), (0, 2), (1, 1), (2, 0)):
        e = x[:, i, j]
        assert stats.kstest(e * np.sqrt(3), "norm").pvalue > 1e-3, (i, j)
    # Conditioning on det > 0 leaves |det| with the law of |det| of a Gaussian matrix.
    g = np.asarray(_normal((4000, 3, 3), seed=19)) / np.sqrt(3)
    assert stats.ks_2samp(np.linalg.det(x), np.abs(np.linalg.det(g))).pvalue > 1e-3


def test_sln_sample_is_rotation_invariant_with_det_one():
    y = np.asarray(SL.sample(jax.random.key(20), (4000, 3, 3), jnp.float64))
    np.testing.assert_allclose(np.linalg.det(y), 1.0, atol=1e-10)
    # Invariant under Y -> R Y for a rotation R: the law of an entry is the law of a rotated one.
    r = np.asarray(SL.sample(jax.random.key(21), (3, 3), jnp.float64))
    r = np.linalg.qr(r)[0] * np.sign(np.linalg.det(np.linalg.qr(r)[0]))
    ry = r @ y[::-1]  # independent draws
    for i, j in ((0, 0), (1, 2), (2, 1)):
        assert stats.ks_2samp(y[:, i, j], ry[:, i, j]).pvalue > 1e-3
        assert stats.ks_2samp(y[:, i, j], y[:, 0, 1]).pvalue > 1e-3
    assert abs(np.median(y[:, 0, 0])) < 0.05
    # The singular values are the Gaussian's divided by their geometric mean.
    g = np.asarray(_normal((4000, 3, 3), seed=22))
    sg = np.linalg.svd(g, compute_uv=False)
    sg = sg / np.prod(sg, axis=-1, keepdims=True) ** (1 / 3)
    sy = np.linalg.svd(y, compute_uv=False)
    for k in range(3):
        assert stats.ks_2samp(sy[:, k], sg[:, k]).pvalue > 1e-3


# ----- dtypes, batches, transformations ----------------------------------------------------------


@pytest.mark.parametrize("p", [GL, SL], ids=["GL+", "SL"])
def test_bfloat16_batches_and_conv_kernels(p):
    dtype = jnp.bfloat16
    # A conv kernel (kh, kw, in, out) with in == out: one matrix per spatial tap.
    x = p.sample(jax.random.key(23), (2, 2, 3, 3), dtype)
    assert x.dtype == dtype and bool(jnp.all(p.in_manifold(x)))
    tree = px.register_parametrization({"conv": {"kernel": x}}, "conv/kernel", p)
    assert tree["conv"]["kernel"].state["0"]["base"].dtype == jnp.float32
    w = _materialize(tree)["conv"]["kernel"]
    assert w.dtype == dtype and w.shape == x.shape
    np.testing.assert_array_equal(np.asarray(w, np.float32), np.asarray(x, np.float32))
    assert p.in_manifold(x).shape == (2, 2)


def test_stacked_registration_under_vmap():
    # batch_axes=1: each matrix of the stack is registered and computed separately (vmap).
    x = SL.sample(jax.random.key(24), (3, N, N))
    tree = sln({"w": x}, "w", batch_axes=1)
    assert tree["w"].state["0"]["base"].shape == (3, N, N)
    np.testing.assert_allclose(_materialize(tree)["w"], x, atol=1e-6)
    with pytest.raises(ValueError, match="w"):
        sln({"w": x.at[1].multiply(2.0)}, "w", batch_axes=1)


# ----- paramx.nnx --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [GL, SL], ids=["GL+", "SL"])
def test_nnx_function(p):
    f = torch_function(type(p))
    assert f.__name__ == {"Invertible": "invertible", "SpecialLinear": "sln"}[type(p).__name__]
    assert str(inspect.signature(f)).startswith("(module")
    layer = nnx.Linear(N, N, rngs=nnx.Rngs(0))
    layer.kernel[...] = p.sample(jax.random.key(26), (N, N))
    layer = f(layer)
    assert bool(p.in_manifold(layer.kernel[...]))
    new = p.sample(jax.random.key(27), (N, N))
    layer.kernel = new
    np.testing.assert_allclose(layer.kernel[...], new, atol=1e-6)
    with pytest.raises(ValueError, match="kernel"):
        layer.kernel = new.at[0].multiply(-2.0) if isinstance(p, Invertible) else 2 * new
