"""Grassmannian / grassmannian: k-dimensional subspaces of Rⁿ held by orthonormal frames."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from catalogue import _loss, random_quadratic
from flax import nnx

import paramx as px
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.grassmannian import Grassmannian, grassmannian

G = Grassmannian()
SHAPE = (6, 3)
N, K = SHAPE


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _proj(q):
    return q @ jnp.swapaxes(q, -1, -2)


# Eagerly, every call retraces the exponential's loops: compile the maps once.
_materialize = jax.jit(px.tensor.materialize)


@functools.partial(jax.jit, static_argnums=0)
def _nearest(p, x):
    return p.nearest(x)


# ----- training: tests/catalogue.py's Adam program, on the originals only ------------------------
# catalogue.adam_fit differentiates the whole node, and the base is state (which paramx refuses to
# differentiate); and the map reaches every subspace, not every frame, so the fitting-power loss
# must depend on the subspace only. One program for both tests: a quadratic loss in the frame
# (q1, t1) plus one in its projector W Wᵀ (q2, t2); each test zeroes the other's q.


def _proj_hi(w):
    return jnp.matmul(w, w.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _run(node, t1, q1, t2, q2, lr, steps):
    opt = optax.adam(lr)

    def value(orig):
        return px.tensor.materialize(node.replace(originals=orig))

    def loss(w):
        return _loss(w, t1, q1) + _loss(_proj_hi(w), t2, q2)

    with jax.numpy_dtype_promotion("standard"):
        orig = node.originals
        state = opt.init(orig)

        def step(_, carry):
            o, s = carry
            g = jax.grad(lambda o: loss(value(o)))(o)
            upd, s = opt.update(g, s, o)
            return optax.apply_updates(o, upd), s

        orig, _ = jax.lax.fori_loop(0, steps, step, (orig, state))
    w = value(orig)
    return w, loss(w)


def _fit(x0, t1, q1, t2, q2, *, steps=1000, lr=1e-2):
    node = px.tensor.register(x0, G)
    return _run(node, t1, q1, t2, q2, jnp.asarray(lr, jnp.float32), jnp.asarray(steps, jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_stays_on_frames_and_fits_a_sampled_subspace(dtype):
    eps = float(jnp.finfo(dtype).eps)
    zeros1, zeros2 = jnp.zeros((N * K, N * K), dtype), jnp.zeros((N * N, N * N), dtype)
    # Quality: 1,000 Adam steps (lr 1e-2) on a random quadratic loss of the frame.
    t1, q1 = random_quadratic(jax.random.key(2), SHAPE, dtype)
    x0 = _normal(SHAPE, 1, dtype)
    w, loss = _fit(x0, t1, q1, jnp.zeros((N, N), dtype), zeros2)
    assert w.dtype == dtype and bool(jnp.isfinite(loss))
    assert bool(G.in_manifold(w, atol=10 * N * eps)), float(G.distance(w))
    # Fitting power: a subspace drawn from `sample`, on |W Wᵀ - T Tᵀ|² / |T Tᵀ|².
    if dtype == jnp.float64:
        target = G.sample(jax.random.key(3), SHAPE, dtype)
        p_t = _proj(target)
        scale = 1 / jnp.sqrt(jnp.sum(p_t**2))
        q2 = jnp.eye(N * N, dtype=dtype) * scale
        w, loss = _fit(x0, jnp.zeros(SHAPE, dtype), zeros1, p_t, q2)
        assert float(loss) <= 1e-4, float(loss)
        assert float(jnp.linalg.norm(w - target)) > 1e-2  # another frame of the same subspace


# ----- registration, exactness, projection -------------------------------------------------------


@pytest.mark.parametrize("shape", [SHAPE, (2, 3, 6), (3, 3)], ids=str)
def test_registration_keeps_a_frame_exactly(shape):
    # (2, 3, 6): a stack of two wide kernels (orthonormal rows), registered with batch_axes=1
    x = G.sample(jax.random.key(0), shape, jnp.float64)
    assert bool(jnp.all(G.in_manifold(x)))
    node = px.tensor.register(x, G, batch_axes=len(shape) - 2)
    np.testing.assert_array_equal(node.original, 0.0)
    tall = x if shape[-2] > shape[-1] else jnp.swapaxes(x, -1, -2)
    np.testing.assert_array_equal(node.state["0"]["base"][..., : min(shape[-2:])], tall)
    np.testing.assert_allclose(_materialize(node), x, atol=1e-14)
    if shape == (3, 3):  # Gr(3, 3) is one point: the original moves nothing
        moved = node.replace(originals=(_normal(shape, seed=1),))
        np.testing.assert_allclose(_materialize(moved), x, atol=1e-14)


def test_projection_is_the_nearest_frame_and_keeps_the_subspace():
    x = _normal((200, *SHAPE), seed=2)
    near = _nearest(G, x)
    assert bool(jnp.all(G.in_manifold(near)))
    d_near = jnp.linalg.norm(x - near, axis=(-2, -1))
    np.testing.assert_allclose(G.distance(x), d_near, rtol=1e-10)
    # the same subspace: the projector onto x's column space
    p_x = x @ jnp.linalg.pinv(x)
    np.testing.assert_allclose(_proj(near), p_x, atol=1e-12)
    # No random frame (1,000 per matrix) is closer ...
    frames = G.sample(jax.random.key(3), (1000, *SHAPE), jnp.float64)
    d_rand = jnp.linalg.norm(x[:, None] - frames[None], axis=(-2, -1))
    assert bool(jnp.all(d_rand >= d_near[:, None] - 1e-12))
    # ... nor any frame near it (a local check in every direction).
    moved = _nearest(G, near[:, None] + 1e-3 * _normal((200, 50, *SHAPE), seed=4))
    d_moved = jnp.linalg.norm(x[:, None] - moved, axis=(-2, -1))
    assert bool(jnp.all(d_moved >= d_near[:, None] - 1e-12))
    # Registration realises it.
    for i in range(3):
        np.testing.assert_allclose(_materialize(px.tensor.register(x[i], G)), near[i], atol=1e-13)


def test_bad_tensors_and_values_are_refused_with_the_path():
    with pytest.raises(ValueError, match=r"matrix.*\(at fc/kernel\)"):
        grassmannian({"fc": {"kernel": jnp.ones(3)}}, "fc/kernel")
    with pytest.raises(ValueError, match=r"rank deficient.*\(at fc/kernel\)"):
        grassmannian({"fc": {"kernel": jnp.zeros((5, 2))}}, "fc/kernel")
    rank_one = jnp.ones((5, 2))
    with pytest.raises(ValueError, match="rank deficient"):
        grassmannian({"w": rank_one}, "w")
    with pytest.raises(TypeError, match="floating-point"):
        grassmannian({"w": jnp.ones((3, 2), jnp.int32)}, "w")
    with pytest.raises(TypeError, match="complex"):
        grassmannian({"w": jnp.eye(3, 2, dtype=jnp.complex64)}, "w")
    tree = grassmannian({"w": jnp.eye(5, 2)}, "w")
    with pytest.raises(ValueError, match="shape"):
        px.assign(tree, "w", jnp.eye(6, 2))
    with pytest.raises(ValueError, match="rank deficient"):
        px.assign(tree, "w", rank_one)
    with pytest.raises(ValueError, match="triv"):
        Grassmannian("qr")
    with pytest.raises(TypeError, match="triv"):
        Grassmannian(3)
    with pytest.raises(TypeError, match="name"):
        Grassmannian(name=3)
    # Under jit the check cannot run: one of the nearest frames is used.
    _, state = jax.jit(lambda v: G.right_inverse(v, params=None, state=None))(rank_one)
    np.testing.assert_allclose(state["base"].T @ state["base"], jnp.eye(5), atol=1e-6)


# ----- dtypes, batches, transformations ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16])  # float32: the training and NNX tests
def test_dtypes_and_conv_kernels(dtype):
    k = _normal((2, 2, *SHAPE), dtype=jnp.float32).astype(dtype)  # a conv kernel: one per tap
    tree = grassmannian({"k": k}, "k")
    assert tree["k"].state["0"]["base"].dtype == jnp.float32
    w = jax.jit(px.materialize)(tree)["k"]
    assert w.dtype == dtype and w.shape == k.shape
    assert bool(jnp.all(G.in_manifold(w)))
    near = G.nearest(k.astype(jnp.float32))
    np.testing.assert_allclose(
        np.asarray(w, np.float64), near, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5
    )


@jax.jit
def _grad(node, target):
    return jax.grad(lambda o: jnp.sum(_materialize(node.replace(originals=(o,))) * target))(
        node.original
    )


def test_only_the_horizontal_block_is_learned():
    node = px.tensor.register(_normal(SHAPE), G)
    node = node.replace(originals=(0.3 * _normal(SHAPE, seed=1),))
    g = _grad(node, _normal(SHAPE, seed=6))
    np.testing.assert_array_equal(g[:K], 0.0)  # the top k x k block: rotations inside the span
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.min(jnp.abs(g[K:]))) > 0


def test_update_base_keeps_the_value_and_recentres():
    node = px.tensor.register(_normal(SHAPE, seed=8), G)
    moved = node.replace(originals=(0.3 * _normal(SHAPE, seed=9),))
    before = _materialize(moved)
    after = jax.jit(px.update_base)({"w": moved})["w"]
    np.testing.assert_allclose(_materialize(after), before, atol=1e-13)
    np.testing.assert_allclose(after.state["0"]["base"][:, :K], before, atol=1e-13)
    np.testing.assert_array_equal(after.original, 0.0)


def test_in_manifold_and_distance():
    q = G.sample(jax.random.key(0), (3, *SHAPE), jnp.float64)
    np.testing.assert_array_equal(G.in_manifold(q), [True] * 3)
    np.testing.assert_allclose(G.distance(q), 0.0, atol=1e-14)
    np.testing.assert_allclose(G.distance(2 * q), np.sqrt(K), rtol=1e-12)
    assert not bool(jnp.any(G.in_manifold(2 * q)))
    wide = jnp.swapaxes(q[0], -1, -2)  # a wide matrix: orthonormal rows
    assert bool(G.in_manifold(wide)) and not bool(G.in_manifold(wide.at[0, 0].add(1e-6)))
    assert bool(G.in_manifold(wide.at[0, 0].add(1e-6), atol=1e-5))


# ----- sampling ----------------------------------------------------------------------------------


def _uniform_like(frames, n, k):
    """A uniform subspace: E[P] = (k/n) I, and for P₀ = diag(1, 1, 1, 0, ...) (rank l = 3)
    E[tr P P₀] = kl/n, Var[tr P P₀] = 2kl(n-k)(n-l) / (n²(n-1)(n+2)); to about 5 standard
    errors of 3,000 draws."""
    p = _proj(frames)
    mean = jnp.mean(p, 0)
    t = jnp.trace(p[:, :3, :3], axis1=-2, axis2=-1)
    var = 2 * k * 3 * (n - k) * (n - 3) / (n**2 * (n - 1) * (n + 2))
    return (
        float(jnp.max(jnp.abs(mean - k / n * jnp.eye(n)))) < 0.03
        and abs(float(jnp.mean(t)) - k * 3 / n) < 0.03
        and abs(float(jnp.var(t)) - var) < 0.2 * var
    )


def test_sample_is_uniform_on_the_grassmannian():
    n, k, draws = 5, 2, 3000
    q = G.sample(jax.random.key(0), (draws, n, k), jnp.float64)
    assert bool(jnp.all(G.in_manifold(q)))
    assert _uniform_like(q, n, k)
    # the test can fail: an anisotropic Gaussian's span is not uniform
    g = _normal((draws, n, k), seed=1) * jnp.array([1.0, 1.0, 1.0, 2.0, 2.0]).reshape(1, n, 1)
    assert not _uniform_like(G.nearest(g), n, k)
    # wide shapes hold the frame in their rows; torus; dtypes; the initializer
    w = G.sample(jax.random.key(1), (2, 2, 5), jnp.float32)
    np.testing.assert_allclose(
        w @ jnp.swapaxes(w, -1, -2), jnp.broadcast_to(jnp.eye(2), (2, 2, 2)), atol=1e-6
    )
    t = G.sample(jax.random.key(2), (4, 5, 2), jnp.float64, "torus")
    assert bool(jnp.all(G.in_manifold(t)))
    b = G.sample(jax.random.key(3), (5, 2), jnp.bfloat16)
    assert b.dtype == jnp.bfloat16 and bool(G.in_manifold(b))
    with pytest.raises(ValueError, match="distribution"):
        G.sample(jax.random.key(0), (5, 2), jnp.float32, "gaussian")
    assert bool(G.in_manifold(px.sampler(G)(jax.random.key(4), (5, 2))))


# ----- paramx.nnx --------------------------------------------------------------------------------


def test_nnx_function_from_the_declarations():
    f = torch_function(Grassmannian)
    assert f.__name__ == "grassmannian"
    assert str(inspect.signature(f)).startswith("(module")
    layer = f(nnx.Linear(5, 2, rngs=nnx.Rngs(0)))
    assert bool(G.in_manifold(layer.kernel))
    value = _normal((5, 2), seed=9, dtype=jnp.float32)
    layer.kernel = value
    np.testing.assert_allclose(_proj(layer.kernel), value @ jnp.linalg.pinv(value), atol=1e-5)
