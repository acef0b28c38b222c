"""paramx quickstart: constrain a Flax MLP, train it, checkpoint it, export it.

1. A small Flax MLP (2 -> 32 -> 32 -> 1, times a learned output ``scale``) fits a smooth
   function of points generated with ``jax.random``.
2. Three parametrizations are written by hand with ``px.Parametrization``: ``symmetric``
   (a square kernel), ``positive`` (softplus keeps ``scale`` > 0) and the stateful
   ``spectral_norm``, which divides a kernel by its top singular value, estimated by power
   iteration whose vector ``u`` is non-trainable state.
3. They are registered on what ``model.init`` returns; ``spectral_norm`` goes on every kernel
   through a predicate, chained after ``symmetric`` on the hidden kernel.
4. optax.adam trains the raw originals in one jitted step that materializes the weights once
   (updating ``u``, torch's training mode) and calls ``model.apply``.
5. The constraints are checked, a checkpoint goes through ``flax.serialization`` and back, and
   ``px.remove_parametrizations`` exports plain Flax params.

Each kernel has spectral norm 1 and tanh is 1-Lipschitz, so the MLP is ``scale``-Lipschitz.
Run: ``python examples/quickstart.py [--steps N] [--seed S] [--smoke]``
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import paramx as px

KERNELS = ("Dense_0", "Dense_1", "Dense_2")  # the layers' names in model.init's output


class MLP(nn.Module):
    """2 -> 32 -> 32 -> 1 with tanh activations, times a learned output scale."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(32)(x))
        x = nn.tanh(nn.Dense(32)(x))  # Dense_1: the square kernel we make symmetric
        x = nn.Dense(1)(x)
        return self.param("scale", nn.initializers.ones, (), jnp.float32) * x


def make_data(key, n=512):
    """Points in [-2, 2]^2 and a smooth target, sin(2 x0) cos(x1)."""
    x = jax.random.uniform(key, (n, 2), jnp.float32, minval=-2.0, maxval=2.0)
    return x, jnp.sin(2.0 * x[:, :1]) * jnp.cos(x[:, 1:])


# (a) Plain form: forward(original) -> value, right_inverse(value) -> original.
symmetric = px.Parametrization(
    forward=lambda x: jnp.triu(x) + jnp.triu(x, 1).T, right_inverse=jnp.triu, name="symmetric"
)


def inverse_softplus(y):
    """log(exp(y) - 1), written to stay finite for tiny and large y; keeps y's dtype."""
    y = jnp.maximum(y, jnp.finfo(y.dtype).tiny)
    return y + jnp.log(-jnp.expm1(-y))


# (b) right_inverse makes registration exact: softplus(inverse_softplus(1.0)) == 1.0.
positive = px.Parametrization(
    forward=jax.nn.softplus, right_inverse=inverse_softplus, name="positive"
)


def _unit(v):
    return v / (jnp.linalg.norm(v) + 1e-12)


def power_step(w, u):
    """One power-iteration step towards the top right singular vector of w."""
    return _unit(w.T @ _unit(w @ u))


def spectral_init(value, key):
    """Runs once at registration: (params, state) = (None, a converged vector u)."""
    u = _unit(jax.random.normal(key, value.shape[-1:], value.dtype))
    return None, jax.lax.fori_loop(0, 200, lambda _, u: power_step(value, u), u)


# (c) Stateful form: functions take params= and state=; update_state runs (without gradient)
# before forward only when materialize is asked to update state. ||w u|| is the top singular
# value when u is the top right singular vector.
spectral_norm = px.Parametrization(
    forward=lambda w, *, params, state: w / jnp.linalg.norm(w @ state),
    # As in torch: the map is scale-invariant, so store the value itself as the original.
    right_inverse=lambda value, *, params, state: (value, state),
    init=spectral_init,
    update_state=lambda w, *, params, state: power_step(w, state),
    name="spectral_norm",
)


def constrain(variables, key):
    """Registers the three parametrizations on model.init's output."""
    tree = px.register_parametrization(variables, "params/Dense_1/kernel", symmetric)
    tree = px.register_parametrization(tree, "params/scale", positive)
    is_kernel = lambda path, leaf: px.path_keys(path)[-1] == "kernel"
    # One predicate, three kernels; on Dense_1 it is appended: symmetric -> spectral_norm.
    return px.register_parametrization(tree, is_kernel, spectral_norm, key=key)


def check(label, value, ok):
    """Prints a labelled value; raises (so the script exits non-zero) if the check failed."""
    print(f"  {label:<56} {value:.3g}" if isinstance(value, float) else f"  {label:<56} {value}")
    if not ok:
        raise AssertionError(f"check failed: {label}: {value}")


def max_diff(a, b):
    """Largest absolute difference between two trees of arrays."""
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def registration_checks(variables, plain):
    """Compares materialize right after registration with model.init, recomputed in numpy."""
    init, got = (jax.tree_util.tree_map(np.asarray, t)["params"] for t in (variables, plain))
    w = init["Dense_1"]["kernel"]
    init["Dense_1"]["kernel"] = np.triu(w) + np.triu(w, 1).T  # what `symmetric` makes of it
    kernels = [(init[n].pop("kernel"), got[n].pop("kernel")) for n in KERNELS]
    exact = max_diff(init, got)  # biases untouched; scale through softplus(inverse_softplus)
    check("materialize == model.init (biases, positive scale)", exact, exact < 1e-6)
    proj = max(max_diff(w / np.linalg.norm(w, 2), g) for w, g in kernels)
    check("materialize == model.init / top singular value (kernels)", proj, proj < 1e-4)


def train(model, params, state, x, y, steps):
    """Adam on the trainable half; one jitted step materializes once, updating the state."""
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train_step(params, state, opt_state):
        def loss_fn(params):
            plain, new_state = px.materialize(params, state, update_state=True)
            return jnp.mean((model.apply(plain, x) - y) ** 2), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # optax's bias correction (`decay ** count`, int32 count) is not clean under strict
        # dtype promotion; relax it for the optimizer only (paramx itself is strict-clean).
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for step in range(1, steps + 1):
        params, state, opt_state, loss = train_step(params, state, opt_state)
        losses.append(float(loss))
        if step == 1 or step % max(1, steps // 5) == 0:
            print(f"  step {step:5d}  loss {losses[-1]:.5f}")
    ok = bool(np.all(np.isfinite(losses))) and (steps < 2 or losses[-1] < losses[0])
    check("loss went down", f"{losses[0]:.4f} -> {losses[-1]:.4f}", ok)
    return params, state


@jax.jit
def refresh(params, state):
    """100 power-iteration steps and nothing else: the state is plain data you thread."""
    step = lambda _, s: px.materialize(params, s, update_state=True)[1]
    return jax.lax.fori_loop(0, 100, step, state)


def top_singular_values(plain):
    """The exact spectral norm (by SVD) of each kernel of a plain tree."""
    return {n: float(np.linalg.norm(plain["params"][n]["kernel"], 2)) for n in KERNELS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps (1000)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    parser.add_argument("--smoke", action="store_true", help="5 steps: a quick check for tests")
    args = parser.parse_args(argv)
    steps = 5 if args.smoke else args.steps
    start = time.perf_counter()

    k_data, k_init, k_reg = jax.random.split(jax.random.key(args.seed), 3)
    x, y = make_data(k_data)
    model = MLP()
    variables = model.init(k_init, x)
    tree = constrain(variables, k_reg)
    print("Registered parametrizations:\n" + px.summary(tree))
    print("Registration (right_inverse is the initialization transform):")
    registration_checks(variables, px.materialize(tree))

    params0, state0 = px.split_state(tree)  # trainable half -> optax; state threaded by hand
    print(f"Training {steps} steps (adam, full batch of {x.shape[0]}):")
    params, state = train(model, params0, state0, x, y, steps)

    print("Constraints after training:")
    during = top_singular_values(px.cached(params, state))  # evaluation: no state update
    state = refresh(params, state)  # one power step per training step lags a little
    plain = px.cached(params, state)
    w = np.asarray(plain["params"]["Dense_1"]["kernel"])
    check("symmetric: max |W - W^T| of Dense_1/kernel", max_diff(w, w.T), np.all(w == w.T))
    scale = float(plain["params"]["scale"])
    check("positive: scale (the MLP's Lipschitz bound)", f"{scale:.4f}", scale > 0)
    for name, sigma in top_singular_values(plain).items():
        value = f"{sigma:.5f} (in training: {during[name]:.5f})"
        check(f"spectral_norm: top singular value of {name}/kernel", value, abs(sigma - 1) < 1e-2)

    print("Checkpoint round trip (flax.serialization):")
    blob = serialization.to_bytes({"params": params, "state": state})
    target = {"params": params0, "state": state0}  # same registrations, untrained values
    restored = serialization.from_bytes(target, blob)
    back = px.cached(restored["params"], restored["state"])
    diff = max_diff(back, plain)
    check(f"saved {len(blob)} bytes; max |restored - trained| weights", diff, diff == 0.0)
    diff = max_diff(model.apply(back, x), model.apply(plain, x))
    check("max |restored - trained| outputs", diff, diff == 0.0)

    print("Export to plain Flax params (remove_parametrizations, leave_parametrized=True):")
    exported = px.remove_parametrizations(px.merge_state(params, state), lambda path, leaf: True)
    same = jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(variables)
    ok = same and not px.is_parametrized(exported)
    check("model.init's structure, nothing parametrized", same, ok)
    diff = max_diff(model.apply(exported, x), model.apply(px.materialize(params, state), x))
    check("max |model.apply(exported) - model.apply(materialized)|", diff, diff == 0.0)
    print(f"quickstart OK ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
