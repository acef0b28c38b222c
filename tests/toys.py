"""Parametrizations used by the core tests: one of each kind the core must support.

Module-level functions, so registering "the same parametrization" twice gives equal chains.
"""

import dataclasses

import jax
import jax.numpy as jnp

import paramx as px


# --- plain, with an exact right_inverse on its image ---------------------------------------------
def _sym(x):
    return jnp.triu(x) + jnp.swapaxes(jnp.triu(x, 1), -1, -2)


symmetric = px.Parametrization(forward=_sym, right_inverse=jnp.triu, name="symmetric")


def _softplus_inv(y):
    # log(expm1(y)), written to stay accurate for large y.
    return y + jnp.log(-jnp.expm1(-y))


positive = px.Parametrization(forward=jax.nn.softplus, right_inverse=_softplus_inv, name="positive")


def _skew(x):
    a = jnp.tril(x, -1)
    return a - jnp.swapaxes(a, -1, -2)


skew = px.Parametrization(forward=_skew, right_inverse=lambda y: jnp.tril(y, -1), name="skew")


# --- several originals ---------------------------------------------------------------------------
def _rank_one(a, b):
    return a[..., :, None] * b[..., None, :]


def _rank_one_inv(z):
    return z[..., :, 0], z[..., 0, :] / z[..., :1, :1][..., 0, :]


rank_one = px.Parametrization(forward=_rank_one, right_inverse=_rank_one_inv, name="rank_one")


# --- with a learnable array of its own -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scale:
    """``x * scale`` with a learnable scalar ``scale`` initialized to ``init_scale``."""

    init_scale: float = 2.0

    def init(self, value, key):
        return {"scale": jnp.asarray(self.init_scale, value.dtype)}, None

    def forward(self, x, *, params, state):
        return x * params["scale"]

    def right_inverse(self, y, *, params, state):
        return y / params["scale"], state


# --- with non-trainable state --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunningMax:
    """Divides by a running maximum of |x| kept as state; updated only on request."""

    def init(self, value, key):
        return None, jnp.max(jnp.abs(value))

    def update_state(self, x, *, params, state):
        return jnp.maximum(state, jnp.max(jnp.abs(x)))

    def forward(self, x, *, params, state):
        return x / state

    def right_inverse(self, y, *, params, state):
        return y * state, state


@dataclasses.dataclass(frozen=True)
class RandomState:
    """Stateful, state drawn from the key: shows that each leaf gets its own key."""

    def init(self, value, key):
        return None, jax.random.normal(key, value.shape, value.dtype)

    def forward(self, x, *, params, state):
        return x + 0 * state

    def right_inverse(self, y, *, params, state):
        return y, state


def forward_only(x):
    return jnp.tanh(x)


@dataclasses.dataclass(frozen=True)
class Normalized:
    """``x * norm`` where the norm is state set by ``right_inverse`` (like orthogonal's base)."""

    def init(self, value, key):
        return None, jnp.ones((), value.dtype)

    def forward(self, x, *, params, state):
        return x * state

    def right_inverse(self, y, *, params, state):
        norm = jnp.sqrt(jnp.sum(y * y))
        return y / norm, norm
