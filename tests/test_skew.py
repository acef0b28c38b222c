"""Skew: skew-symmetric matrices (Xᵀ = −X), geotorch's `skew`."""

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
from paramx._src.parametrizations.skew import Skew, skew


def _kernel(shape=(4, 4), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def test_the_value_is_skew_and_registration_keeps_the_skew_part():
    k = _kernel()
    tree = skew({"kernel": k}, "kernel")
    w = jax.jit(px.materialize)(tree)["kernel"]
    np.testing.assert_array_equal(w, -w.T)
    np.testing.assert_allclose(w, (k - k.T) / 2, rtol=1e-6)
    assert bool(Skew().in_manifold(w)) and float(Skew().distance(w)) == 0.0


@pytest.mark.parametrize("lower", [True, False])
def test_right_inverse_is_exact_on_skew_values_and_assignment_projects(lower):
    s = Skew().sample(jax.random.key(0), (5, 5), jnp.float64)
    tree = skew({"w": s}, "w", lower)
    np.testing.assert_array_equal(px.materialize(tree)["w"], s)
    a = _kernel((5, 5), seed=1, dtype=jnp.float64)
    assigned = px.materialize(px.assign(tree, "w", a))["w"]
    np.testing.assert_allclose(assigned, (a - a.T) / 2, rtol=1e-12)


def test_the_projection_is_the_nearest_skew_matrix():
    a = _kernel((4, 4), seed=3, dtype=jnp.float64)
    p = Skew()
    proj = p.forward(p.right_inverse(a))
    # Closed form: the residual A − P(A) is symmetric, orthogonal to every skew matrix...
    residual = a - proj
    np.testing.assert_allclose(residual, residual.T, atol=1e-12)
    # ... and brute force: no skew matrix near P(A) is nearer to A.
    others = proj[None] + 0.3 * p.sample(jax.random.key(4), (2000, 4, 4), jnp.float64)
    best = float(jnp.linalg.norm(residual))
    assert float(jnp.min(jnp.linalg.norm(a[None] - others, axis=(-2, -1)))) > best
    np.testing.assert_allclose(p.distance(a), best, rtol=1e-12)


@pytest.mark.parametrize("lower", [True, False])
def test_only_one_strict_triangle_is_learned(lower):
    tree = skew({"w": _kernel()}, "w", lower=lower)
    params, _ = px.split_state(tree)
    grads = jax.grad(lambda p: jnp.sum(px.materialize(p)["w"] * _kernel(seed=2)))(params)
    g = grads["w"].original
    learned, frozen = (jnp.tril(g, -1), jnp.triu(g)) if lower else (jnp.triu(g, 1), jnp.tril(g))
    np.testing.assert_array_equal(frozen, 0.0)
    mask = np.tri(4, k=-1, dtype=bool) if lower else np.tri(4, k=-1, dtype=bool).T
    assert float(jnp.abs(learned[mask]).min()) > 0


def test_stacks_conv_kernels_jit_vmap_and_grad():
    conv = _kernel((3, 3, 4, 4))
    w = px.materialize(skew({"k": conv}, "k"))["k"]
    np.testing.assert_array_equal(w, -_t(w))
    assert w.shape == conv.shape
    stack = _kernel((5, 4, 4))
    node = skew({"k": stack}, "k", batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    np.testing.assert_allclose(px.tensor.materialize(node), (stack - _t(stack)) / 2, rtol=1e-6)
    p = Skew()
    vm = jax.jit(jax.vmap(p.forward))(stack)
    np.testing.assert_array_equal(vm, p.forward(stack))
    g = jax.grad(lambda x: jnp.sum(p.forward(x) ** 2))(stack)
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.complex64])
def test_dtypes_are_kept(dtype):
    k = _kernel(dtype=jnp.float32).astype(dtype)
    if dtype == jnp.complex64:
        k = k + 1j * _kernel(seed=5).astype(dtype)
    w = px.materialize(skew({"w": k}, "w"))["w"]
    assert w.dtype == dtype
    np.testing.assert_array_equal(w, -w.T)  # skew-symmetric, not skew-Hermitian, for complex
    assert bool(Skew().in_manifold(w))
    s = Skew().sample(jax.random.key(0), (2, 3, 3), dtype)
    assert s.dtype == dtype and bool(jnp.all(Skew().in_manifold(s)))


def test_bad_tensors_and_options_are_refused_with_the_path():
    with pytest.raises(ValueError, match=r"square.*\(at fc/kernel\)"):
        skew({"fc": {"kernel": jnp.ones((3, 4))}}, "fc/kernel")
    with pytest.raises(TypeError, match=r"floating-point.*fc/kernel"):
        skew({"fc": {"kernel": jnp.ones((3, 3), jnp.int32)}}, "fc/kernel")
    with pytest.raises(TypeError, match="lower must be True or False"):
        Skew(lower="yes")
    tree = skew({"w": jnp.zeros((3, 3))}, "w")
    with pytest.raises(ValueError, match=r"(?i)shape"):
        px.assign(tree, "w", jnp.zeros((4, 4)))


def test_in_manifold_and_distance_say_no_off_the_set():
    p = Skew()
    x = p.sample(jax.random.key(0), (3, 4, 4), jnp.float64)
    off = x + 0.1 * jnp.eye(4, dtype=jnp.float64)[None]
    assert p.in_manifold(off).shape == (3,) and not bool(jnp.any(p.in_manifold(off)))
    np.testing.assert_allclose(p.distance(off), 0.2, rtol=1e-12)  # ‖0.1·I‖_F over 4 entries


def test_nnx_function_comes_from_the_declaration():
    fn = torch_function(Skew)
    params = list(inspect.signature(fn).parameters)
    assert params[:3] == ["module", "name", "lower"] and "batch_axes" in params
    layer = fn(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(layer.kernel, -layer.kernel.T)
    layer.kernel = _kernel(seed=3)
    np.testing.assert_allclose(layer.kernel, (_kernel(seed=3) - _kernel(seed=3).T) / 2, rtol=1e-6)


def test_samples_are_skew_gaussian():
    s = Skew().sample(jax.random.key(0), (4000, 3, 3), jnp.float64)
    np.testing.assert_array_equal(s, -_t(s))
    below = s[:, 1:, 0].ravel()  # 8,000 draws of N(0, 1/2)
    assert abs(float(jnp.var(below)) - 0.5) < 0.025 and abs(float(jnp.mean(below))) < 0.04
    assert abs(float(jnp.corrcoef(s[:, 1, 0], s[:, 2, 0])[0, 1])) < 0.06
    assert abs(float(jnp.corrcoef(s[:, 1, 0], s[:, 2, 1])[0, 1])) < 0.06
    # Orthogonally invariant: Q S Qᵀ has the same entry variance for a fixed rotation Q.
    q, _ = jnp.linalg.qr(_kernel((3, 3), seed=9, dtype=jnp.float64))
    r = q[None] @ s @ q.T[None]
    assert abs(float(jnp.var(r[:, 1:, 0])) - 0.5) < 0.025


def _train(p, x0, target, steps):
    def loss(x):
        return jnp.sum((p.forward(x) - target) ** 2)

    with jax.numpy_dtype_promotion("standard"):
        opt = optax.adam(1e-2)

        @jax.jit
        def run(x):
            def step(carry, _):
                x, s = carry
                g = jax.grad(loss)(x)
                u, s = opt.update(g, s, x)
                return (optax.apply_updates(x, u), s), None

            (x, _), _ = jax.lax.scan(step, (x, opt.init(x)), None, length=steps)
            return x

        x = run(x0)
    return x, loss(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_quality_after_training_the_value_stays_skew(dtype):
    p, n = Skew(), 6
    a = _kernel((n, n), seed=1, dtype=dtype)
    target = a @ a.T  # a quadratic loss whose minimum is off the set
    x, _ = _train(p, p.right_inverse(_kernel((n, n), dtype=dtype)), target, 1000)
    w = p.forward(x)
    scale = max(float(jnp.max(jnp.abs(w))), 1.0)
    assert float(jnp.max(jnp.abs(w + w.T))) <= 10 * n * float(jnp.finfo(dtype).eps) * scale


def test_fitting_power_reaches_a_sampled_target():
    p = Skew()
    target = p.sample(jax.random.key(7), (5, 5), jnp.float64)
    _, loss = _train(p, p.right_inverse(_kernel((5, 5), seed=8, dtype=jnp.float64)), target, 1000)
    assert float(loss / jnp.sum(target**2)) < 1e-4


@pytest.mark.parametrize("lower", [True, False])
def test_torch_state_dict_matches_geotorch_with_lower_flipped(lower):
    from paramx import interop

    k = _kernel()
    tree = skew({"fc": {"kernel": k}}, "fc/kernel", lower)
    sd = interop.to_torch_state_dict(tree)
    original = np.asarray(sd["fc.parametrizations.weight.original"])
    # geotorch's Skew(lower=not lower) on the torch weight (out, in): A − Aᵀ of one triangle.
    a = np.triu(original, 1) if lower else np.tril(original, -1)
    np.testing.assert_allclose((a - a.T).T, px.materialize(tree)["fc"]["kernel"], rtol=1e-6)
    back = interop.from_torch_state_dict(sd, tree)
    np.testing.assert_array_equal(
        px.materialize(back)["fc"]["kernel"], px.materialize(tree)["fc"]["kernel"]
    )
