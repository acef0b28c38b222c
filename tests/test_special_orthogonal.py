"""SpecialOrthogonal / special_orthogonal: the rotation group SO(n) (geotorch's SO)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import paramx as px
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal, special_orthogonal

SO = SpecialOrthogonal()


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _is_rotation(q, atol):
    q = np.asarray(q, np.float64)
    n = q.shape[-1]
    gram = np.swapaxes(q, -1, -2) @ q
    return np.all(np.abs(gram - np.eye(n)) <= atol) and np.all(np.linalg.det(q) > 0)


def test_registration_gives_a_rotation_and_keeps_a_rotation_exactly():
    k = _normal((4, 4))
    q = jax.jit(px.materialize)(special_orthogonal({"w": k}, "w"))["w"]
    assert _is_rotation(q, 1e-13)
    np.testing.assert_allclose(q, SO.nearest(k), atol=1e-13)
    r = SO.sample(jax.random.key(1), (4, 4), jnp.float64)
    tree = special_orthogonal({"w": r}, "w")
    np.testing.assert_array_equal(tree["w"].state["0"]["base"], r)
    np.testing.assert_array_equal(tree["w"].original, 0.0)
    np.testing.assert_allclose(px.materialize(tree)["w"], r, atol=1e-15)
    r32 = r.astype(jnp.float32)
    w32 = px.materialize(special_orthogonal({"w": r32}, "w"))["w"]
    np.testing.assert_allclose(w32, r32, atol=1e-7)


def test_nearest_is_the_closest_rotation():
    x = _normal((200, 4, 4), seed=2)
    near = SO.nearest(x)
    assert _is_rotation(near, 1e-12)
    d_near = jnp.linalg.norm(x - near, axis=(-2, -1))
    np.testing.assert_allclose(SO.distance(x), d_near, rtol=1e-10)
    # No random rotation (1,000 per matrix) is closer.
    rots = SO.sample(jax.random.key(3), (1000, 4, 4), jnp.float64)
    d_rand = jnp.linalg.norm(x[:, None] - rots[None], axis=(-2, -1))
    assert bool(jnp.all(d_rand >= d_near[:, None] - 1e-12))
    # Nor any small rotation of it (a local check in every direction).
    a = _normal((200, 50, 4, 4), seed=4) * 1e-3
    a = a - jnp.swapaxes(a, -1, -2)
    moved = near[:, None] @ jax.scipy.linalg.expm(a)
    d_moved = jnp.linalg.norm(x[:, None] - moved, axis=(-2, -1))
    assert bool(jnp.all(d_moved >= d_near[:, None] - 1e-12))
    # Where det > 0 it is Orthogonal's polar factor U Vᵀ.
    pos = np.asarray(jnp.linalg.det(x) > 0)
    u, _, vt = jnp.linalg.svd(x)
    np.testing.assert_allclose(near[pos], (u @ vt)[pos], atol=1e-12)
    assert not np.allclose(near[~pos], (u @ vt)[~pos])


def test_ties_are_refused_on_concrete_values_with_the_path():
    reflection = jnp.diag(jnp.array([1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match=r"no unique nearest rotation.*\(at fc/kernel\)"):
        special_orthogonal({"fc": {"kernel": reflection}}, "fc/kernel")
    with pytest.raises(ValueError, match="no unique nearest rotation"):
        special_orthogonal({"w": jnp.zeros((3, 3))}, "w")
    tree = special_orthogonal({"w": jnp.eye(3)}, "w")
    with pytest.raises(ValueError, match="no unique nearest rotation"):
        px.assign(tree, "w", reflection)
    # Under jit the check cannot run: one of the nearest rotations is used.
    _, state = jax.jit(lambda v: SO.right_inverse(v, params=None, state=None))(reflection)
    assert _is_rotation(state["base"], 1e-6)


def test_bad_tensors_are_refused_with_the_path():
    with pytest.raises(ValueError, match=r"square.*\(at fc/kernel\)"):
        special_orthogonal({"fc": {"kernel": jnp.ones((3, 4))}}, "fc/kernel")
    with pytest.raises(TypeError, match="floating-point"):
        special_orthogonal({"w": jnp.ones((3, 3), jnp.int32)}, "w")
    with pytest.raises(TypeError, match="complex.*Orthogonal"):
        special_orthogonal({"w": jnp.eye(3, dtype=jnp.complex64)}, "w")
    tree = special_orthogonal({"w": jnp.eye(3)}, "w")
    with pytest.raises(ValueError, match="shape"):
        px.assign(tree, "w", jnp.eye(4))
    with pytest.raises(TypeError, match="name"):
        SpecialOrthogonal(name=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_batches_and_conv_kernels(dtype):
    k = _normal((3, 3, 4, 4), dtype=jnp.float32).astype(dtype)  # a conv kernel: one per tap
    tree = special_orthogonal({"k": k}, "k")
    w = jax.jit(px.materialize)(tree)["k"]
    assert w.dtype == dtype and w.shape == k.shape
    assert bool(jnp.all(SO.in_manifold(w)))
    stack = special_orthogonal({"k": k.reshape(9, 4, 4)}, "k", batch_axes=1)["k"]
    assert stack.batch_shape == (9,)
    np.testing.assert_allclose(
        np.asarray(jax.jit(px.tensor.materialize)(stack), np.float64).reshape(w.shape),
        np.asarray(w, np.float64),
        atol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
    )


def test_in_manifold_and_distance():
    r = SO.sample(jax.random.key(0), (3, 4, 4), jnp.float64)
    flipped = r.at[..., 0].multiply(-1.0)
    np.testing.assert_array_equal(SO.in_manifold(r), [True] * 3)
    np.testing.assert_array_equal(SO.in_manifold(flipped), [False] * 3)
    assert bool(jnp.all(Orthogonal().in_manifold(flipped)))
    np.testing.assert_allclose(SO.distance(r), 0.0, atol=1e-13)
    # A reflection is 2 away from SO(n): the two smallest singular values go to (1, -1).
    np.testing.assert_allclose(SO.distance(flipped), 2.0, rtol=1e-12)
    np.testing.assert_allclose(SO.distance(2 * r), 2.0, rtol=1e-12)  # sqrt(4 * (2 - 1)²)
    assert not bool(SO.in_manifold(r[0] + 1e-6)) and bool(SO.in_manifold(r[0] + 1e-6, atol=1e-5))


@pytest.mark.parametrize("shape", [(0, 0), (2, 0, 0), (0, 3, 3)])
def test_zero_size_tensors_and_their_table(shape):
    # SO(0) is one point, the empty matrix: distance 0, and px.table's health (which calls
    # distance) used to fail with an IndexError on a 0 x 0 matrix.
    x = jnp.zeros(shape, jnp.float32)
    assert SO.distance(x).shape == shape[:-2]
    np.testing.assert_array_equal(SO.distance(x), 0.0)
    tree = special_orthogonal({"w": x}, "w")
    assert px.materialize(tree)["w"].shape == shape
    assert float(px.table(tree).health["w"]["distance"]) == 0.0


def test_update_base_keeps_the_value_and_recentres():
    tree = special_orthogonal({"w": _normal((4, 4))}, "w")
    node = tree["w"]
    moved = {"w": node.replace(originals=(node.original + 0.3 * _normal((4, 4), seed=5),))}
    before = px.materialize(moved)["w"]
    after = px.update_base(moved)
    np.testing.assert_allclose(px.materialize(after)["w"], before, atol=1e-13)
    np.testing.assert_allclose(after["w"].state["0"]["base"], before, atol=1e-13)
    np.testing.assert_array_equal(after["w"].original, 0.0)


def test_grad_vmap_and_only_the_lower_triangle_is_learned():
    tree = special_orthogonal({"w": _normal((4, 4))}, "w")
    params, state = px.split_state(tree)
    target = _normal((4, 4), seed=6)
    loss = jax.jit(jax.grad(lambda p: jnp.sum(px.materialize(p, state)["w"] * target)))
    g = loss(params)["w"].original
    np.testing.assert_array_equal(jnp.triu(g), 0.0)
    assert float(jnp.abs(g[jnp.tril_indices(4, -1)]).min()) > 0
    xs = _normal((5, 4, 4), seed=7)
    base = jax.vmap(SO.nearest)(xs)
    out = jax.jit(jax.vmap(lambda x, b: SO.forward(x, params=None, state={"base": b})))(xs, base)
    assert bool(jnp.all(SO.in_manifold(out)))


def _moments(q):
    tr = jnp.trace(q, axis1=-2, axis2=-1)
    return (
        float(jnp.mean(tr)),
        float(jnp.mean(tr**2)),
        float(jnp.max(jnp.abs(jnp.mean(q, 0)))),
        float(jnp.max(jnp.abs(jnp.mean(q**2, 0) - 1 / q.shape[-1]))),
    )


def _haar_like(q):
    """E[tr Q] = 0, E[tr² Q] = 1, E[Q_ij] = 0, E[Q_ij²] = 1/n (Haar on SO(n), n >= 3), to about
    5 standard errors of 2,000 draws (sd of tr² is about sqrt(3) on SO(4))."""
    m, m2, entry, entry2 = _moments(q)
    return abs(m) < 0.12 and abs(m2 - 1) < 0.2 and entry < 0.06 and entry2 < 0.03


def test_sample_is_haar_on_so_n():
    q = SO.sample(jax.random.key(0), (2000, 4, 4), jnp.float64)
    assert bool(jnp.all(SO.in_manifold(q)))
    assert _haar_like(q)
    # the test can fail: QR without the sign correction is not Haar
    g = _normal((2000, 4, 4), seed=1)
    plain = jnp.linalg.qr(g)[0]
    plain = plain.at[..., 0].multiply(jnp.sign(jnp.linalg.det(plain))[..., None])
    assert not _haar_like(plain)
    # half of Haar O(n) has det -1: the flip acts on about half the draws
    o = Orthogonal().sample(jax.random.key(0), (2000, 4, 4), jnp.float64)
    assert abs(float(jnp.mean(jnp.linalg.det(o) < 0)) - 0.5) < 0.05


def test_sample_torus_and_dtypes():
    q = SO.sample(jax.random.key(0), (2000, 5, 5), jnp.float64, "torus")
    assert bool(jnp.all(SO.in_manifold(q)))
    c = q[:, jnp.array([0, 2]), jnp.array([0, 2])]  # cosines of the two angles
    assert abs(float(jnp.mean(c))) < 0.05 and abs(float(jnp.mean(c**2)) - 0.5) < 0.03
    np.testing.assert_array_equal(q[:, 4, 4], 1.0)
    for dtype in (jnp.float32, jnp.bfloat16):
        s = SO.sample(jax.random.key(1), (2, 3, 3), dtype)
        assert s.dtype == dtype and bool(jnp.all(SO.in_manifold(s)))
    with pytest.raises(ValueError, match="square"):
        SO.sample(jax.random.key(0), (3, 4))
    with pytest.raises(ValueError, match="distribution"):
        SO.sample(jax.random.key(0), (3, 3), jnp.float32, "gaussian")
    assert bool(jnp.all(SO.in_manifold(px.sampler(SO)(jax.random.key(2), (3, 3)))))


def _train(tree, loss_of, steps=1000):
    params, state = px.split_state(tree)
    tx = optax.adam(1e-2)

    def step(carry, _):
        params, opt = carry
        loss, g = jax.value_and_grad(lambda p: loss_of(px.materialize(p, state)["w"]))(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, updates)
        return (params, opt), loss

    @jax.jit
    def run(params):
        with jax.numpy_dtype_promotion("standard"):
            opt = tx.init(params)
        (params, _), losses = jax.lax.scan(step, (params, opt), None, length=steps)
        return px.materialize(params, state)["w"], losses

    return run(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_quality_after_training_stays_on_so_n(dtype):
    n = 6
    a, b = _normal((n, n), 1, dtype), _normal((n, n), 2, dtype)
    w, losses = _train(
        special_orthogonal({"w": _normal((n, n), 3, dtype)}, "w"),
        lambda w: jnp.sum((a @ w - b) ** 2),
    )
    assert float(losses[-1]) < float(losses[0])
    atol = 10 * n * float(jnp.finfo(dtype).eps)
    assert bool(SO.in_manifold(w, atol=atol)), float(SO.distance(w))


def test_fitting_power_reaches_a_sampled_rotation():
    n = 4
    target = SO.sample(jax.random.key(7), (n, n), jnp.float64)
    _, losses = _train(
        special_orthogonal({"w": _normal((n, n), 8)}, "w"),
        lambda w: jnp.sum((w - target) ** 2) / jnp.sum(target**2),
    )
    assert float(losses[-1]) < 1e-4, float(losses[-1])


def test_nnx_function_from_the_declarations():
    f = torch_function(SpecialOrthogonal)
    assert f.__name__ == "special_orthogonal"
    assert str(inspect.signature(f)).startswith("(module")
    layer = f(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    assert bool(SO.in_manifold(layer.kernel))
    layer.kernel = _normal((4, 4), seed=9, dtype=jnp.float32)
    assert bool(SO.in_manifold(layer.kernel))


def test_check_value_refuses_a_reflection_in_a_stack_and_in_nnx():
    # The core runs check_value eagerly before it traces: a stack (registered under vmap) and
    # paramx.nnx (compiled) are refused too, instead of silently using one of the nearest.
    reflection = jnp.diag(jnp.array([1.0, 1.0, -1.0]))
    stack = jnp.stack([jnp.eye(3), reflection])
    with pytest.raises(ValueError, match=r"no unique nearest rotation.*\(at fc/kernel\)"):
        special_orthogonal({"fc": {"kernel": stack}}, "fc/kernel", batch_axes=1)
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = reflection.astype(jnp.float32)
    with pytest.raises(ValueError, match=r"no unique nearest rotation.*Linear\.kernel"):
        torch_function(SpecialOrthogonal)(layer)
