"""The last Newton-Schulz step of the orthonormal maps: ``numerics.polish`` (identity derivative)
against ``numerics.newton_schulz`` (autodiff)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from test_linalg import _count  # occurrences of a primitive, sub-jaxprs included

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal
from paramx._src.parametrizations.grassmannian import Grassmannian
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal


def test_polish_is_the_step_with_an_identity_derivative():
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (6, 4)))[0] * 1.001
    np.testing.assert_array_equal(numerics.polish(q), numerics.newton_schulz(q))
    dq = jax.random.normal(jax.random.key(1), q.shape)
    _, tangent = jax.jvp(numerics.polish, (q,), (dq,))
    np.testing.assert_array_equal(tangent, dq)
    np.testing.assert_array_equal(jax.grad(lambda q: jnp.sum(numerics.polish(q) * dq))(q), dq)
    # no product in the linearized step (autodiff's has four: two per product of the step)
    _, lin = jax.linearize(numerics.polish, q)
    assert _count(jax.make_jaxpr(lin)(dq).jaxpr, "dot_general") == 0
    _, lin = jax.linearize(numerics.newton_schulz, q)
    assert _count(jax.make_jaxpr(lin)(dq).jaxpr, "dot_general") == 4


def _cases():
    """(name, parametrization, shape, dtype, state builder) for every user of ``polish``."""
    for omap in ("matrix_exp", "cayley", "householder"):
        for shape in ((5, 5), (7, 4), (3, 6)):
            yield f"orthogonal-{omap}-{shape}", Orthogonal(omap), shape, jnp.float64
    yield "orthogonal-cayley-complex", Orthogonal("cayley"), (5, 5), jnp.complex128
    yield "orthogonal-exp-no-base", Orthogonal(use_trivialization=False), (5, 5), jnp.float64
    yield "special_orthogonal", SpecialOrthogonal(), (5, 5), jnp.float64
    yield "grassmannian", Grassmannian(), (7, 3), jnp.float64
    yield "almost_orthogonal", AlmostOrthogonal(lam=0.5), (6, 4), jnp.float64


def _setup(p, shape, dtype, seed=0):
    """A registered state from a random value, and a random original with a skew part of
    norm about 1 (so the maps are away from the identity)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    value = p.sample(k1, shape, dtype) if hasattr(p, "sample") else None
    if value is None:
        value = jax.random.normal(k1, shape, dtype)
    state = None
    if getattr(p, "use_trivialization", True):
        _, state = p.init(value, k1) if hasattr(p, "init") else (None, None)
        _, state = p.right_inverse(value, params=None, state=state)
    x = 0.4 * jax.random.normal(k2, shape, dtype)
    c = jax.random.normal(k3, shape, dtype)
    return state, x, c


@pytest.mark.parametrize("name,p,shape,dtype", list(_cases()), ids=lambda v: str(v))
def test_gradients_equal_autodiff_of_the_step_in_float64(name, p, shape, dtype, monkeypatch):
    state, x, c = _setup(p, shape, dtype)

    def loss(x):
        return jnp.real(jnp.sum(p.forward(x, params=None, state=state) * jnp.conj(c)))

    grad = jax.jit(jax.grad(loss))
    new = grad(x)
    monkeypatch.setattr(numerics, "polish", numerics.newton_schulz)
    old = jax.jit(jax.grad(loss))(x)
    scale = float(jnp.max(jnp.abs(old)))
    assert scale > 1e-3
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-11 * scale)


def test_cayley_gradient_in_float32_is_as_accurate_as_autodiff_of_the_step(monkeypatch):
    """In float32 the step removes an orthogonality error E of 1e-6 or so; identity and autodiff
    derivatives then differ by O(E), as each differs from the float64 gradient."""
    p = Orthogonal("cayley", use_trivialization=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)) * 2.0  # ||A|| about 30: an error E near 1e-6
    c = rng.standard_normal((64, 64))

    def grad_at(dtype):
        def loss(x):
            return jnp.sum(p.forward(x, params=None, state=None) * c.astype(dtype))

        return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x, dtype)), np.float64)

    exact = grad_at(jnp.float64)
    new = grad_at(jnp.float32)
    monkeypatch.setattr(numerics, "polish", numerics.newton_schulz)
    old = grad_at(jnp.float32)
    scale = np.max(np.abs(exact))
    err_new, err_old = np.max(np.abs(new - exact)) / scale, np.max(np.abs(old - exact)) / scale
    assert err_new < 1e-4 and err_new < 3 * err_old, (err_new, err_old)


def test_the_backward_pass_spends_no_product_on_the_step(monkeypatch):
    p = Orthogonal("cayley")
    state, x, c = _setup(p, (16, 16), jnp.float32)

    def count():
        def loss(x):
            return jnp.sum(p.forward(x, params=None, state=state) * c)

        return _count(jax.make_jaxpr(jax.grad(loss))(x).jaxpr, "dot_general")

    new = count()
    monkeypatch.setattr(numerics, "polish", numerics.newton_schulz)
    assert count() == new + 4


def test_polar_keeps_the_exact_derivative_of_its_step():
    """polar's value is orthonormal only to its iteration's accuracy (a non-orthogonal original
    far from the identity): its last step is differentiated as it is."""
    p = Orthogonal("polar", use_trivialization=False)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)) + 2 * np.eye(5, 3))
    check_grads(lambda x: p.forward(x, params=None, state=None), (x,), order=1, modes=("rev",))


def test_a_trivialized_cayley_step_compiles_to_five_products():
    """Forward: ``base @ C`` and the step's two; backward: the two of ``based_cayley``'s VJP
    (the step's derivative is the identity, the base folded into the map's). Was nine."""
    p = Orthogonal("cayley")
    state, x, c = _setup(p, (6, 6), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda x, s: jnp.sum(p.forward(x, params=None, state=s) * c)))
    assert step.lower(x, state).compile().as_text().count(" dot(") == 5
