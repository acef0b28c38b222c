"""AlmostOrthogonal / almost_orthogonal: singular values in [1 - lam, 1 + lam] (geotorch's)."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from catalogue import adam_fit, random_quadratic
from flax import nnx

import paramx as px
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal, almost_orthogonal

LAM = 0.5
P = AlmostOrthogonal(LAM)
SHAPE = (4, 4)  # square: U's and V's exponentials run as one stacked call
K = 4


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _sv(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# Eagerly, every call retraces the exponential's loops: compile the maps once.
_materialize = jax.jit(px.tensor.materialize)


@functools.partial(jax.jit, static_argnums=0)
def _nearest(p, x):
    return p.nearest(x)


@functools.partial(jax.jit, static_argnums=0)
def _distance(p, x):
    return p.distance(x)


# Training: tests/catalogue.py's one compiled Adam program (the bases stay state).
_fit = adam_fit


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_stays_in_the_set_and_fits_a_sampled_target(dtype):
    n = max(SHAPE)
    eps = float(jnp.finfo(dtype).eps)
    # Quality: 1,000 Adam steps (lr 1e-2) on a random quadratic loss, from a random kernel.
    target, q = random_quadratic(jax.random.key(2), SHAPE, dtype)
    w, loss = _fit(P, _normal(SHAPE, 1, dtype), target, q)
    assert w.dtype == dtype and bool(jnp.isfinite(loss))
    assert bool(P.in_manifold(w, atol=10 * n * eps)), _sv(w)
    # Fitting power: a target drawn from `sample`, from another point of the set in the same
    # component (a square value keeps the sign of its determinant). The steps are an argument of
    # the compiled program: 3,000 at lr 1e-2 (1,000 reach 4e-3 to 3e-4 here).
    if dtype == jnp.float64:
        target = P.sample(jax.random.key(3), SHAPE, dtype)
        x0 = P.sample(jax.random.key(4), SHAPE, dtype)
        x0 = x0.at[:, 0].multiply(jnp.sign(jnp.linalg.det(x0) * jnp.linalg.det(target)))
        _, loss = _fit(P, x0, target, steps=3000)
        assert float(loss) <= 1e-4, float(loss)


# ----- registration, exactness, projection -------------------------------------------------------
# Compiling the exponential dominates this file's time: the tests share a few (parametrization,
# shape, dtype) programs, mostly P on one (4, 4) float64 kernel.


def test_registration_is_exact_on_the_set_for_stacks_wide_and_square_kernels():
    x = P.sample(jax.random.key(0), SHAPE, jnp.float64)
    assert bool(P.in_manifold(x))
    np.testing.assert_allclose(_materialize(px.tensor.register(x, P)), x, atol=1e-13)
    # a stack of two tall kernels registered with batch_axes=1, and a wide one
    for shape, axes in (((2, 5, 3), 1), ((3, 5), 0)):
        x = P.sample(jax.random.key(1), shape, jnp.float64)
        node = px.tensor.register(x, P, batch_axes=axes)
        np.testing.assert_allclose(_materialize(node), x, atol=1e-13)
        # at the chart's centre the original holds s on its (tall) diagonal, zeros elsewhere
        t = node.original if shape[-2] > shape[-1] else jnp.swapaxes(node.original, -1, -2)
        k = min(shape[-2:])
        np.testing.assert_array_equal(t.at[..., jnp.arange(k), jnp.arange(k)].set(0.0), 0.0)


@pytest.mark.parametrize("f", ["sin", "tanh", "scaled_sigmoid"])
def test_each_f_is_inverted_exactly(f):
    # right_inverse's diagonal s gives back the singular values through 1 + lam·f(s) (the
    # forward's formula; the orthogonal factors are checked above, for every f alike).
    p = AlmostOrthogonal(LAM, f)
    x = p.sample(jax.random.key(0), (2, *SHAPE), jnp.float64)
    orig, state = p.right_inverse(x, params=None, state=None)
    fn = p._functions()[0]
    sigma = 1 + LAM * fn(jnp.diagonal(orig, axis1=-2, axis2=-1))
    np.testing.assert_allclose(jnp.sort(sigma, -1)[..., ::-1], _sv(x), atol=1e-14)
    u = state["base_u"][..., :K] * sigma[..., None, :]
    tall = u @ jnp.swapaxes(state["base_v"], -1, -2)  # a square kernel is read transposed
    np.testing.assert_allclose(jnp.swapaxes(tall, -1, -2), x, atol=1e-13)
    if f == "scaled_sigmoid":  # 2·sigmoid - 1, computed as tanh(x/2)
        t = jnp.linspace(-30, 30, 101)
        np.testing.assert_allclose(fn(t), 2 * jax.nn.sigmoid(t) - 1, atol=1e-15)


def test_projection_is_the_nearest_point():
    x = 1.3 * _normal((200, *SHAPE), seed=2)
    near = _nearest(P, x)
    assert bool(jnp.all(P.in_manifold(near)))
    d_near = jnp.linalg.norm(x - near, axis=(-2, -1))
    np.testing.assert_allclose(_distance(P, x), d_near, rtol=1e-10, atol=1e-14)
    # No random point of the set (1,000 per matrix) is closer ...
    pts = P.sample(jax.random.key(3), (1000, *SHAPE), jnp.float64)
    d_rand = jnp.linalg.norm(x[:, None] - pts[None], axis=(-2, -1))
    assert bool(jnp.all(d_rand >= d_near[:, None] - 1e-12))
    # ... nor any point of the set near the projection (a local check in every direction).
    moved = _nearest(P, near[:, None] + 1e-3 * _normal((200, 50, *SHAPE), seed=4))
    d_moved = jnp.linalg.norm(x[:, None] - moved, axis=(-2, -1))
    assert bool(jnp.all(d_moved >= d_near[:, None] - 1e-12))
    # Registration realises it: the singular values are clipped (to lam·eps at the end points).
    for i in range(3):
        w = _materialize(px.tensor.register(x[i], P))
        np.testing.assert_allclose(w, near[i], atol=1e-12)


def test_end_points_are_moved_inside_by_lam_eps():
    x = jnp.diag(jnp.array([1 + LAM, 1 - LAM, 1.0, 1.0]))  # both end points, exactly
    eps = float(jnp.finfo(jnp.float64).eps)
    for f in ("tanh", "scaled_sigmoid"):
        p = AlmostOrthogonal(LAM, f)
        orig, _ = p.right_inverse(x, params=None, state=None)
        s = jnp.diagonal(orig)
        assert bool(jnp.all(jnp.isfinite(s))) and float(jnp.max(jnp.abs(s))) > 18
    node = px.tensor.register(x, AlmostOrthogonal(LAM, "tanh"))
    w = _materialize(node)
    np.testing.assert_allclose(_sv(w), [1 + LAM, 1.0, 1.0, 1 - LAM], atol=4 * eps)
    assert bool(P.in_manifold(w))
    # sin: the coordinate is not left at sin's critical point pi/2, so it still learns.
    node = px.tensor.register(x, P)
    assert 0 < np.pi / 2 - float(node.original[0, 0]) < 1e-7
    g = _grad_of_sum(node)
    assert abs(float(g[0, 0])) > 1e-12  # cos(pi/2) would give about 1e-17


@jax.jit
def _grad_of_sum(node):
    target = _normal(SHAPE, seed=6)
    return jax.grad(lambda o: jnp.sum(_materialize(node.replace(originals=(o,))) * target))(
        node.original
    )


def test_lam_zero_is_orthogonal_and_lam_one_accepts_rank_deficient_values():
    x = _normal(SHAPE, seed=5)
    p0 = AlmostOrthogonal(0.0)
    orig, state = p0.right_inverse(x, params=None, state=None)
    np.testing.assert_array_equal(orig, 0.0)
    polar = (state["base_u"][:, :K] @ state["base_v"].T).T  # a square kernel is read transposed
    np.testing.assert_allclose(polar, _nearest(p0, x), atol=1e-13)
    np.testing.assert_allclose(polar.T @ polar, jnp.eye(K), atol=1e-13)
    z = jnp.zeros(SHAPE, jnp.float64).at[0, 0].set(3.0)
    p1 = AlmostOrthogonal(1)
    p1.check_value(z)  # no error: 0 is in [1 - lam, 1 + lam]
    orig, state = p1.right_inverse(z, params=None, state=None)
    sigma = 1 + jnp.sin(jnp.diagonal(orig))
    np.testing.assert_allclose(sigma, [2.0, 0.0, 0.0, 0.0], atol=1e-7)  # the ends, inside by eps


# ----- errors ------------------------------------------------------------------------------------


def test_bad_tensors_and_values_are_refused_with_the_path():
    with pytest.raises(ValueError, match=r"matrix.*\(at fc/kernel\)"):
        almost_orthogonal({"fc": {"kernel": jnp.ones(3)}}, "fc/kernel", 0.5)
    with pytest.raises(ValueError, match=r"rank deficient.*\(at fc/kernel\)"):
        almost_orthogonal({"fc": {"kernel": jnp.zeros((4, 3))}}, "fc/kernel", 0.5)
    with pytest.raises(ValueError, match=r"f_inverse.*\(at fc/kernel\)"):
        almost_orthogonal({"fc": {"kernel": jnp.eye(3)}}, "fc/kernel", 0.5, f=jnp.tanh)
    with pytest.raises(TypeError, match="floating-point"):
        almost_orthogonal({"w": jnp.ones((3, 3), jnp.int32)}, "w", 0.5)
    with pytest.raises(TypeError, match="complex"):
        almost_orthogonal({"w": jnp.eye(3, dtype=jnp.complex64)}, "w", 0.5)
    tree = almost_orthogonal({"w": jnp.eye(3)}, "w", 0.5)
    with pytest.raises(ValueError, match="shape"):
        px.assign(tree, "w", jnp.eye(4))
    with pytest.raises(ValueError, match="rank deficient"):
        px.assign(tree, "w", jnp.zeros((3, 3)))
    # Under jit the check cannot run: one of the nearest points is used.
    _, state = jax.jit(lambda v: P.right_inverse(v, params=None, state=None))(jnp.zeros((3, 3)))
    np.testing.assert_allclose(state["base_u"].T @ state["base_u"], jnp.eye(3), atol=1e-6)


def test_options_are_validated():
    for lam in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            AlmostOrthogonal(lam)
    for lam in (True, "0.5", jnp.asarray(0.5)):
        with pytest.raises(TypeError, match="real number"):
            AlmostOrthogonal(lam)
    with pytest.raises(ValueError, match='"sin", "tanh", "scaled_sigmoid"'):
        AlmostOrthogonal(0.5, "cos")
    with pytest.raises(TypeError, match="pair of callables"):
        AlmostOrthogonal(0.5, (jnp.sin,))
    with pytest.raises(TypeError, match="callable"):
        AlmostOrthogonal(0.5, 3)
    with pytest.raises(ValueError, match="triv"):
        AlmostOrthogonal(0.5, triv="qr")
    assert AlmostOrthogonal(1).lam == 1.0 and isinstance(AlmostOrthogonal(1).lam, float)
    # a pair (f, f_inverse) inverts like the name; a lone callable has no inverse
    x = P.sample(jax.random.key(0), SHAPE, jnp.float64)
    pair = AlmostOrthogonal(0.5, (jnp.tanh, jnp.arctanh))
    np.testing.assert_allclose(
        pair.right_inverse(x, params=None, state=None)[0],
        AlmostOrthogonal(0.5, "tanh").right_inverse(x, params=None, state=None)[0],
    )
    with pytest.raises(ValueError, match="f_inverse"):
        AlmostOrthogonal(0.5, jnp.tanh).right_inverse(x, params=None, state=None)


# ----- dtypes, batches, transformations ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16])  # float32: the training and NNX tests
def test_dtypes_and_conv_kernels(dtype):
    k = _normal((2, 2, *SHAPE), dtype=jnp.float32).astype(dtype)  # a conv kernel: one per tap
    tree = almost_orthogonal({"k": k}, "k", LAM)
    assert tree["k"].state["0"]["base_u"].dtype == jnp.float32
    w = jax.jit(px.materialize)(tree)["k"]
    assert w.dtype == dtype and w.shape == k.shape
    assert bool(jnp.all(P.in_manifold(w)))
    near = P.nearest(k.astype(jnp.float32))
    np.testing.assert_allclose(
        np.asarray(w, np.float64), near, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5
    )


def test_grad_reaches_every_coordinate():
    node = px.tensor.register(_normal(SHAPE), P)
    node = node.replace(originals=(node.original + 0.1 * _normal(SHAPE, seed=1),))
    g = _grad_of_sum(node)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.min(jnp.abs(g))) > 0  # all nk of them


def test_update_base_keeps_the_value_and_s():
    node = px.tensor.register(_normal(SHAPE, seed=8), P)
    moved = node.replace(originals=(node.original + 0.3 * _normal(SHAPE, seed=9),))
    before = _materialize(moved)
    after = jax.jit(px.update_base)({"w": moved})["w"]
    np.testing.assert_allclose(_materialize(after), before, atol=1e-13)
    np.testing.assert_array_equal(jnp.diagonal(after.original), jnp.diagonal(moved.original))
    np.testing.assert_array_equal(after.original.at[jnp.arange(K), jnp.arange(K)].set(0.0), 0.0)


def test_in_manifold_and_distance():
    x = jnp.diag(jnp.array([2.0, 0.9, 0.25]))
    np.testing.assert_allclose(P.distance(x), np.hypot(0.5, 0.25), rtol=1e-12)
    assert not bool(P.in_manifold(x)) and bool(P.in_manifold(x, atol=0.6))
    s = P.sample(jax.random.key(0), (3, 4, 6), jnp.float64)
    np.testing.assert_array_equal(P.in_manifold(s), [True] * 3)
    np.testing.assert_allclose(P.distance(s), 0.0, atol=1e-15)
    assert not bool(P.in_manifold(1.6 * jnp.eye(3)))


# ----- sampling ---------------------------------------------------------------------------------


def _uniform_like(sv, lam):
    """Singular values i.i.d. uniform on [1 - lam, 1 + lam]: mean 1, variance lam²/3, a quarter
    below 1 - lam/2 (to about 5 standard errors of 6,000 values)."""
    return (
        abs(float(np.mean(sv)) - 1) < 0.02
        and abs(float(np.var(sv)) - lam**2 / 3) < 0.01
        and abs(float(np.mean(sv < 1 - lam / 2)) - 0.25) < 0.03
    )


def test_sample_distribution():
    n, k, draws = 4, 3, 2000
    x = P.sample(jax.random.key(0), (draws, n, k), jnp.float64)
    sv = _sv(x)
    assert sv.min() >= 1 - LAM and sv.max() <= 1 + LAM
    assert _uniform_like(sv, LAM)
    # rotation invariance: E[X] = 0 and E[X_ij²] = E[σ²]/n for each entry
    second = (1 + LAM**2 / 3) / n
    assert float(jnp.max(jnp.abs(jnp.mean(x, 0)))) < 0.05
    assert float(jnp.max(jnp.abs(jnp.mean(x**2, 0) - second))) < 0.05
    # the test can fail: f applied to normal coordinates is not uniform
    g = 1 + LAM * np.sin(np.asarray(_normal((draws * k,), seed=1)))
    assert not _uniform_like(g, LAM)
    # geotorch's distribution: a Haar orthogonal matrix, every singular value 1
    o = P.sample(jax.random.key(1), (5, 3, 5), jnp.float64, "orthogonal")
    np.testing.assert_allclose(_sv(o), 1.0, atol=1e-13)
    for dtype in (jnp.float32, jnp.bfloat16):
        s = P.sample(jax.random.key(2), (2, 3, 5), dtype)
        assert s.dtype == dtype and s.shape == (2, 3, 5) and bool(jnp.all(P.in_manifold(s)))
    with pytest.raises(ValueError, match="distribution"):
        P.sample(jax.random.key(0), (3, 3), jnp.float32, "gaussian")
    assert bool(P.in_manifold(px.sampler(P)(jax.random.key(3), (3, 3))))


# ----- paramx.nnx -------------------------------------------------------------------------------


def test_nnx_function_from_the_declarations():
    f = torch_function(AlmostOrthogonal)
    assert f.__name__ == "almost_orthogonal"
    assert str(inspect.signature(f)).startswith("(module")
    layer = f(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), lam=0.1)
    assert bool(AlmostOrthogonal(0.1).in_manifold(layer.kernel))
    layer.kernel = 3 * _normal((3, 5), seed=9, dtype=jnp.float32)
    assert bool(AlmostOrthogonal(0.1).in_manifold(layer.kernel))
