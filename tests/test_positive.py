"""paramx positive / interval: elementwise bounds (softplus / exp / sigmoid)."""

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
from paramx._src.parametrizations.positive import (
    Interval,
    Positive,
    interval,
    positive,
    softplus_inverse,
)


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _fit(p, x0, loss, steps=1000, lr=1e-2):
    """``steps`` Adam steps on the original of ``p`` from the value ``x0``, one jit + scan."""
    node = px.tensor.register(x0, p)
    opt = optax.adam(lr)

    def value(n):
        return px.tensor.materialize(n)

    @jax.jit
    def run(node):
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(node)

            def step(carry, _):
                n, s = carry
                lval, g = jax.value_and_grad(lambda n: loss(value(n)))(n)
                upd, s = opt.update(g, s, n)
                return (optax.apply_updates(n, upd), s), lval

            (node, _), losses = jax.lax.scan(step, (node, state), None, length=steps)
        return value(node), losses

    return run(node)


# ----- Positive ---------------------------------------------------------------------------------


@pytest.mark.parametrize("map_", ["softplus", "exp"])
def test_positive_values_are_positive_and_round_trip_exactly(map_):
    w = jnp.abs(_normal((4, 3))) + 1e-3
    tree = positive({"w": w}, "w", map_)
    out = jax.jit(px.materialize)(tree)["w"]
    assert bool(jnp.all(out > 0))
    np.testing.assert_allclose(out, w, rtol=1e-12)
    x = _normal((50,), seed=1) * 10
    p = Positive(map_)
    np.testing.assert_allclose(p.right_inverse(p.forward(x)), x, rtol=1e-10, atol=1e-10)


def test_inverse_softplus_is_stable_for_large_and_tiny_values():
    y = jnp.array([1e-30, 1e-10, 1e-3, 1.0, 30.0, 1e5, 1e30], jnp.float64)
    x = softplus_inverse(y)
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(jax.nn.softplus(x), y, rtol=1e-14)
    np.testing.assert_allclose(x[-2:], y[-2:], rtol=1e-14)  # softplus⁻¹(y) = y for large y
    y32 = jnp.array([1e-37, 1e-6, 1e3, 1e38], jnp.float32)
    x32 = softplus_inverse(y32)
    assert bool(jnp.all(jnp.isfinite(x32)))
    np.testing.assert_allclose(jax.nn.softplus(x32), y32, rtol=1e-6)


def test_positive_refuses_nonpositive_values_naming_the_path():
    with pytest.raises(ValueError, match=r"> 0.*\(at fc/kernel\)"):
        positive({"fc": {"kernel": jnp.array([[1.0, -0.5]])}}, "fc/kernel")
    with pytest.raises(ValueError, match=r"fc/kernel"):
        positive({"fc": {"kernel": jnp.zeros((2, 2))}}, "fc/kernel")
    tree = positive({"fc": {"kernel": jnp.ones((2, 2))}}, "fc/kernel")
    with pytest.raises(ValueError, match=r"fc/kernel"):
        px.assign(tree, "fc/kernel", -jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="floating-point"):
        positive({"w": jnp.ones((2,), jnp.int32)}, "w")
    with pytest.raises(ValueError, match="map"):
        Positive("relu")


def test_positive_under_jit_gives_non_finite_originals_instead_of_an_error():
    p = Positive()
    x = jax.jit(p.right_inverse)(jnp.array([1.0, 0.0, -1.0]))
    assert bool(jnp.isfinite(x[0])) and not bool(jnp.any(jnp.isfinite(x[1:])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_positive_dtypes_are_kept(dtype):
    w = (jnp.abs(_normal((3, 3), dtype=jnp.float32)) + 0.1).astype(dtype)
    tree = positive({"w": w}, "w")
    out = px.materialize(tree)["w"]
    assert out.dtype == dtype and tree["w"].originals[0].dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(w, np.float64), rtol=tol)
    s = Positive().sample(jax.random.key(0), (4, 3), dtype)
    assert s.dtype == dtype and bool(jnp.all(s > 0))


def test_positive_batches_and_distance():
    stack = jnp.abs(_normal((5, 3, 2))) + 0.1
    node = positive({"k": stack}, "k", batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    np.testing.assert_allclose(px.tensor.materialize(node), stack, rtol=1e-12)
    p = Positive()
    x = jnp.array([[[1.0, -3.0], [-4.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]])
    np.testing.assert_allclose(p.distance(x), [5.0, 0.0])
    np.testing.assert_array_equal(p.in_manifold(x), [False, True])
    assert p.distance(jnp.array([-1.0, 2.0])).shape == ()


def test_positive_samples_are_exponential_1():
    s = Positive().sample(jax.random.key(0), (4000,), jnp.float64)
    # Exponential(1): mean 1, variance 1, P(s > 1) = e^-1; 4000 draws, about 4 sigma.
    assert abs(float(jnp.mean(s)) - 1) < 0.07
    assert abs(float(jnp.var(s)) - 1) < 0.2
    assert abs(float(jnp.mean(s > 1)) - np.exp(-1)) < 0.03
    assert abs(float(jnp.mean(s > 3)) - np.exp(-3)) < 0.015


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("p", [Positive(), Positive("exp"), Interval(-1.0, 2.0)], ids=repr)
def test_training_keeps_the_value_in_the_set(p, dtype):
    n = 8
    target = 3 * _normal((n, n), seed=3, dtype=dtype)
    weights = jnp.abs(_normal((n, n), seed=4, dtype=dtype)) + 0.1
    x0 = p.sample(jax.random.key(5), (n, n), dtype)
    w, _ = _fit(p, x0, lambda w: jnp.sum(weights * (w - target) ** 2))
    eps = float(jnp.finfo(dtype).eps)
    assert bool(jnp.all(jnp.isfinite(w)))
    assert bool(p.in_manifold(w, atol=10 * n * eps))
    assert float(p.distance(w)) <= 10 * n * eps


@pytest.mark.parametrize("p", [Positive(), Positive("exp"), Interval(-1.0, 2.0)], ids=repr)
def test_fitting_power_reaches_a_sampled_target(p):
    target = p.sample(jax.random.key(7), (6, 5), jnp.float64)
    x0 = p.sample(jax.random.key(8), (6, 5), jnp.float64)
    norm = float(jnp.sum(target**2))
    # lr 5e-2: an entry drawn near 0 has an original near -10 that must travel several units.
    _, losses = _fit(p, x0, lambda w: jnp.sum((w - target) ** 2) / norm, steps=2000, lr=5e-2)
    assert float(losses[-1]) < 1e-4


# ----- Interval ---------------------------------------------------------------------------------


def test_interval_values_lie_inside_and_round_trip_exactly():
    w = jnp.array([[-0.99, 0.0], [1.5, 1.999]])
    tree = interval({"w": w}, "w", -1.0, 2.0)
    out = px.materialize(tree)["w"]
    np.testing.assert_allclose(out, w, rtol=1e-12, atol=1e-12)
    p = Interval(-1.0, 2.0)
    x = _normal((50,)) * 5
    y = p.forward(x)
    assert bool(jnp.all((y > -1) & (y < 2)))
    np.testing.assert_allclose(p.right_inverse(y), x, rtol=1e-8, atol=1e-8)


def test_interval_is_accurate_next_to_a_bound_of_a_narrow_interval():
    # (y - low) / (high - low) rounded to exactly 1 for a value strictly inside (-1, 1e-8):
    # the original was +inf (the parameter then never moved: zero gradient), and the forward
    # low + w sigmoid(x) cannot tell 5e-9 from 0 in float32.
    p = Interval(-1.0, 1e-8)
    value = jnp.array([5e-9, 2e-9, -0.5, -1.0 + 1e-6], jnp.float32)
    tree = px.register_parametrization({"w": value}, "w", p)
    (original,) = px.originals(tree, "w")
    assert bool(jnp.all(jnp.isfinite(original)))
    np.testing.assert_allclose(px.materialize(tree)["w"], value, rtol=1e-5, atol=1e-14)
    grad = jax.grad(lambda t: jnp.sum(px.materialize(t)["w"]))(tree)["w"].original
    assert bool(jnp.all(grad > 0))


def test_interval_options_and_values_are_validated_naming_the_path():
    with pytest.raises(ValueError, match="low < high"):
        Interval(1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        Interval(0.0, float("inf"))
    with pytest.raises(TypeError, match="real number"):
        Interval("0", 1.0)
    with pytest.raises(ValueError, match="map"):
        Interval(0.0, 1.0, map="tanh")
    with pytest.raises(ValueError, match=r"strictly inside.*\(at fc/kernel\)"):
        interval({"fc": {"kernel": jnp.array([0.5, 1.0])}}, "fc/kernel", 0.0, 1.0)
    tree = interval({"fc": {"kernel": jnp.array([0.5, 0.7])}}, "fc/kernel", 0.0, 1.0)
    with pytest.raises(ValueError, match="fc/kernel"):
        px.assign(tree, "fc/kernel", jnp.array([-0.1, 0.5]))


def test_interval_distance_and_membership():
    p = Interval(0.0, 1.0)
    x = jnp.array([[-3.0, 0.5], [0.2, 5.0]])
    np.testing.assert_allclose(p.distance(x), 5.0)
    assert not bool(p.in_manifold(x))
    assert bool(p.in_manifold(jnp.array([[0.0, 1.0]])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interval_dtypes(dtype):
    p = Interval(-2.0, 3.0)
    s = p.sample(jax.random.key(0), (64, 8), dtype)
    assert s.dtype == dtype and bool(jnp.all((s > -2) & (s < 3)))
    out = px.materialize(interval({"w": s}, "w", -2.0, 3.0))["w"]
    assert out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float64), np.asarray(s, np.float64), atol=5e-2 if dtype else 0
    )


def test_interval_samples_are_uniform():
    s = Interval(-1.0, 3.0).sample(jax.random.key(1), (4000,), jnp.float64)
    # Uniform(-1, 3): mean 1, variance 16/12; each quarter holds a quarter of the draws.
    assert abs(float(jnp.mean(s)) - 1) < 0.08
    assert abs(float(jnp.var(s)) - 16 / 12) < 0.1
    counts = np.histogram(np.asarray(s), bins=4, range=(-1, 3))[0] / 4000
    np.testing.assert_allclose(counts, 0.25, atol=0.03)


# ----- paramx.nnx --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Positive, Interval])
def test_nnx_functions_come_from_the_declarations(cls, monkeypatch):
    fn = torch_function(cls)
    monkeypatch.setattr(pnx, cls.torch_function, fn, raising=False)
    assert "batch_axes" in inspect.signature(fn).parameters
    test = doctest.DocTestParser().get_doctest(cls.nnx_doc, {}, cls.__name__, None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    layer = nnx.LayerNorm(3, rngs=nnx.Rngs(0))  # scale = 1: inside both sets
    options = {} if cls is Positive else {"low": 0.0, "high": 2.0}
    layer = fn(layer, "scale", **options)
    np.testing.assert_allclose(layer.scale[...], 1.0, rtol=1e-6)


def test_check_value_runs_before_anything_is_traced_also_in_nnx_and_stacks():
    with pytest.raises(ValueError, match="> 0"):
        Positive().check_value(jnp.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="strictly inside"):
        Interval(0.0, 1.0).check_value(jnp.array([0.5, 1.0]))
    Positive().check_value(jnp.ones(2))  # passes silently
    # paramx.nnx compiles the registration, and a stack is registered under vmap: the core
    # runs the declared check eagerly before either, so a zero bias is refused, not -inf.
    with pytest.raises(ValueError, match=r"> 0.*\(at Linear\.bias\)"):
        torch_function(Positive)(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "bias")
    with pytest.raises(ValueError, match=r"> 0.*\(at b\)"):
        px.register_parametrization({"b": jnp.zeros((2, 3))}, "b", Positive(), batch_axes=1)
    layer = torch_function(Positive)(
        nnx.Linear(3, 2, rngs=nnx.Rngs(0), bias_init=nnx.initializers.ones), "bias"
    )
    with pytest.raises(ValueError, match=r"> 0"):
        layer.bias = jnp.array([1.0, -1.0])
