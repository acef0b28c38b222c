"""PositiveDefinite and PositiveSemidefinite: symmetric matrices with positive (non-negative)
eigenvalues."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close

import paramx as px
from paramx._src.parametrizations.psd import (
    PositiveDefinite,
    PositiveSemidefinite,
    PositiveSemidefiniteLowRank,
    positive_definite,
    positive_semidefinite,
    positive_semidefinite_low_rank,
    psd_projection,
)

BOTH = [PositiveDefinite(), PositiveSemidefinite()]
IDS = ["positive_definite", "positive_semidefinite"]
ALL = [*BOTH, PositiveSemidefiniteLowRank(2)]
ALL_IDS = [*IDS, "positive_semidefinite_low_rank"]


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_values_are_in_the_set_and_right_inverse_is_exact_on_it(p):
    x = p.sample(jax.random.key(0), (5, 4, 4), jnp.float64)
    assert bool(jnp.all(p.in_manifold(x))) and float(jnp.max(p.distance(x))) < 1e-12
    node = px.tensor.register(x, p, batch_axes=1)
    assert_close(px.tensor.materialize(node), x, scale=100)
    w = jax.jit(p.forward)(_normal((5, 4, 4), 3))
    assert bool(jnp.all(p.in_manifold(w)))
    np.testing.assert_array_equal(w, _t(w))


def test_semidefinite_is_exact_on_singular_matrices():
    a = _normal((5, 2))
    x = a @ a.T  # rank 2
    w = px.materialize(positive_semidefinite({"w": x}, "w"))["w"]
    assert_close(w, x, scale=100)


def test_semidefinite_projection_is_the_nearest_psd_matrix():
    a = _normal((5, 5), 4)
    got = px.materialize(positive_semidefinite({"w": a}, "w"))["w"]
    s = (a + a.T) / 2
    lam, v = jnp.linalg.eigh(s)
    assert_close(got, (v * jnp.maximum(lam, 0)[None, :]) @ v.T, scale=100)
    # Optimality (the projection onto a closed convex cone): P is PSD, S − P is negative
    # semidefinite and P (P − S) = 0.
    assert float(jnp.min(jnp.linalg.eigvalsh(got - s))) > -1e-12
    assert float(jnp.max(jnp.abs(got @ (got - s)))) < 1e-10
    d = float(jnp.linalg.norm(a - got))
    assert abs(d - float(PositiveSemidefinite().distance(a))) < 1e-10
    # Brute force: random PSD matrices and small PSD moves of the projection are never closer.
    b = _normal((3000, 5, 5), 5)
    others = b @ _t(b)
    c = 0.1 * _normal((3000, 5, 5), 6)
    near = psd_projection(got[None] + c)
    for cands in (others, near):
        assert float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1)))) >= d - 1e-12


def test_definite_keeps_the_symmetric_part_and_refuses_other_values_with_the_path():
    s = PositiveDefinite().sample(jax.random.key(1), (4, 4), jnp.float64)
    skew = jnp.triu(_normal((4, 4), 2), 1)
    skew = skew - skew.T
    got = px.materialize(positive_definite({"w": s + skew}, "w"))["w"]
    assert_close(got, s, scale=100)  # the nearest symmetric matrix, and it is PD
    bad = s - 2 * float(jnp.max(jnp.linalg.eigvalsh(s))) * jnp.eye(4)
    with pytest.raises(ValueError, match=r"not positive definite.*\(at fc/kernel\)"):
        positive_definite({"fc": {"kernel": bad}}, "fc/kernel")
    tree = positive_definite({"w": s}, "w")
    with pytest.raises(ValueError, match=r"not positive definite"):
        px.assign(tree, "w", jnp.zeros((4, 4)))
    assert bool(jnp.any(jnp.isnan(jax.jit(PositiveDefinite().right_inverse)(bad))))
    assert not bool(PositiveDefinite().in_manifold(bad))
    assert float(PositiveDefinite().distance(bad)) > 1.0


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_bad_tensors_are_refused(p):
    with pytest.raises(ValueError, match=r"square.*\(at fc/kernel\)"):
        px.register_parametrization({"fc": {"kernel": jnp.ones((3, 4))}}, "fc/kernel", p)
    with pytest.raises(TypeError, match="floating-point"):
        px.register_parametrization({"w": jnp.eye(3, dtype=jnp.int32)}, "w", p)


@pytest.mark.parametrize("p", BOTH, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_and_conv_stacks(p, dtype):
    x = p.sample(jax.random.key(2), (2, 1, 4, 4), dtype)
    tree = px.register_parametrization({"conv": x}, "conv", p)
    w = jax.jit(px.materialize)(tree)["conv"]
    assert w.dtype == dtype and w.shape == x.shape
    assert_close(w, x, dtype, scale=100 if dtype != jnp.bfloat16 else 5)
    np.testing.assert_array_equal(w, _t(w))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_grad_and_vmap(p):
    x = _normal((3, 4, 4))
    g = jax.grad(lambda x: jnp.sum(jax.vmap(p.forward)(x) * _normal((3, 4, 4), 1)))(x)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_samples_are_wishart(p):
    n, m = 4, 4000
    s = p.sample(jax.random.key(7), (m, n, n), jnp.float64)
    assert bool(jnp.all(p.in_manifold(s)))
    # Wishart(I, n): mean n·I; variance n off the diagonal and 2n on it.
    np.testing.assert_allclose(jnp.mean(s, axis=0), n * jnp.eye(n), atol=0.25)
    var = jnp.var(s, axis=0)
    np.testing.assert_allclose(var, n * (jnp.ones((n, n)) + jnp.eye(n)), rtol=0.15)


def _adam_scan(p, x0, loss, steps=1000):
    opt = optax.adam(1e-2)

    @jax.jit
    def run(x0):
        def step(carry, _):
            x, s = carry
            g = jax.grad(lambda x: loss(p.forward(x)))(x)
            with jax.numpy_dtype_promotion("standard"):
                u, s = opt.update(g, s, x)
                x = optax.apply_updates(x, u)
            return (x, s), loss(p.forward(x))

        with jax.numpy_dtype_promotion("standard"):
            s0 = opt.init(x0)
        (x, _), losses = jax.lax.scan(step, (x0, s0), None, length=steps)
        return p.forward(x), losses

    return run(x0)


@pytest.mark.parametrize("p", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_keeps_the_value_in_the_set(p, dtype):
    n = 5
    target = _normal((n, n), 11, dtype)  # indefinite: the optimum is on the boundary
    q = _normal((n * n, n * n), 12, dtype) / n

    def loss(w):
        e = (w - target).reshape(-1)
        return jnp.sum((q @ e) ** 2)

    w, _ = _adam_scan(p, p.right_inverse(p.sample(jax.random.key(3), (n, n), dtype)), loss)
    np.testing.assert_array_equal(w, w.T)
    tol = 10 * n * float(jnp.finfo(dtype).eps) * float(jnp.max(jnp.abs(w)))
    assert float(jnp.min(jnp.linalg.eigvalsh(w))) >= -tol
    assert bool(p.in_manifold(w, atol=tol))


@pytest.mark.parametrize("p", ALL, ids=ALL_IDS)
def test_fitting_power(p):
    n = 4
    target = p.sample(jax.random.key(5), (n, n), jnp.float64)

    def loss(w):
        return jnp.sum((w - target) ** 2) / jnp.sum(target**2)

    x0 = p.right_inverse(p.sample(jax.random.key(6), (n, n), jnp.float64))
    _, losses = _adam_scan(p, x0, loss, steps=3000)
    assert float(losses[-1]) < 1e-4


def test_low_rank_is_exact_on_the_set_and_projects_to_the_nearest():
    p = PositiveSemidefiniteLowRank(2)
    x = p.sample(jax.random.key(0), (3, 5, 5), jnp.float64)
    assert bool(jnp.all(p.in_manifold(x))) and float(jnp.max(p.distance(x))) < 1e-12
    node = px.tensor.register(x, p, batch_axes=1)
    assert node.originals[0].shape == (3, 5, 2)
    assert_close(px.tensor.materialize(node), x, scale=100)
    a = _normal((5, 5), 4)
    got = px.materialize(positive_semidefinite_low_rank({"w": a}, "w", 2))["w"]
    lam, v = jnp.linalg.eigh((a + a.T) / 2)
    top = jnp.maximum(lam[-2:], 0)
    assert_close(got, (v[:, -2:] * top[None, :]) @ v[:, -2:].T, scale=100)
    d = float(jnp.linalg.norm(a - got))
    assert abs(d - float(p.distance(a))) < 1e-10
    # Brute force: random rank-2 PSD matrices and small moves along the set are never closer.
    g = _normal((3000, 5, 2), 5)
    near = p.forward(p.right_inverse(got)[None] + 0.05 * _normal((3000, 5, 2), 6))
    for cands in (g @ _t(g), near):
        assert float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1)))) >= d - 1e-12
    assert not bool(p.in_manifold(jnp.eye(5)))
    s = p.sample(jax.random.key(8), (4000, 4, 4), jnp.float64)
    np.testing.assert_allclose(jnp.mean(s, axis=0), 2 * jnp.eye(4), atol=0.2)


def test_low_rank_options_and_shapes_are_checked():
    with pytest.raises(TypeError, match="rank must be an int"):
        PositiveSemidefiniteLowRank(2.0)
    with pytest.raises(ValueError, match="at least 1"):
        PositiveSemidefiniteLowRank(0)
    with pytest.raises(ValueError, match=r"exceeds the matrix size.*\(at fc/kernel\)"):
        positive_semidefinite_low_rank({"fc": {"kernel": jnp.eye(3)}}, "fc/kernel", 4)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (PositiveDefinite, {}),
        (PositiveSemidefinite, {}),
        (PositiveSemidefiniteLowRank, {"rank": 2}),
    ],
)
def test_nnx_functions_come_from_the_declarations(cls, kwargs):
    from flax import nnx

    from paramx._src.integrations.nnx.wrappers import torch_function

    f = torch_function(cls)
    assert f.__name__ == cls.torch_function
    layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    layer.kernel[...] = 2 * jnp.eye(4, dtype=jnp.float32)
    layer = f(layer, **kwargs)
    k = layer.kernel
    np.testing.assert_array_equal(k, k.T)
    assert float(jnp.min(jnp.linalg.eigvalsh(k))) > -1e-5
