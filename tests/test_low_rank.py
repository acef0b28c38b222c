"""LowRank and FixedRank: matrices of rank at most r, or exactly r (U diag(s) Vᵀ)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from catalogue import adam_fit, random_quadratic
from conftest import assert_close

import paramx as px
from paramx._src.parametrizations.low_rank import FixedRank, LowRank, fixed_rank, low_rank

BOTH = [LowRank(2), FixedRank(2)]
IDS = ["low_rank", "fixed_rank"]
SHAPE = (5, 4)  # one shape for training and fitting: one compiled program per (p, dtype)


# Few shapes ((5, 4), (3, 5, 4), (2, 1, 3, 4)), eager: the op-by-op programs are shared by both
# classes and all tests (a jit would compile per class and shape).


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _svals(x):
    return jnp.linalg.svd(x, compute_uv=False)


def _eckart_young(a, r):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :]


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_values_are_in_the_set_and_right_inverse_is_exact_on_it(p):
    x = p.sample(jax.random.key(0), (3, 5, 4), jnp.float64)  # a stack (wide: the conv tests)
    assert bool(jnp.all(p.in_manifold(x))) and float(jnp.max(p.distance(x))) < 1e-12
    node = px.tensor.register(x, p, batch_axes=1)
    assert node.originals[0].shape == (3, 5, 4)
    assert node.state["0"]["u"].shape == (3, 5, 5) and node.state["0"]["v"].shape == (3, 4, 4)
    assert_close(px.tensor.materialize(node), x, scale=100)
    # forward of any original lies in the set
    state = {"u": jnp.eye(5, dtype=jnp.float64), "v": jnp.eye(4, dtype=jnp.float64)}
    w = p.forward(_normal((5, 4), 3), params=None, state=state)
    assert bool(p.in_manifold(w)) and float(_svals(w)[p.rank]) < 1e-12


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_projection_is_the_nearest_matrix_of_rank_r(p):
    a = _normal((5, 4), 4)
    node = px.tensor.register(a, p)
    got = px.tensor.materialize(node)
    assert_close(got, _eckart_young(a, 2), scale=100)  # Eckart–Young, σ_2 > 0
    d = float(jnp.linalg.norm(a - got))
    s = _svals(a)
    assert abs(d - float(jnp.sqrt(jnp.sum(s[2:] ** 2)))) < 1e-12
    assert abs(d - float(p.distance(a))) < 1e-12
    # Brute force: random rank-2 matrices and small moves of the projection along the set
    # (through the chart at the projection) are never closer.
    others = LowRank(2).sample(jax.random.key(5), (3000, 5, 4), jnp.float64)
    moved = node.originals[0][None] + 0.05 * _normal((3000, 5, 4), 6)
    near = p.forward(moved, params=None, state=node.state["0"])
    for cands in (others, near):
        assert float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1)))) >= d - 1e-12


def test_low_rank_keeps_lower_ranks_and_fixed_rank_refuses_them_with_the_path():
    lower = jnp.outer(_normal((5,), 1), _normal((4,), 2))  # rank 1
    w = px.materialize(low_rank({"w": lower}, "w", 2))["w"]
    assert_close(w, lower, scale=100)
    assert bool(LowRank(2).in_manifold(lower)) and not bool(FixedRank(2).in_manifold(lower))
    with pytest.raises(ValueError, match=r"σ_2 = .*no nearest point.*\(at fc/kernel\)"):
        fixed_rank({"fc": {"kernel": lower}}, "fc/kernel", 2)
    with pytest.raises(ValueError, match=r"σ_2"):
        fixed_rank({"w": jnp.zeros((5, 4))}, "w", 2)
    tree = fixed_rank({"w": _normal((5, 4), 3)}, "w", 2)
    with pytest.raises(ValueError, match=r"σ_2.*\(at w\)"):
        px.assign(tree, "w", lower)
    # Under jit no check can run: the lost singular value gives an original of -inf.
    node = px.tensor.register(_normal((5, 4), 3), FixedRank(2))
    x, _ = jax.jit(lambda v: FixedRank(2).right_inverse(v, params=None, state=node.state["0"]))(
        jnp.zeros((5, 4))
    )
    assert float(jnp.min(x)) == -np.inf


def test_check_value_refuses_a_bad_matrix_of_a_stack_and_in_nnx():
    # The core runs check_value eagerly before it traces: a stack (registered under vmap) and
    # paramx.nnx (compiled) are refused too, instead of getting -inf originals.
    from flax import nnx

    from paramx._src.integrations.nnx.wrappers import torch_function

    stack = jnp.stack([_normal((5, 4), 1), jnp.outer(_normal((5,), 2), _normal((4,), 3))])
    with pytest.raises(ValueError, match=r"matrix \(1,\) of the stack.*\(at fc/kernel\)"):
        fixed_rank({"fc": {"kernel": stack}}, "fc/kernel", 2, batch_axes=1)
    layer = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.zeros((5, 4), jnp.float32).at[0, 0].set(1.0)
    with pytest.raises(ValueError, match=r"σ_2.*Linear\.kernel"):
        torch_function(FixedRank)(layer, rank=2)
    # The functions come from the declarations; a conv kernel gets rank 2 per tap.
    for cls in (LowRank, FixedRank):
        f = torch_function(cls)
        assert f.__name__ == cls.torch_function
        layer = f(nnx.Conv(3, 4, (2, 1), rngs=nnx.Rngs(0)), rank=2)  # kernel (2, 1, 3, 4)
        s = _svals(layer.kernel)
        assert layer.kernel.shape == (2, 1, 3, 4)
        assert bool(jnp.all(s[..., 2] < 1e-5)) and bool(jnp.all(s[..., 1] > 1e-3))


def test_options_and_shapes_are_checked_at_registration():
    for cls in (LowRank, FixedRank):
        with pytest.raises(TypeError, match="rank must be an int"):
            cls(2.0)
        with pytest.raises(ValueError, match="at least 1"):
            cls(0)
        with pytest.raises(ValueError, match=r"rank=4 exceeds min\(m, n\) = 3.*\(at fc/kernel\)"):
            px.register_parametrization({"fc": {"kernel": jnp.ones((3, 5))}}, "fc/kernel", cls(4))
        with pytest.raises(ValueError, match=r"needs a matrix.*\(at fc/bias\)"):
            px.register_parametrization({"fc": {"bias": jnp.ones(3)}}, "fc/bias", cls(1))
        with pytest.raises(TypeError, match="floating-point"):
            px.register_parametrization({"w": jnp.eye(3, dtype=jnp.int32)}, "w", cls(1))
    with pytest.raises(ValueError, match="f must be one of"):
        FixedRank(2, f="relu")
    # f="exp": exact on the set too.
    x = FixedRank(2).sample(jax.random.key(0), (5, 4), jnp.float64)
    node = px.tensor.register(x, FixedRank(2, "exp"))
    assert_close(px.tensor.materialize(node), x, scale=100)
    np.testing.assert_allclose(jnp.diagonal(node.originals[0])[:2], jnp.log(_svals(x)[:2]))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_and_conv_kernels_per_tap(p, dtype):
    x = p.sample(jax.random.key(2), (2, 1, 3, 4), dtype)  # a conv kernel (*spatial, in, out)
    tree = px.register_parametrization({"conv": x}, "conv", p)
    assert tree["conv"].state["0"]["u"].dtype == jnp.float32  # the bases stay in float32
    w = px.tensor.materialize(tree["conv"])
    assert w.dtype == dtype and w.shape == x.shape
    assert_close(w, x, dtype, scale=100 if dtype != jnp.bfloat16 else 5)
    assert bool(jnp.all(p.in_manifold(w)))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_grad_and_vmap(p):
    x = _normal((3, 5, 4))
    state = px.tensor.register(p.sample(jax.random.key(1), (3, 5, 4), jnp.float64), p).state["0"]
    c = _normal((3, 5, 4), 1)

    @jax.jit
    def run(x, state):
        mapped = jax.vmap(lambda x, s: p.forward(x, params=None, state=s))
        g = jax.grad(lambda x: jnp.sum(mapped(x, state) * c))(x)
        return g, mapped(x, state), p.forward(x, params=None, state=state)

    g, one_by_one, batched = run(x, state)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_update_base_keeps_the_value_and_centres_the_chart(p):
    node = px.tensor.register(p.sample(jax.random.key(0), (5, 4), jnp.float64), p)
    moved = node.replace(originals=(node.originals[0] + 0.3 * _normal((5, 4), 1),))
    before = px.tensor.materialize(moved)
    after = px.update_base({"w": moved})["w"]
    assert_close(px.tensor.materialize(after), before, scale=100)
    x = after.originals[0]
    np.testing.assert_array_equal(x * (1 - jnp.eye(5, 4)), 0)  # the centre: s only
    np.testing.assert_array_equal(jnp.diagonal(x), jnp.diagonal(moved.originals[0]).at[2:].set(0))


def test_samples_are_truncated_gaussian_matrices():
    m, n, r, k = 5, 4, 2, 3000
    p = LowRank(r)
    x = p.sample(jax.random.key(7), (k, m, n), jnp.float64)
    assert bool(jnp.all(p.in_manifold(x))) and bool(jnp.all(FixedRank(r).in_manifold(x)))
    # The singular values are the r largest of a standard normal (m, n) matrix: compare their
    # means with an independent draw.
    ref = _svals(_normal((k, m, n), 8))[:, :r]
    np.testing.assert_allclose(jnp.mean(_svals(x)[:, :r], 0), jnp.mean(ref, 0), rtol=0.03)
    # U and V are Haar, independent of s: E[X Xᵀ] and E[Xᵀ X] are multiples of I, with trace
    # E[σ_1² + σ_2²], and E[X] = 0.
    energy = float(jnp.mean(jnp.sum(ref**2, -1)))
    np.testing.assert_allclose(jnp.mean(x @ _t(x), 0), energy / m * jnp.eye(m), atol=0.25)
    np.testing.assert_allclose(jnp.mean(_t(x) @ x, 0), energy / n * jnp.eye(n), atol=0.25)
    np.testing.assert_allclose(jnp.mean(x, 0), jnp.zeros((m, n)), atol=0.06)
    # Full rank: the draw is the Gaussian matrix itself.
    g = LowRank(n).sample(jax.random.key(9), (k, m, n), jnp.float64)
    np.testing.assert_allclose(jnp.var(g, 0), jnp.ones((m, n)), rtol=0.1)


@pytest.mark.parametrize("p", BOTH, ids=IDS)
def test_in_manifold_and_distance_say_no_off_the_set(p):
    a = _normal((5, 4), 3)
    assert not bool(p.in_manifold(a))
    assert abs(float(p.distance(a)) - float(jnp.sqrt(jnp.sum(_svals(a)[2:] ** 2)))) < 1e-12
    near = _eckart_young(a, 2)
    assert bool(p.in_manifold(near, atol=1e-10))
    assert not bool(p.in_manifold(near + 1e-6 * a, atol=1e-10))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_keeps_the_value_in_the_set(p, dtype):
    target, q = random_quadratic(jax.random.key(11), SHAPE, dtype)
    x0 = p.sample(jax.random.key(3), SHAPE, dtype)
    w, loss = adam_fit(p, x0, target, q)
    assert bool(jnp.isfinite(loss))
    s = _svals(w)
    tol = 10 * max(SHAPE) * float(jnp.finfo(dtype).eps) * float(s[0])
    assert float(s[2]) <= tol and float(s[1]) > 100 * tol
    assert bool(p.in_manifold(w, atol=tol))


@pytest.mark.parametrize("p", BOTH, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fitting_power(p, dtype):
    # 3,000 steps: from some starts (U nearly orthogonal to the target's) Adam crawls past a
    # saddle for the first thousand; the compiled program is the training test's.
    target = p.sample(jax.random.key(7), SHAPE, dtype)
    x0 = p.sample(jax.random.key(8), SHAPE, dtype)
    _, loss = adam_fit(p, x0, target, steps=3000)
    assert float(loss) < 1e-4
