"""Cholesky and CorrelationCholesky: lower-triangular factors with a positive diagonal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close

import paramx as px
from paramx._src.parametrizations.cholesky import (
    Cholesky,
    CorrelationCholesky,
    cholesky,
    correlation_cholesky,
    inv_softplus,
    softplus,
)

BOTH = [Cholesky(), CorrelationCholesky()]
IDS = ["cholesky", "correlation_cholesky"]


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _factor(shape=(4, 4), seed=0, dtype=jnp.float64):
    """A lower-triangular matrix with a positive diagonal (off the correlation set)."""
    g = jnp.tril(_normal(shape, seed, dtype), -1)
    return g + (1.0 + jnp.abs(_normal(shape[:-1], seed + 1, dtype)))[..., None] * jnp.eye(
        shape[-1], dtype=dtype
    )


def _unit_rows(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_softplus_inverse_is_stable_and_exact():
    y = jnp.array([1e-30, 1e-8, 0.5, 1.0, 30.0, 1e4], jnp.float64)
    x = inv_softplus(y)
    assert np.all(np.isfinite(x))
    assert_close(softplus(x), y)
    assert bool(jnp.all(jnp.isnan(inv_softplus(jnp.array([0.0, -1.0])))))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_values_are_in_the_set_and_right_inverse_is_exact_on_it(p):
    x = p.sample(jax.random.key(0), (5, 4, 4), jnp.float64)
    assert bool(jnp.all(p.in_manifold(x))) and float(jnp.max(p.distance(x))) < 1e-12
    node = px.tensor.register(x, p, batch_axes=1)
    assert_close(px.tensor.materialize(node), x, scale=10)
    w = jax.jit(p.forward)(_normal((5, 4, 4), 3))
    assert bool(jnp.all(p.in_manifold(w)))
    np.testing.assert_array_equal(jnp.triu(w, 1), 0.0)


def test_cholesky_projection_drops_the_upper_triangle_and_is_nearest():
    a = _factor() + jnp.triu(_normal((4, 4), 5), 1)
    tree = cholesky({"w": a}, "w")
    got = px.materialize(tree)["w"]
    assert_close(got, jnp.tril(a), scale=10)
    # Nearest: no point of the set, near or far, is closer.
    d = float(jnp.linalg.norm(a - got))
    assert abs(d - float(Cholesky().distance(a))) < 1e-12
    others = Cholesky().sample(jax.random.key(1), (2000, 4, 4), jnp.float64)
    near = got[None] + jnp.tril(0.1 * _normal((2000, 4, 4), 6))
    for cands in (others, near):
        cands = cands[Cholesky().in_manifold(cands)]
        assert cands.shape[0] > 1000
        assert float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1)))) >= d


def test_correlation_projection_normalizes_rows_and_is_nearest():
    a = _factor() + jnp.triu(_normal((4, 4), 5), 1)
    p = CorrelationCholesky()
    got = px.materialize(correlation_cholesky({"w": a}, "w"))["w"]
    assert_close(got, _unit_rows(jnp.tril(a)), scale=10)
    d = float(jnp.linalg.norm(a - got))
    assert abs(d - float(p.distance(a))) < 1e-12
    # Brute force: random points of the set, and small moves of the projection along the set.
    others = p.sample(jax.random.key(1), (4000, 4, 4), jnp.float64)
    near = p.forward(p.right_inverse(got)[None] + 0.05 * _normal((4000, 4, 4), 7))
    for cands in (others, near):
        assert float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1)))) >= d


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_a_non_positive_diagonal_is_refused_with_the_path(p):
    bad = _factor().at[2, 2].set(-0.5)
    with pytest.raises(ValueError, match=r"diagonal entry <= 0.*\(at fc/kernel\)"):
        px.register_parametrization({"fc": {"kernel": bad}}, "fc/kernel", p)
    tree = px.register_parametrization({"w": _unit_rows(_factor())}, "w", p)
    with pytest.raises(ValueError, match=r"diagonal entry <= 0"):
        px.assign(tree, "w", bad.at[2, 2].set(0.0))
    with pytest.raises(ValueError, match=r"square.*\(at fc/kernel\)"):
        px.register_parametrization({"fc": {"kernel": jnp.ones((3, 4))}}, "fc/kernel", p)
    with pytest.raises(TypeError, match="floating-point"):
        px.register_parametrization({"w": jnp.eye(3, dtype=jnp.int32)}, "w", p)
    # Under jit no check can run: the originals are NaN, as documented.
    assert bool(jnp.any(jnp.isnan(jax.jit(p.right_inverse)(bad))))
    assert not bool(p.in_manifold(bad)) and float(p.distance(bad)) > 0.4


@pytest.mark.parametrize("p", BOTH, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_and_conv_stacks(p, dtype):
    x = p.sample(jax.random.key(2), (2, 1, 4, 4), dtype)
    tree = px.register_parametrization({"conv": x}, "conv", p)
    w = jax.jit(px.materialize)(tree)["conv"]
    assert w.dtype == dtype and w.shape == x.shape
    assert_close(w, x, dtype, scale=20)
    assert p.sample(jax.random.key(0), (4, 4), dtype).dtype == dtype


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_grad_and_vmap(p):
    x = _normal((3, 4, 4))
    g = jax.grad(lambda x: jnp.sum(jax.vmap(p.forward)(x) * _normal((3, 4, 4), 1)))(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(jnp.triu(g, 1), 0.0)  # the upper triangle is not learned


def test_cholesky_sample_is_bartlett_wishart():
    n, m = 4, 4000
    s = Cholesky().sample(jax.random.key(0), (m, n, n), jnp.float64)
    assert bool(jnp.all(Cholesky().in_manifold(s)))
    lower = s[:, jnp.tril_indices(n, -1)[0], jnp.tril_indices(n, -1)[1]].ravel()
    assert abs(float(jnp.mean(lower))) < 0.03 and abs(float(jnp.var(lower)) - 1) < 0.05
    diag2 = jnp.mean(jnp.diagonal(s, axis1=-2, axis2=-1) ** 2, axis=0)
    np.testing.assert_allclose(diag2, [4.0, 3.0, 2.0, 1.0], rtol=0.06)
    wishart = jnp.mean(s @ jnp.swapaxes(s, -1, -2), axis=0)
    np.testing.assert_allclose(wishart, n * jnp.eye(n), atol=0.25)


def test_correlation_sample_is_lkj_one():
    n, m = 5, 4000
    p = CorrelationCholesky()
    s = p.sample(jax.random.key(1), (m, n, n), jnp.float64)
    assert bool(jnp.all(p.in_manifold(s)))
    c = s @ jnp.swapaxes(s, -1, -2)
    i, j = jnp.tril_indices(n, -1)
    r = c[:, i, j]  # (m, pairs): each 2·Beta(n/2, n/2) − 1
    # Each pair (the deep ones test the onion steps): mean 0, variance 1/(n + 1) (about 5 sigma).
    np.testing.assert_allclose(jnp.mean(r, axis=0), 0.0, atol=0.04)
    np.testing.assert_allclose(jnp.var(r, axis=0), 1 / (n + 1), rtol=0.12)
    # The fourth moment of 2·Beta(a, a) − 1 is 3/((2a + 1)(2a + 3)).
    np.testing.assert_allclose(jnp.mean(r**4), 3 / ((n + 1) * (n + 3)), rtol=0.1)


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


@pytest.mark.parametrize("p", BOTH, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_keeps_the_value_in_the_set(p, dtype):
    n = 5
    target = _normal((n, n), 11, dtype)  # off the set: the optimum is on its boundary
    q = _normal((n * n, n * n), 12, dtype) / n

    def loss(w):
        e = (w - target).reshape(-1)
        return jnp.sum((q @ e) ** 2)

    w, _ = _adam_scan(p, p.right_inverse(p.sample(jax.random.key(3), (n, n), dtype)), loss)
    tol = 10 * n * float(jnp.finfo(dtype).eps)
    assert bool(p.in_manifold(w, atol=tol))
    assert float(jnp.max(jnp.abs(jnp.triu(w, 1)))) == 0.0
    if isinstance(p, CorrelationCholesky):
        assert float(jnp.max(jnp.abs(jnp.linalg.norm(w, axis=-1) - 1))) <= tol


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_fitting_power(p):
    n = 4
    target = p.sample(jax.random.key(5), (n, n), jnp.float64)

    def loss(w):
        return jnp.sum((w - target) ** 2) / jnp.sum(target**2)

    x0 = p.right_inverse(p.sample(jax.random.key(6), (n, n), jnp.float64))
    _, losses = _adam_scan(p, x0, loss, steps=3000)
    assert float(losses[-1]) < 1e-4


@pytest.mark.parametrize("cls", [Cholesky, CorrelationCholesky])
def test_nnx_functions_come_from_the_declarations(cls):
    from flax import nnx

    from paramx._src.integrations.nnx.wrappers import torch_function

    f = torch_function(cls)
    assert f.__name__ == cls.torch_function
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.eye(3, dtype=jnp.float32) + jnp.ones((3, 3), jnp.float32)
    layer = f(layer)
    assert bool(cls().in_manifold(layer.kernel))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_distance_off_the_set_is_a_lower_bound_of_the_brute_force_one(p):
    # A value with negative diagonal entries: no nearest point, the distance is the infimum.
    a = _normal((4, 4), 9).at[1, 1].set(-0.7).at[3, 3].set(-0.2)
    cands = p.sample(jax.random.key(4), (4000, 4, 4), jnp.float64)
    brute = float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1))))
    assert 0 < float(p.distance(a)) <= brute


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_check_value_refuses_a_bad_matrix_of_a_stack_and_in_nnx(p):
    # The core runs check_value eagerly before it traces: a stack (registered under vmap) and
    # paramx.nnx (compiled) are refused too, instead of getting NaN originals.
    from flax import nnx

    from paramx._src.integrations.nnx.wrappers import torch_function

    stack = jnp.stack([_factor(seed=1), _factor(seed=2).at[1, 1].set(-1.0)])
    with pytest.raises(ValueError, match=r"diagonal entry <= 0.*\(at fc/kernel\)"):
        px.register_parametrization({"fc": {"kernel": stack}}, "fc/kernel", p, batch_axes=1)
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.eye(3, dtype=jnp.float32).at[2, 2].set(0.0)
    with pytest.raises(ValueError, match=r"diagonal entry <= 0.*Linear\.kernel"):
        torch_function(type(p))(layer)
