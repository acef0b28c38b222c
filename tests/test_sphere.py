"""Sphere: tensors, or slices along any axes, of norm `radius` (geotorch's `sphere`)."""

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
from paramx._src.parametrizations.sphere import Sphere, sphere


def _x(shape=(4, 3), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _norm(x, axis=None):
    """The norm in float64 (complex128 for complex values), as a NumPy array."""
    wide = jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64
    return np.sqrt(np.sum(np.abs(np.asarray(x.astype(wide))) ** 2, axis=axis))


def test_the_whole_tensor_gets_norm_radius_and_registration_projects():
    k = _x()
    w = jax.jit(px.materialize)(sphere({"kernel": k}, "kernel", 2.5))["kernel"]
    np.testing.assert_allclose(_norm(w), 2.5, rtol=1e-6)
    np.testing.assert_allclose(w, 2.5 * np.asarray(k) / _norm(k), rtol=1e-6)


@pytest.mark.parametrize(
    "axis, shape, reduce",
    [
        (0, (4, 3), (0,)),  # Dense (in, out): each output unit's weight vector
        (-1, (4, 3), (1,)),  # each input's fan-out (geotorch's last-axis convention)
        ((0, 1, 2), (3, 3, 2, 5), (0, 1, 2)),  # conv (*spatial, in, out): each output filter
        ((-1, 0), (3, 2, 4), (0, 2)),
    ],
)
def test_unit_norm_slices_along_any_axes(axis, shape, reduce):
    k = _x(shape, dtype=jnp.float64)
    p = Sphere(axis=axis)
    w = px.materialize(sphere({"k": k}, "k", axis=axis))["k"]
    np.testing.assert_allclose(_norm(w, reduce), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w, k / _norm(k, reduce).reshape(p._norm(k, reduce).shape))
    want = tuple(n for i, n in enumerate(shape) if i not in reduce)
    assert p.in_manifold(w).shape == want and bool(jnp.all(p.in_manifold(w)))
    assert not bool(jnp.any(p.in_manifold(1.01 * w)))


def test_right_inverse_is_exact_on_the_sphere_and_assignment_projects():
    s = Sphere(3.0, axis=0).sample(jax.random.key(0), (5, 4), jnp.float64)
    tree = sphere({"w": s}, "w", 3.0, axis=0)
    np.testing.assert_allclose(px.materialize(tree)["w"], s, rtol=1e-15, atol=1e-15)
    a = _x((5, 4), seed=1, dtype=jnp.float64)
    got = px.materialize(px.assign(tree, "w", a))["w"]
    np.testing.assert_allclose(got, 3.0 * a / _norm(a, 0)[None], rtol=1e-12)


def test_the_projection_is_the_nearest_point():
    p = Sphere(1.5)
    a = 0.7 * _x((3,), seed=3, dtype=jnp.float64)
    proj = p.forward(p.right_inverse(a))
    best = float(_norm(a - proj))
    np.testing.assert_allclose(best, abs(float(_norm(a)) - 1.5), rtol=1e-12)  # closed form
    np.testing.assert_allclose(p.distance(a), best, rtol=1e-12)
    others = p.sample(jax.random.key(4), (3000, 3), jnp.float64, batch_axes=1)
    assert float(jnp.min(_norm(a[None] - others, -1))) > best


def test_zero_is_refused_at_registration_with_the_path_and_forward_is_safe():
    k = jnp.ones((4, 3), jnp.float32).at[:, 1].set(0.0)
    with pytest.raises(ValueError, match=r"zero.*\(at fc/kernel\)"):
        sphere({"fc": {"kernel": k}}, "fc/kernel", axis=0)
    with pytest.raises(ValueError, match=r"zero.*fc/kernel"):
        sphere({"fc": {"kernel": jnp.zeros((4, 3))}}, "fc/kernel")
    tree = sphere({"w": jnp.ones((4, 3))}, "w", axis=0)
    with pytest.raises(ValueError, match=r"zero.*\(at w\)"):
        px.assign(tree, "w", k)
    p = Sphere(2.0, axis=0)
    # forward at an exact zero slice: the fallback radius·e₁, with a zero (finite) gradient.
    w = p.forward(k)
    np.testing.assert_array_equal(w[:, 1], np.array([2.0, 0.0, 0.0, 0.0], np.float32))
    g = jax.grad(lambda x: jnp.sum(p.forward(x) * _x((4, 3))))(k)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g[:, 1]))) == 0.0
    # Under jit the check cannot run: the zero slice maps to the fallback point.
    np.testing.assert_array_equal(jax.jit(p.right_inverse)(k)[:, 1], w[:, 1])


def test_tiny_values_keep_their_direction():
    v = jnp.array([3.0, -4.0], jnp.float32)
    for scale in (1e-30, 1e-37, 1e30):  # their squares underflow or overflow in float32
        w = Sphere().forward(v * jnp.float32(scale))
        np.testing.assert_allclose(w, v / 5, rtol=1e-6)
    g = jax.grad(lambda x: Sphere().forward(x)[0])(v * jnp.float32(1e-30))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_gradients_match_the_closed_form_and_vmap_works():
    x = _x((5,), seed=2, dtype=jnp.float64)
    c = _x((5,), seed=3, dtype=jnp.float64)
    g = jax.grad(lambda x: jnp.dot(Sphere(2.0).forward(x), c))(x)
    n = _norm(x)
    want = 2.0 * (c / n - x * jnp.dot(x, c) / n**3)
    np.testing.assert_allclose(g, want, rtol=1e-12)
    stack = _x((6, 5, 3), dtype=jnp.float64)
    vm = jax.jit(jax.vmap(Sphere().forward))(stack)
    np.testing.assert_allclose(_norm(vm, (1, 2)), 1.0, rtol=1e-12)


def test_stacks_count_axes_without_the_stack():
    stack = _x((5, 4, 3))
    node = sphere({"k": stack}, "k", axis=0, batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    w = px.tensor.materialize(node)
    np.testing.assert_allclose(_norm(w, 1), 1.0, rtol=1e-6)  # axis 0 of each (4, 3) kernel
    whole = px.tensor.materialize(sphere({"k": stack}, "k", batch_axes=1)["k"])
    np.testing.assert_allclose(_norm(whole, (1, 2)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.complex64])
def test_dtypes_are_kept(dtype):
    k = _x((4, 3)).astype(dtype)
    if dtype == jnp.complex64:
        k = k + 1j * _x((4, 3), seed=5).astype(dtype)
    p = Sphere(2.0, axis=0)
    w = px.materialize(sphere({"w": k}, "w", 2.0, axis=0))["w"]
    assert w.dtype == dtype
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(_norm(w, 0), 2.0, rtol=tol)
    assert bool(jnp.all(p.in_manifold(w)))
    s = p.sample(jax.random.key(0), (4, 3), dtype)
    assert s.dtype == dtype and bool(jnp.all(p.in_manifold(s)))
    with pytest.raises(TypeError, match=r"floating-point.*fc/kernel"):
        sphere({"fc": {"kernel": jnp.ones((3, 3), jnp.int32)}}, "fc/kernel")


def test_options_are_validated():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="radius must be positive and finite"):
            Sphere(bad)
    for bad in ("1", True, jnp.ones((), jnp.float32)):
        with pytest.raises(TypeError, match="radius must be a positive real"):
            Sphere(bad)
    for bad in (1.5, "0", True, (0, 1.0)):
        with pytest.raises(TypeError, match="axis must be None"):
            Sphere(axis=bad)
    with pytest.raises(ValueError, match=r"axis=\(\)"):
        Sphere(axis=())
    assert Sphere(axis=[0, 1]).axis == (0, 1) and Sphere(2).radius == 2.0
    with pytest.raises(ValueError, match=r"twice.*\(at fc/kernel\)"):
        sphere({"fc": {"kernel": jnp.ones((4, 3))}}, "fc/kernel", axis=(0, -2))
    with pytest.raises(IndexError, match=r"out of range.*fc/kernel"):
        sphere({"fc": {"kernel": jnp.ones((4, 3))}}, "fc/kernel", axis=2)


def test_samples_are_uniform_on_the_sphere():
    r, d, n = 2.0, 3, 3000
    s = Sphere(r, axis=-1).sample(jax.random.key(0), (n, d), jnp.float64)
    np.testing.assert_allclose(_norm(s, -1), r, rtol=1e-12)
    # Mean 0 and second moment (r²/d)·I: standard errors about 0.02 and 0.03.
    assert float(jnp.max(jnp.abs(jnp.mean(s, 0)))) < 0.1
    second = (s.T @ s) / n
    np.testing.assert_allclose(second, (r**2 / d) * np.eye(d), atol=0.12)
    # Archimedes: on the 2-sphere one coordinate / r is uniform on [-1, 1]. Kolmogorov-Smirnov
    # distance (1% critical value 1.63/√n ≈ 0.030).
    t = np.sort(np.asarray(s[:, 0]) / r)
    ecdf = np.arange(1, n + 1) / n
    assert np.max(np.abs(ecdf - (t + 1) / 2)) < 0.035
    # The default batch convention: all but the last two axes are a batch (axis=None).
    m = Sphere().sample(jax.random.key(1), (500, 2, 2), jnp.float64)
    np.testing.assert_allclose(_norm(m, (1, 2)), 1.0, rtol=1e-12)
    assert abs(float(jnp.mean(m[:, 0, 0] ** 2)) - 0.25) < 0.03  # E[x₁²] = 1/d


def test_the_conformance_convention_batches_and_registers_back():
    p = Sphere()
    x = p.sample(jax.random.key(0), (3, 5, 3), jnp.float32)
    assert p.in_manifold(x).shape == (3,) and bool(jnp.all(p.in_manifold(x)))
    node = px.tensor.register(x, p, batch_axes=1)
    np.testing.assert_allclose(px.tensor.materialize(node), x, rtol=1e-6, atol=1e-7)
    one = px.sampler(p)(jax.random.key(1), (4, 3))
    np.testing.assert_allclose(_norm(one), 1.0, rtol=1e-6)
    conv = p.sample(jax.random.key(2), (3, 3, 2, 4), batch_axes=0)
    np.testing.assert_allclose(_norm(conv), 1.0, rtol=1e-6)
    assert p.distance(conv, batch_axes=0).shape == ()


def test_nnx_function_comes_from_the_declaration():
    fn = torch_function(Sphere)
    sig = inspect.signature(fn)
    assert list(sig.parameters)[:3] == ["module", "name", "radius"]
    assert sig.parameters["axis"].kind is inspect.Parameter.KEYWORD_ONLY
    layer = fn(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), "kernel", 2.0, axis=0)
    np.testing.assert_allclose(_norm(layer.kernel, 0), 2.0, rtol=1e-6)


def _train(p, x0, target, steps):
    def loss(x):
        return jnp.sum((p.forward(x) - target) ** 2)

    with jax.numpy_dtype_promotion("standard"):
        opt = optax.adam(1e-2)

        @jax.jit
        def run(x):
            def step(carry, _):
                x, s = carry
                u, s = opt.update(jax.grad(loss)(x), s, x)
                return (optax.apply_updates(x, u), s), None

            (x, _), _ = jax.lax.scan(step, (x, opt.init(x)), None, length=steps)
            return x

        x = run(x0)
    return x, loss(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_quality_after_training_the_value_stays_on_the_sphere(dtype):
    p, d = Sphere(2.0, axis=0), 6
    a = _x((d, d), seed=1, dtype=dtype)
    target = a @ a.T  # a quadratic loss whose minimum is off the set
    x, _ = _train(p, p.right_inverse(_x((d, 4), dtype=dtype)), target[:, :4], 1000)
    assert float(jnp.max(p.distance(p.forward(x)))) <= 10 * d * float(jnp.finfo(dtype).eps) * 2


def test_fitting_power_reaches_a_sampled_target():
    p = Sphere(1.0, axis=0)
    target = p.sample(jax.random.key(7), (5, 4), jnp.float64)
    _, loss = _train(p, p.right_inverse(_x((5, 4), seed=8, dtype=jnp.float64)), target, 1000)
    assert float(loss / jnp.sum(target**2)) < 1e-4


def test_torch_state_dict_axis_0_is_geotorchs_last_axis_sphere():
    from paramx import interop

    k = _x((4, 3), dtype=jnp.float64)
    tree = sphere({"fc": {"kernel": k}}, "fc/kernel", 2.0, axis=0)
    original = np.asarray(interop.to_torch_state_dict(tree)["fc.parametrizations.weight.original"])
    # geotorch's sphere(radius=2) on the torch weight (out, in) normalizes its last axis.
    torch_value = 2.0 * original / np.linalg.norm(original, axis=-1, keepdims=True)
    np.testing.assert_allclose(torch_value.T, px.materialize(tree)["fc"]["kernel"], rtol=1e-12)


def test_check_value_refuses_a_zero_slice_of_a_stack_and_in_nnx():
    # The core runs check_value eagerly before it traces: a stack (registered under vmap) and
    # paramx.nnx (compiled) are refused too. With a negative axis the slices are the same
    # whatever the stack, so each is checked.
    k = jnp.ones((2, 4, 3)).at[1, :, 2].set(0.0)
    with pytest.raises(ValueError, match=r"zero.*\(at fc/kernel\)"):
        sphere({"fc": {"kernel": k}}, "fc/kernel", axis=-2, batch_axes=1)
    with pytest.raises(ValueError, match=r"whole tensor is zero.*\(at w\)"):
        sphere({"w": jnp.zeros((2, 4, 3))}, "w", batch_axes=1)
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = layer.kernel[...].at[:, 1].set(0.0)
    with pytest.raises(ValueError, match=r"zero.*Linear\.kernel"):
        torch_function(Sphere)(layer, axis=-2)
    # The core passes the stack's batch_axes, so a non-negative axis counts the axes of each
    # tensor: a valid stack whose entry (0, 1) is zero in every layer is not refused (each
    # column is a unit vector), and a zero column of one layer is.
    eye = jnp.stack([jnp.eye(4, 3)] * 2)
    tree = sphere({"w": eye}, "w", axis=0, batch_axes=1)
    np.testing.assert_allclose(px.materialize(tree)["w"], eye)
    with pytest.raises(ValueError, match=r"1 slice\(s\) along axis=0 are zero.*\(at w\)"):
        sphere({"w": eye.at[1, :, 2].set(0.0)}, "w", axis=0, batch_axes=1)
    with pytest.raises(ValueError, match=r"zero.*\(at w\)"):
        px.assign(tree, "w", eye.at[0, :, 1].set(0.0))


def test_table_health_reads_the_tensor_as_forward_does():
    # axis=None makes a whole conv kernel one vector; the table's distance must not split it
    # into one vector per spatial tap (sample's default batch), which reported ~0.85 on the set.
    k = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    for axis in (None, (0, 1, 2), -1):
        tree = sphere({"conv": {"kernel": k}}, "conv/kernel", axis=axis)
        assert float(px.table(tree).health["conv/kernel"]["distance"]) < 1e-6
    stack = sphere({"k": jnp.ones((5, 3, 4))}, "k", batch_axes=1)
    d = px.table(stack).health["k"]["distance"]
    assert d.shape == (5,) and float(jnp.max(d)) < 1e-6
