"""Orthogonal's constraint protocol: sample (Haar / Stiefel / torus), in_manifold, distance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import paramx as px
from paramx._src.parametrizations.orthogonal import Orthogonal

ORTH = Orthogonal()


def _gram_defect(q):
    """max |QᴴQ - I| in forward's orientation (rows when the matrix is not strictly tall)."""
    q = np.asarray(q, np.complex128)
    if q.shape[-2] <= q.shape[-1]:
        q = np.swapaxes(q, -1, -2)
    k = q.shape[-1]
    return np.max(np.abs(np.conj(np.swapaxes(q, -1, -2)) @ q - np.eye(k)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.complex64])
def test_samples_are_in_the_set_in_every_orientation_and_dtype(dtype):
    for shape in [(4, 4), (6, 3), (3, 6)]:
        q = ORTH.sample(jax.random.key(0), (5, *shape), dtype)
        assert q.shape == (5, *shape) and q.dtype == dtype
        np.testing.assert_array_equal(ORTH.in_manifold(q), [True] * 5)
        if dtype != jnp.bfloat16:
            assert _gram_defect(q) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
def test_samples_are_points_forward_produces(dtype):
    materialize = jax.jit(px.materialize)
    for shape in [(4, 4), (6, 3), (3, 6)]:
        q = ORTH.sample(jax.random.key(0), shape, dtype)
        # registering a sample keeps it: it is a value forward can produce
        w = materialize(px.orthogonal({"w": q}, "w"))["w"]
        np.testing.assert_allclose(np.asarray(w), np.asarray(q), atol=2e-6)
        # and forward's values are accepted
        k = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
        assert bool(ORTH.in_manifold(materialize(px.orthogonal({"w": k}, "w"))["w"]))


def test_in_manifold_follows_forwards_orientation_and_distance_is_frobenius():
    tall = ORTH.sample(jax.random.key(0), (6, 3), jnp.float64)
    wide = ORTH.sample(jax.random.key(0), (3, 6), jnp.float64)
    assert bool(ORTH.in_manifold(tall)) and bool(ORTH.in_manifold(wide))
    np.testing.assert_allclose(ORTH.distance(tall), 0.0, atol=1e-14)
    # a tall matrix with orthonormal columns scaled by 2: every singular value is 2
    np.testing.assert_allclose(ORTH.distance(2 * tall), np.sqrt(3.0), rtol=1e-12)
    assert not bool(ORTH.in_manifold(2 * tall)) and not bool(ORTH.in_manifold(tall + 1e-6))
    assert bool(ORTH.in_manifold(tall + 1e-6, atol=1e-4))
    # distance is to the nearest point: the polar factor U Vᵀ
    x = jax.random.normal(jax.random.key(2), (4, 5, 3), jnp.float64)
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(ORTH.distance(x), jnp.linalg.norm(x - u @ vt, axis=(-2, -1)))
    with pytest.raises(ValueError, match="matrix"):
        ORTH.in_manifold(jnp.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        ORTH.distance(jnp.ones((3, 3), jnp.int32))


def _moments(q):
    tr = jnp.trace(q, axis1=-2, axis2=-1)
    return (
        float(jnp.abs(jnp.mean(tr))),
        float(jnp.mean(jnp.abs(tr) ** 2)),
        float(jnp.max(jnp.abs(jnp.mean(q, 0)))),
        float(jnp.max(jnp.abs(jnp.mean(jnp.abs(q) ** 2, 0) - 1 / max(q.shape[-2:])))),
    )


def _haar_like(q):
    """Haar on O(n) / U(n), n >= 2: E[tr] = 0, E[|tr|²] = 1, E[Q_ij] = 0, E[|Q_ij|²] = 1/n;
    thresholds about 5 standard errors of 2,000 draws."""
    m, m2, entry, entry2 = _moments(q)
    return m < 0.12 and abs(m2 - 1) < 0.2 and entry < 0.06 and entry2 < 0.03


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
def test_uniform_sample_is_haar_and_plain_qr_is_not(dtype):
    q = ORTH.sample(jax.random.key(0), (2000, 4, 4), dtype)
    assert _haar_like(q), _moments(q)
    plain = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (2000, 4, 4), dtype))[0]
    assert not _haar_like(plain), _moments(plain)


def test_stiefel_sample_is_the_first_columns_of_a_haar_matrix():
    tall = ORTH.sample(jax.random.key(0), (2000, 6, 2), jnp.float64)
    wide = ORTH.sample(jax.random.key(1), (2000, 2, 6), jnp.float64)
    for q in (tall, jnp.swapaxes(wide, -1, -2)):
        assert float(jnp.max(jnp.abs(jnp.mean(q, 0)))) < 0.05
        np.testing.assert_allclose(jnp.mean(q**2, 0), 1 / 6, atol=0.015)
        # the two columns are uncorrelated: E[q_i1 q_j2] = 0
        assert float(jnp.max(jnp.abs(jnp.mean(q[..., :, :1] * q[..., None, :, 1], 0)))) < 0.03
    # non-Haar: columns of a plain QR
    plain = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (2000, 6, 2), jnp.float64))[0]
    assert float(jnp.max(jnp.abs(jnp.mean(plain, 0)))) > 0.2


def test_complex_orthogonal_is_unitary_and_its_sample_is_haar_unitary():
    k = jax.random.normal(jax.random.key(0), (4, 4), jnp.complex64)
    u = jax.jit(px.materialize)(px.orthogonal({"w": k}, "w"))["w"]
    assert u.dtype == jnp.complex64
    np.testing.assert_allclose(np.conj(u.T) @ u, np.eye(4), atol=1e-5)
    assert bool(ORTH.in_manifold(u))
    q = ORTH.sample(jax.random.key(1), (2000, 4, 4), jnp.complex64)
    tr = jnp.trace(q, axis1=-2, axis2=-1)
    assert abs(float(jnp.mean(jnp.abs(tr) ** 2)) - 1) < 0.15 and float(jnp.abs(jnp.mean(tr))) < 0.1
    # the phases are uniform: E[Q_ij²] = 0 (not only E[|Q_ij|²] = 1/n)
    assert float(jnp.max(jnp.abs(jnp.mean(q**2, 0)))) < 0.03


def test_torus_sample():
    q = ORTH.sample(jax.random.key(0), (2000, 4, 4), jnp.float64, "torus")
    assert bool(jnp.all(ORTH.in_manifold(q))) and bool(jnp.all(jnp.linalg.det(q) > 0))
    np.testing.assert_array_equal(q[:, 0, 2:], 0.0)  # block diagonal
    c = q[:, jnp.array([0, 2]), jnp.array([0, 2])]
    assert abs(float(jnp.mean(c))) < 0.05 and abs(float(jnp.mean(c**2)) - 0.5) < 0.03
    z = ORTH.sample(jax.random.key(0), (2000, 3, 3), jnp.complex128, "torus")
    d = jnp.diagonal(z, axis1=-2, axis2=-1)
    np.testing.assert_allclose(jnp.abs(d), 1.0, rtol=1e-12)
    assert float(jnp.abs(jnp.mean(d))) < 0.05
    r = ORTH.sample(jax.random.key(0), (3, 5), jnp.float32, "torus")
    assert r.shape == (3, 5) and bool(ORTH.in_manifold(r))


def test_sample_errors_and_sampler():
    with pytest.raises(ValueError, match="at least 2 axes"):
        ORTH.sample(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match="distribution"):
        ORTH.sample(jax.random.key(0), (3, 3), jnp.float32, "normal")
    with pytest.raises(TypeError, match="floating-point"):
        ORTH.sample(jax.random.key(0), (3, 3), jnp.int32)
    w = px.sampler(ORTH)(jax.random.key(0), (3, 5))
    assert bool(ORTH.in_manifold(w))


def test_fitting_power_reaches_a_sampled_stiefel_point():
    target = ORTH.sample(jax.random.key(7), (6, 3), jnp.float64)
    tree = px.orthogonal({"w": jax.random.normal(jax.random.key(8), (6, 3), jnp.float64)}, "w")
    params, state = px.split_state(tree)
    tx = optax.adam(1e-2)

    def loss_of(p):
        w = px.materialize(p, state)["w"]
        return jnp.sum((w - target) ** 2) / jnp.sum(target**2)

    def step(carry, _):
        p, opt = carry
        loss, g = jax.value_and_grad(loss_of)(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt = tx.update(g, opt, p)
            p = optax.apply_updates(p, updates)
        return (p, opt), loss

    @jax.jit
    def run(p):
        with jax.numpy_dtype_promotion("standard"):
            opt = tx.init(p)
        return jax.lax.scan(step, (p, opt), None, length=1000)[1]

    losses = run(params)
    assert float(losses[-1]) < 1e-4, float(losses[-1])
