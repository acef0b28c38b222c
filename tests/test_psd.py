"""PositiveDefinite and PositiveSemidefinite: symmetric matrices with positive (non-negative)
eigenvalues."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from catalogue import adam_fit, random_quadratic
from conftest import assert_close

import paramx as px
from paramx._src.parametrizations.psd import (
    PositiveDefinite,
    PositiveSemidefinite,
    PositiveSemidefiniteFixedRank,
    PositiveSemidefiniteLowRank,
    positive_definite,
    positive_semidefinite,
    positive_semidefinite_fixed_rank,
    positive_semidefinite_low_rank,
    psd_projection,
)

BOTH = [PositiveDefinite(), PositiveSemidefinite()]
IDS = ["positive_definite", "positive_semidefinite"]
ALL = [*BOTH, PositiveSemidefiniteLowRank(2), PositiveSemidefiniteFixedRank(2)]
ALL_IDS = [*IDS, "positive_semidefinite_low_rank", "positive_semidefinite_fixed_rank"]
N = 4  # one size for training and fitting: one compiled program per (p, dtype)


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


@pytest.mark.parametrize("p", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_training_keeps_the_value_in_the_set(p, dtype):
    # An indefinite target: the optimum is on the boundary.
    target, q = random_quadratic(jax.random.key(11), (N, N), dtype)
    w, loss = adam_fit(p, p.sample(jax.random.key(3), (N, N), dtype), target, q)
    assert bool(jnp.isfinite(loss))
    np.testing.assert_array_equal(w, w.T)
    tol = 10 * N * float(jnp.finfo(dtype).eps) * float(jnp.max(jnp.abs(w)))
    assert float(jnp.min(jnp.linalg.eigvalsh(w))) >= -tol
    if isinstance(p, PositiveSemidefiniteFixedRank):  # rank <= 2 (exactly 2 in exact arithmetic)
        assert bool(PositiveSemidefiniteLowRank(2).in_manifold(w, atol=tol))
    else:
        assert bool(p.in_manifold(w, atol=tol))


@pytest.mark.parametrize("p", ALL, ids=ALL_IDS)
def test_fitting_power(p):
    target = p.sample(jax.random.key(5), (N, N), jnp.float64)
    _, loss = adam_fit(p, p.sample(jax.random.key(6), (N, N), jnp.float64), target, steps=3000)
    assert float(loss) < 1e-4


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
        (PositiveSemidefiniteFixedRank, {"rank": 2}),
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


# ----- PositiveSemidefiniteFixedRank ----------------------------------------------------------


def test_fixed_rank_is_exact_on_the_set_and_projects_to_the_nearest():
    p = PositiveSemidefiniteFixedRank(2)
    x = p.sample(jax.random.key(0), (3, 5, 5), jnp.float64)
    assert bool(jnp.all(p.in_manifold(x))) and float(jnp.max(p.distance(x))) < 1e-12
    node = px.tensor.register(x, p, batch_axes=1)
    assert node.originals[0].shape == (3, 5, 5) and node.state["0"]["q"].shape == (3, 5, 5)
    assert_close(px.tensor.materialize(node), x, scale=100)
    # Off the set: the top-2 part of the symmetric part (its 2nd eigenvalue is positive).
    a = _normal((5, 5), 4)
    a = a + 3 * jnp.eye(5)
    node = px.tensor.register(a, p)
    got = px.tensor.materialize(node)
    lam, v = jnp.linalg.eigh((a + a.T) / 2)
    assert float(lam[-2]) > 0
    assert_close(got, (v[:, -2:] * lam[None, -2:]) @ v[:, -2:].T, scale=100)
    d = float(jnp.linalg.norm(a - got))
    assert abs(d - float(p.distance(a))) < 1e-10
    # Brute force: random rank-2 PSD matrices and small moves along the set are never closer.
    g = _normal((3000, 5, 2), 5)
    moved = node.originals[0][None] + 0.05 * _normal((3000, 5, 5), 6)
    near = p.forward(moved, params=None, state=node.state["0"])
    for cands in (g @ _t(g), near):
        assert float(jnp.min(jnp.linalg.norm(a[None] - cands, axis=(-2, -1)))) >= d - 1e-12
    assert not bool(p.in_manifold(jnp.eye(5)))  # rank 5
    assert not bool(p.in_manifold(jnp.diag(jnp.array([1.0, 0, 0, 0, 0]))))  # rank 1
    # f="exp": the original's diagonal holds the log-eigenvalues.
    node = px.tensor.register(x[0], PositiveSemidefiniteFixedRank(2, "exp"))
    assert_close(px.tensor.materialize(node), x[0], scale=100)
    np.testing.assert_allclose(
        jnp.diagonal(node.originals[0])[:2], jnp.log(jnp.linalg.eigvalsh(x[0])[-2:])
    )


def test_fixed_rank_refuses_values_without_a_nearest_point_with_the_path():
    from flax import nnx

    from paramx._src.integrations.nnx.wrappers import torch_function

    rank_one = jnp.outer(_normal((4,), 1), _normal((4,), 1))
    with pytest.raises(ValueError, match=r"λ_2 = .*no nearest point.*\(at fc/kernel\)"):
        positive_semidefinite_fixed_rank({"fc": {"kernel": rank_one}}, "fc/kernel", 2)
    with pytest.raises(ValueError, match=r"λ_2"):  # the top-2 part of -I is 0
        positive_semidefinite_fixed_rank({"w": -jnp.eye(4)}, "w", 2)
    good = PositiveSemidefiniteFixedRank(2).sample(jax.random.key(1), (4, 4), jnp.float64)
    stack = jnp.stack([good, rank_one])
    with pytest.raises(ValueError, match=r"matrix \(1,\) of the stack.*\(at fc/kernel\)"):
        positive_semidefinite_fixed_rank({"fc": {"kernel": stack}}, "fc/kernel", 2, batch_axes=1)
    layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.zeros((4, 4), jnp.float32).at[0, 0].set(1.0)
    with pytest.raises(ValueError, match=r"λ_2.*Linear\.kernel"):
        torch_function(PositiveSemidefiniteFixedRank)(layer, rank=2)
    with pytest.raises(TypeError, match="rank must be an int"):
        PositiveSemidefiniteFixedRank(2.0)
    with pytest.raises(ValueError, match="at least 1"):
        PositiveSemidefiniteFixedRank(0)
    with pytest.raises(ValueError, match="f must be one of"):
        PositiveSemidefiniteFixedRank(2, "relu")
    with pytest.raises(ValueError, match=r"exceeds the matrix size.*\(at fc/kernel\)"):
        positive_semidefinite_fixed_rank({"fc": {"kernel": jnp.eye(3)}}, "fc/kernel", 4)
    with pytest.raises(ValueError, match=r"square.*\(at fc/kernel\)"):
        positive_semidefinite_fixed_rank({"fc": {"kernel": jnp.ones((3, 4))}}, "fc/kernel", 2)


def test_fixed_rank_update_base_dtypes_grad_and_samples():
    p = PositiveSemidefiniteFixedRank(2)
    node = px.tensor.register(p.sample(jax.random.key(0), (4, 4), jnp.float64), p)
    moved = node.replace(originals=(node.originals[0] + 0.3 * _normal((4, 4), 1),))
    before = px.tensor.materialize(moved)
    after = px.update_base({"w": moved})["w"]
    assert_close(px.tensor.materialize(after), before, scale=100)
    np.testing.assert_array_equal(after.originals[0] * (1 - jnp.eye(4)), 0)  # the centre
    g = jax.jit(jax.grad(lambda x: jnp.sum(p.forward(x, params=None, state=node.state["0"]) ** 3)))(
        moved.originals[0]
    )
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
    for dtype in (jnp.float32, jnp.bfloat16):  # a conv kernel (*spatial, n, n), per tap
        x = p.sample(jax.random.key(2), (2, 1, 4, 4), dtype)
        tree = px.register_parametrization({"conv": x}, "conv", p)
        w = jax.jit(px.materialize)(tree)["conv"]
        assert w.dtype == dtype and w.shape == x.shape
        assert_close(w, x, dtype, scale=100 if dtype != jnp.bfloat16 else 5)
        assert bool(jnp.all(p.in_manifold(w)))
    # A singular Wishart(I, 2): mean 2·I; variance 2 off the diagonal and 4 on it (the diagonal
    # is chi²(2), heavy-tailed: a looser tolerance there).
    s = p.sample(jax.random.key(8), (3000, 4, 4), jnp.float64)
    assert bool(jnp.all(p.in_manifold(s)))
    np.testing.assert_allclose(jnp.mean(s, axis=0), 2 * jnp.eye(4), atol=0.2)
    var = jnp.var(s, axis=0)
    np.testing.assert_allclose(var * (1 - jnp.eye(4)), 2 * (1 - jnp.eye(4)), atol=0.3)
    np.testing.assert_allclose(jnp.diagonal(var), 4 * jnp.ones(4), rtol=0.3)


# ----- check_value: eager, for stacks and paramx.nnx too ----------------------------------------


def test_definite_check_value_refuses_a_bad_matrix_of_a_stack_and_in_nnx():
    # The core runs check_value eagerly before it traces: a stack (registered under vmap) and
    # paramx.nnx (compiled) are refused too, instead of getting NaN originals.
    from flax import nnx

    from paramx._src.integrations.nnx.wrappers import torch_function

    good = PositiveDefinite().sample(jax.random.key(1), (3, 4, 4), jnp.float64)
    stack = good.at[2].set(good[2] - 100 * jnp.eye(4))
    with pytest.raises(
        ValueError, match=r"not positive definite \(matrix \(2,\) of the stack\).*\(at fc/kernel\)"
    ):
        positive_definite({"fc": {"kernel": stack}}, "fc/kernel", batch_axes=1)
    node = positive_definite({"k": good}, "k", batch_axes=1)["k"]  # the good stack registers
    assert_close(px.tensor.materialize(node), good, scale=100)
    PositiveDefinite().check_value(good)  # passes silently
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.eye(3, dtype=jnp.float32).at[2, 2].set(-1.0)
    with pytest.raises(ValueError, match=r"not positive definite.*Linear\.kernel"):
        torch_function(PositiveDefinite)(layer)


def test_bfloat16_definite_samples_stay_definite():
    # Rounding a float32 Wishart draw to bfloat16 leaves about 5% of 4 x 4 draws indefinite;
    # those get a small multiple of I added before rounding, the others are the rounded draw.
    p = PositiveDefinite()
    s = p.sample(jax.random.key(0), (4000, 4, 4), jnp.bfloat16)
    exact = p.sample(jax.random.key(0), (4000, 4, 4), jnp.float32)
    lam = jnp.linalg.eigvalsh(s.astype(jnp.float64))
    assert bool(jnp.all(lam[:, 0] > 0)) and bool(jnp.all(p.in_manifold(s)))
    changed = jnp.any(s != exact.astype(jnp.bfloat16), axis=(-2, -1))
    assert 0 < int(jnp.sum(changed)) < 400
    np.testing.assert_allclose(
        jnp.mean(s.astype(jnp.float32), 0), 4 * jnp.eye(4, dtype=jnp.float32), atol=0.25
    )
