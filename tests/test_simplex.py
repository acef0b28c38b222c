"""paramx simplex: softmax along an axis, Euclidean projection off the simplex."""

from __future__ import annotations

import doctest
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.simplex import Simplex, project_to_simplex, simplex


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _fit(p, x0, loss, steps=1000, lr=1e-2):
    """``steps`` Adam steps on the original of ``p`` from the value ``x0``, one jit + scan."""
    node = px.tensor.register(x0, p)
    opt = optax.adam(lr)

    @jax.jit
    def run(node):
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(node)

            def step(carry, _):
                n, s = carry
                lval, g = jax.value_and_grad(lambda n: loss(px.tensor.materialize(n)))(n)
                upd, s = opt.update(g, s, n)
                return (optax.apply_updates(n, upd), s), lval

            (node, _), losses = jax.lax.scan(step, (node, state), None, length=steps)
        return px.tensor.materialize(node), losses

    return run(node)


def test_values_on_the_simplex_round_trip_with_zero_mean_logits():
    w = Simplex().sample(jax.random.key(0), (4, 5), jnp.float64)
    tree = simplex({"w": w}, "w")
    np.testing.assert_allclose(jax.jit(px.materialize)(tree)["w"], w, rtol=1e-12, atol=1e-15)
    logits = tree["w"].originals[0]
    np.testing.assert_allclose(jnp.mean(logits, -1), 0.0, atol=1e-12)
    np.testing.assert_allclose(logits, jnp.log(w) - jnp.mean(jnp.log(w), -1, keepdims=True))


def test_axis_option_sums_over_the_chosen_axis():
    x = _normal((3, 4, 5))
    p = Simplex(axis=1)
    y = p.forward(x)
    np.testing.assert_allclose(jnp.sum(y, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p.forward(p.right_inverse(y)), y, rtol=1e-12)
    s = p.sample(jax.random.key(0), (3, 4, 5), jnp.float64)
    np.testing.assert_allclose(jnp.sum(s, axis=1), 1.0, rtol=1e-12)
    assert p.in_manifold(s).shape == (3,) and bool(jnp.all(p.in_manifold(s)))


def _kkt_holds(y, p, tol=1e-10):
    """``p`` is the projection of ``y``: on the simplex, and ``y − p`` equals one multiplier
    ``τ`` on the support and ``y <= τ`` off it (the KKT conditions of the projection)."""
    y, p = np.asarray(y), np.asarray(p)
    support = p > tol
    tau = np.mean((y - p)[support])
    return (
        abs(p.sum() - 1) < tol
        and (p >= 0).all()
        and np.allclose((y - p)[support], tau, atol=tol)
        and (y[~support] <= tau + tol).all()
    )


def test_projection_is_the_nearest_point_kkt_and_random_search():
    ys = 2 * _normal((200, 6), seed=1)
    ps = project_to_simplex(ys)
    for y, p in zip(ys, ps):
        assert _kkt_holds(y, p)
    # No point among 20,000 uniform ones on the simplex is nearer than the projection.
    cloud = np.asarray(Simplex().sample(jax.random.key(2), (20000, 6), jnp.float64))
    for y, p in zip(np.asarray(ys[:20]), np.asarray(ps[:20])):
        best = np.min(np.sum((cloud - y) ** 2, -1))
        assert np.sum((p - y) ** 2) <= best + 1e-12


def test_registration_projects_off_simplex_values_and_never_gives_nan():
    y = jnp.array([[0.5, 1.5, -1.0], [0.2, 0.2, 0.2]])
    tree = simplex({"w": y}, "w")
    logits = tree["w"].originals[0]
    assert bool(jnp.all(jnp.isfinite(logits)))
    out = px.materialize(tree)["w"]
    np.testing.assert_allclose(out, project_to_simplex(y), atol=1e-6)
    np.testing.assert_allclose(out[1], 1 / 3, rtol=1e-6)
    # Gradients stay finite at a boundary point.
    g = jax.grad(lambda x: jnp.sum(Simplex().forward(x) * jnp.arange(3.0)[None]))(logits)
    assert bool(jnp.all(jnp.isfinite(g)))
    assigned = px.materialize(px.assign(tree, "w", 5 * jnp.ones((2, 3))))["w"]
    np.testing.assert_allclose(assigned, 1 / 3, rtol=1e-6)


def test_errors_name_the_path():
    with pytest.raises(IndexError, match=r"\(at fc/kernel\)"):
        simplex({"fc": {"kernel": jnp.ones((3,))}}, "fc/kernel", axis=1)
    with pytest.raises(ValueError, match=r"scalar.*\(at fc/kernel\)"):
        simplex({"fc": {"kernel": jnp.ones(())}}, "fc/kernel")
    with pytest.raises(TypeError, match="floating-point"):
        simplex({"w": jnp.ones((3,), jnp.int32)}, "w")
    with pytest.raises(TypeError, match="axis"):
        Simplex(axis=1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_are_kept(dtype):
    w = Simplex().sample(jax.random.key(0), (3, 4), dtype)
    assert w.dtype == dtype
    tree = simplex({"w": w}, "w")
    out = px.materialize(tree)["w"]
    assert out.dtype == dtype and tree["w"].originals[0].dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(w, np.float64), atol=tol)


def test_batches_distance_and_membership():
    stack = Simplex().sample(jax.random.key(0), (5, 3, 4), jnp.float64)
    node = simplex({"k": stack}, "k", batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    np.testing.assert_allclose(px.tensor.materialize(node), stack, rtol=1e-12)
    p = Simplex()
    x = jnp.array([[1.0, 0.0], [2.0, 0.0]])  # the second row is sqrt(2)/... off: (2,0) -> (1,0)
    np.testing.assert_allclose(p.distance(x), 1.0, rtol=1e-12)
    assert not bool(p.in_manifold(x))
    np.testing.assert_allclose(p.distance(stack), 0.0, atol=1e-15)


def test_samples_are_uniform_dirichlet():
    d = 4
    s = Simplex().sample(jax.random.key(3), (3000, d), jnp.float64)
    np.testing.assert_allclose(jnp.sum(s, -1), 1.0, rtol=1e-12)
    # Each coordinate is Beta(1, d−1): mean 1/d, variance (d−1)/(d²(d+1)); about 4 sigma.
    np.testing.assert_allclose(jnp.mean(s, 0), 1 / d, atol=0.012)
    np.testing.assert_allclose(jnp.var(s, 0), (d - 1) / (d**2 * (d + 1)), rtol=0.1)
    # Beta(1, d−1) has P(x > t) = (1 − t)^(d−1); coordinates are negatively correlated (−1/(d−1)).
    np.testing.assert_allclose(jnp.mean(s[:, 0] > 0.5), 0.5 ** (d - 1), atol=0.025)
    np.testing.assert_allclose(np.corrcoef(s[:, 0], s[:, 1])[0, 1], -1 / (d - 1), atol=0.06)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_keeps_the_value_on_the_simplex(dtype):
    n = 8
    target = 3 * _normal((n, n), seed=3, dtype=dtype)
    weights = jnp.abs(_normal((n, n), seed=4, dtype=dtype)) + 0.1
    p = Simplex()
    x0 = p.sample(jax.random.key(5), (n, n), dtype)
    w, _ = _fit(p, x0, lambda w: jnp.sum(weights * (w - target) ** 2))
    eps = float(jnp.finfo(dtype).eps)
    assert bool(jnp.all(jnp.isfinite(w)))
    assert bool(p.in_manifold(w, atol=10 * n * eps))
    assert float(p.distance(w)) <= 10 * n * eps


def test_fitting_power_reaches_a_sampled_target():
    p = Simplex()
    target = p.sample(jax.random.key(7), (6, 5), jnp.float64)
    x0 = p.sample(jax.random.key(8), (6, 5), jnp.float64)
    norm = float(jnp.sum(target**2))
    _, losses = _fit(p, x0, lambda w: jnp.sum((w - target) ** 2) / norm, steps=2000, lr=5e-2)
    assert float(losses[-1]) < 1e-4


def test_nnx_function_comes_from_the_declaration(monkeypatch):
    fn = torch_function(Simplex)
    monkeypatch.setattr(pnx, "simplex", fn, raising=False)
    assert "axis" in inspect.signature(fn).parameters
    test = doctest.DocTestParser().get_doctest(Simplex.nnx_doc, {}, "Simplex", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    layer = fn(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), axis=-2)
    np.testing.assert_allclose(jnp.sum(layer.kernel[...], 0), 1.0, rtol=1e-6)
