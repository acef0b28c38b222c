"""paramx ordered: strictly increasing along an axis (first entry + cumulative positive steps)."""

from __future__ import annotations

import doctest
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.ordered import Ordered, isotonic_regression, ordered


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


@pytest.mark.parametrize("map_", ["softplus", "exp"])
def test_increasing_values_round_trip_exactly(map_):
    w = jnp.sort(_normal((4, 6)), axis=-1)
    tree = ordered({"w": w}, "w", map=map_)
    np.testing.assert_allclose(jax.jit(px.materialize)(tree)["w"], w, rtol=1e-12, atol=1e-12)
    p = Ordered(map=map_)
    x = _normal((3, 7), seed=1)
    y = p.forward(x)
    assert bool(jnp.all(jnp.diff(y, axis=-1) > 0))
    np.testing.assert_allclose(y[:, 0], x[:, 0])
    np.testing.assert_allclose(p.right_inverse(y), x, rtol=1e-9, atol=1e-9)


def test_axis_option_orders_the_chosen_axis():
    p = Ordered(axis=0)
    y = p.forward(_normal((5, 3)))
    assert bool(jnp.all(jnp.diff(y, axis=0) > 0))
    np.testing.assert_allclose(p.forward(p.right_inverse(y)), y, rtol=1e-12)
    s = p.sample(jax.random.key(0), (5, 3), jnp.float64)
    assert bool(jnp.all(jnp.diff(s, axis=0) > 0)) and bool(p.in_manifold(s))


def test_non_increasing_values_are_refused_naming_the_path():
    with pytest.raises(ValueError, match=r"strictly increasing.*\(at fc/kernel\)"):
        ordered({"fc": {"kernel": jnp.array([[0.0, 1.0], [1.0, 1.0]])}}, "fc/kernel")
    tree = ordered({"fc": {"kernel": jnp.array([0.0, 1.0, 2.0])}}, "fc/kernel")
    with pytest.raises(ValueError, match="fc/kernel"):
        px.assign(tree, "fc/kernel", jnp.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"scalar.*\(at w\)"):
        ordered({"w": jnp.ones(())}, "w")
    with pytest.raises(TypeError, match="floating-point"):
        ordered({"w": jnp.arange(3)}, "w")
    with pytest.raises(ValueError, match="map"):
        Ordered(map="square")


def test_under_jit_a_tie_gives_minus_inf_and_a_decrease_nan():
    x = jax.jit(Ordered().right_inverse)(jnp.array([0.0, 1.0, 1.0, 0.5]))
    assert bool(jnp.isfinite(x[:2]).all()) and float(x[2]) == -np.inf and bool(jnp.isnan(x[3]))


def test_isotonic_regression_is_the_nearest_non_decreasing_vector():
    ys = _normal((100, 5), seed=2)
    iso = isotonic_regression(ys)
    assert bool(jnp.all(jnp.diff(iso, axis=-1) >= -1e-12))
    # Brute force: the nearest non-decreasing vector is constant on blocks of consecutive
    # entries (the block means); try every partition of 5 entries into blocks.
    ys_np, iso_np = np.asarray(ys), np.asarray(iso)
    for y, got in zip(ys_np[:30], iso_np[:30]):
        best = np.inf
        for cuts in itertools.product([False, True], repeat=4):
            bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], 5]
            blocks = itertools.pairwise(bounds)
            v = np.concatenate([np.full(b - a, y[a:b].mean()) for a, b in blocks])
            if np.all(np.diff(v) >= 0):
                best = min(best, np.sum((v - y) ** 2))
        np.testing.assert_allclose(np.sum((got - y) ** 2), best, rtol=1e-10, atol=1e-12)


def test_distance_and_membership_per_matrix():
    p = Ordered()
    x = jnp.array([[[0.0, 2.0, 1.0]], [[0.0, 1.0, 2.0]]])
    np.testing.assert_allclose(p.distance(x), [np.sqrt(0.5), 0.0], atol=1e-12)
    np.testing.assert_array_equal(p.in_manifold(x), [False, True])
    assert p.distance(jnp.array([1.0, 0.0])).shape == ()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_are_kept(dtype):
    w = Ordered().sample(jax.random.key(0), (3, 6), dtype)
    assert w.dtype == dtype and bool(jnp.all(jnp.diff(w.astype(jnp.float32), axis=-1) > 0))
    tree = ordered({"w": w}, "w")
    out = px.materialize(tree)["w"]
    assert out.dtype == dtype and tree["w"].originals[0].dtype == dtype
    tol = 5e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(w, np.float64), atol=tol)


def test_stacks_are_ordered_per_tensor():
    stack = Ordered().sample(jax.random.key(0), (5, 3, 4), jnp.float64)
    node = ordered({"k": stack}, "k", batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    np.testing.assert_allclose(px.tensor.materialize(node), stack, rtol=1e-12, atol=1e-12)


def test_a_stack_with_a_non_negative_axis_is_checked_per_tensor():
    # axis=0 counts the axes of each tensor, not the stack's: the eager check must not order
    # along the stack axis (a valid stack was refused) nor miss a decrease along the tensor's
    # own axis 0 (it gave NaN originals under vmap).
    good = jnp.array([[0.0, 1.0, 2.0], [-5.0, -4.0, -3.0]])  # two vectors, each increasing
    tree = ordered({"w": good}, "w", axis=0, batch_axes=1)
    np.testing.assert_allclose(px.materialize(tree)["w"], good, atol=1e-6)
    bad = jnp.array([[0.0, 2.0, 1.0], [1.0, 3.0, 2.0]])  # increasing along the stack only
    with pytest.raises(ValueError, match=r"strictly increasing.*\(at w\)"):
        ordered({"w": bad}, "w", axis=0, batch_axes=1)
    with pytest.raises(ValueError, match=r"strictly increasing.*\(at w\)"):
        px.assign(tree, "w", bad)
    layer = nnx.vmap(lambda k: nnx.Linear(2, 3, rngs=nnx.Rngs(k)))(
        jax.random.split(jax.random.key(0), 2)
    )
    layer.kernel[...] = jnp.stack([jnp.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], jnp.float32)] * 2)
    pnx.ordered(layer, axis=0, batch_axes=1)
    assert bool(jnp.all(jnp.isfinite(layer.kernel[...])))
    with pytest.raises(ValueError, match="strictly increasing"):
        layer.kernel = jnp.stack([jnp.array([[3.0, 1.0, 2.0], [0.0, 4.0, 5.0]], jnp.float32)] * 2)


def test_samples_are_sorted_standard_normals():
    s = Ordered().sample(jax.random.key(3), (3000, 3), jnp.float64)
    assert bool(jnp.all(jnp.diff(s, axis=-1) > 0))
    # Order statistics of 3 N(0,1): means ∓3/(2√π) and 0; the pooled entries are N(0, 1).
    m = 3 / (2 * np.sqrt(np.pi))
    np.testing.assert_allclose(jnp.mean(s, 0), [-m, 0.0, m], atol=0.06)
    assert abs(float(jnp.var(s)) - 1) < 0.06 and abs(float(jnp.mean(s))) < 0.04
    # The median of 3 standard normals has variance ≈ 0.4487 (numerical integration).
    assert abs(float(jnp.var(s[:, 1])) - 0.4487) < 0.05


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_keeps_the_value_ordered(dtype):
    n = 8
    target = 3 * _normal((n, n), seed=3, dtype=dtype)
    weights = jnp.abs(_normal((n, n), seed=4, dtype=dtype)) + 0.1
    p = Ordered()
    x0 = p.sample(jax.random.key(5), (n, n), dtype)
    w, _ = _fit(p, x0, lambda w: jnp.sum(weights * (w - target) ** 2))
    eps = float(jnp.finfo(dtype).eps)
    assert bool(jnp.all(jnp.isfinite(w)))
    scale = max(1.0, float(jnp.max(jnp.abs(w))))
    assert bool(p.in_manifold(w, atol=10 * n * eps * scale))
    assert float(p.distance(w)) <= 10 * n * eps * scale


def test_fitting_power_reaches_a_sampled_target():
    p = Ordered()
    target = p.sample(jax.random.key(7), (6, 5), jnp.float64)
    x0 = p.sample(jax.random.key(8), (6, 5), jnp.float64)
    norm = float(jnp.sum(target**2))
    _, losses = _fit(p, x0, lambda w: jnp.sum((w - target) ** 2) / norm, steps=2000, lr=5e-2)
    assert float(losses[-1]) < 1e-4


def test_nnx_function_comes_from_the_declaration(monkeypatch):
    fn = torch_function(Ordered)
    monkeypatch.setattr(pnx, "ordered", fn, raising=False)
    assert {"axis", "map", "batch_axes"} <= set(inspect.signature(fn).parameters)
    test = doctest.DocTestParser().get_doctest(Ordered.nnx_doc, {}, "Ordered", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    layer.kernel = nnx.Param(jnp.sort(layer.kernel[...], axis=0))
    layer = fn(layer, axis=0, map="exp")
    assert bool(jnp.all(jnp.diff(layer.kernel[...], axis=0) > 0))


def test_check_value_refuses_ties_along_the_axis_only():
    Ordered(axis=0).check_value(jnp.array([[0.0, 0.0], [1.0, 1.0]]))  # increasing down columns
    with pytest.raises(ValueError, match="strictly increasing along axis -1"):
        Ordered().check_value(jnp.array([[0.0, 0.0], [1.0, 1.0]]))
