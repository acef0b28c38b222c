"""Shared harness for the catalogue tests: Adam on a parametrized tensor, one compiled program.

``adam_fit`` trains the originals of a parametrization registered at ``x0`` on the quadratic loss
``sum((q @ vec(w - target)) ** 2)``. The loss's data (``target``, ``q``), the learning rate and
the number of steps are all arguments of one module-level jitted function, so the "stays in the
set after 1,000 steps" test and the "fits a sampled target" test of a constraint (and every seed
and step count) share one compiled program per (parametrization, shape, dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import paramx as px


def _loss(w, target, q):
    e = (w - target).reshape(-1)
    return jnp.sum(jnp.matmul(q, e, precision=jax.lax.Precision.HIGHEST) ** 2)


@jax.jit
def _run(tree, target, q, lr, steps):
    # The trainable half only: a trivialization's base (state) is not trained.
    params, state = px.split_state(tree)
    opt = optax.adam(lr)
    value = lambda params: px.materialize(params, state)["w"]
    with jax.numpy_dtype_promotion("standard"):
        opt_state = opt.init(params)

        def step(_, carry):
            params, opt_state = carry
            g = jax.grad(lambda params: _loss(value(params), target, q))(params)
            upd, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, upd), opt_state

        params, _ = jax.lax.fori_loop(0, steps, step, (params, opt_state))
    w = value(params)
    return w, _loss(w, target, q)


def adam_fit(p, x0, target, q=None, *, steps=1000, lr=1e-2, batch_axes=0):
    """``steps`` Adam steps on ``p`` registered at ``x0``; returns ``(value, final loss)``.

    ``q=None`` gives the relative squared error ``|w - target|² / |target|²`` (the fitting-power
    loss); a matrix ``q`` of shape ``(target.size, target.size)`` gives a random quadratic loss.
    """
    tree = {"w": px.tensor.register(x0, p, batch_axes=batch_axes)}
    if q is None:
        scale = 1 / jnp.sqrt(jnp.sum(jnp.abs(target) ** 2))
        q = jnp.eye(target.size, dtype=target.dtype) * scale.astype(target.dtype)
    lr = jnp.asarray(lr, jnp.float32)
    return _run(tree, target, q, lr, jnp.asarray(steps, jnp.int32))


def random_quadratic(key, shape, dtype):
    """A random target and a well-conditioned random ``q`` for ``adam_fit``'s training test."""
    k1, k2 = jax.random.split(key)
    size = 1
    for d in shape:
        size *= d
    target = jax.random.normal(k1, shape, dtype)
    q = jax.random.normal(k2, (size, size), dtype) / jnp.sqrt(jnp.asarray(size, dtype))
    return target, q
