"""paramx quickstart: constrain a Flax MLP with four parametrizations, train it, save it, export it.

1. A small Flax MLP (2 -> 32 -> 32 -> 32 -> 1, times a learned output ``scale``) fits a smooth
   function of points generated with ``jax.random``.
2. Four parametrizations go on what ``model.init`` returns: the built-ins ``px.weight_norm``
   (first kernel), ``px.orthogonal`` (the square second kernel, matrix exponential with an
   orthogonal base as state) and ``px.spectral_norm`` (the third kernel, power iteration with
   its vectors u, v as state), and a user-written ``positive`` (softplus, with an exact
   ``right_inverse``) on ``scale``.
3. optax.adam (learning rate on a cosine decay) trains the raw originals in one jitted step
   that materializes every constrained weight once (updating the power-iteration state,
   torch's training mode) and calls ``model.apply``.
4. The constraints are checked after training, a checkpoint goes through
   ``flax.serialization`` and back, and ``px.remove_parametrizations`` exports plain Flax
   params that the unmodified model reads.

The orthogonal and spectral-normalized layers have spectral norm 1 and tanh is 1-Lipschitz,
so the MLP's Lipschitz constant is at most ``scale * ||W0|| * ||W3||``: it is printed.
Writes ``quickstart.png``: the loss curve, the fitted function, the kernels' singular values.
"""

from __future__ import annotations

import _util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import paramx as px


class MLP(nn.Module):
    """2 -> 32 -> 32 -> 32 -> 1 with tanh activations, times a learned output scale."""

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.tanh(nn.Dense(32)(x))
        x = nn.Dense(1)(x)
        return self.param("scale", nn.initializers.ones, (), jnp.float32) * x


def make_data(key, n=512):
    """Points in [-2, 2]^2 and a smooth target, sin(2 x0) cos(x1)."""
    x = jax.random.uniform(key, (n, 2), jnp.float32, minval=-2.0, maxval=2.0)
    return x, target(x)


def target(x):
    return jnp.sin(2.0 * x[:, :1]) * jnp.cos(x[:, 1:])


def inverse_softplus(y):
    """log(exp(y) - 1), finite for tiny and large y; keeps y's dtype."""
    y = jnp.maximum(y, jnp.finfo(y.dtype).tiny)
    return y + jnp.log(-jnp.expm1(-y))


# A parametrization written by hand: forward(original) -> value, and right_inverse(value) ->
# original, which registration uses so that the registered value is the initializer's output.
positive = px.Parametrization(
    forward=jax.nn.softplus, right_inverse=inverse_softplus, name="positive"
)


def constrain(variables, key):
    """Registers the four parametrizations on model.init's output (a new tree)."""
    tree = px.weight_norm(variables, "params/Dense_0/kernel")  # g per output unit, and v
    tree = px.orthogonal(tree, "params/Dense_1/kernel")  # matrix_exp, orthogonal base state
    tree = px.spectral_norm(tree, "params/Dense_2/kernel", key=key)  # u, v state
    return px.register_parametrization(tree, "params/scale", positive)


def train(model, params, state, x, y, steps, smoke):
    """Adam on the trainable half; one jitted step materializes once, updating the state."""
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1)))

    @jax.jit
    def train_step(params, state, opt_state):
        def loss_fn(params):
            plain, new_state = px.materialize(params, state, update_state=True)
            return jnp.mean((model.apply(plain, x) - y) ** 2), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    show = _util.every(steps)
    for step in _util.progress(steps, "training", smoke=smoke):
        params, state, opt_state, loss = train_step(params, state, opt_state)
        losses.append(float(loss))
        if step + 1 in show:
            print(f"  step {step + 1:5d}  loss {losses[-1]:.5f}")
    return params, state, np.array(losses)


@jax.jit
def refresh(params, state):
    """50 more power-iteration steps and nothing else: the state is plain data you thread."""
    step = lambda _, s: px.materialize(params, s, update_state=True)[1]
    return jax.lax.fori_loop(0, 50, step, state)


def kernels(plain):
    return [np.asarray(plain["params"][f"Dense_{i}"]["kernel"]) for i in range(4)]


def plot(losses, model, plain, out):
    fig, (a, b, c) = _util.figure(1, 3, figsize=(14, 3.8), layout="constrained")
    a.semilogy(np.arange(1, len(losses) + 1), losses)
    a.set(title="training loss", xlabel="step", ylabel="mean squared error")
    line = jnp.stack([jnp.linspace(-2, 2, 200), jnp.full(200, 0.5)], axis=1)
    b.plot(line[:, 0], target(line)[:, 0], "k--", label="target")
    b.plot(line[:, 0], model.apply(plain, line)[:, 0], label="trained MLP")
    b.set(title="a slice of the fit (x1 = 0.5)", xlabel="x0", ylabel="f(x0, 0.5)")
    b.legend()
    names = ["W0 weight_norm", "W1 orthogonal", "W2 spectral_norm", "W3 plain"]
    for i, (w, name) in enumerate(zip(kernels(plain), names)):
        s = np.linalg.svd(w, compute_uv=False)
        c.plot(np.full(s.shape, i), s, "o", alpha=0.6, label=name)
    c.axhline(1.0, color="gray", lw=0.8)
    c.set(
        title="singular values of each kernel",
        xticks=range(4),
        xticklabels=["W0", "W1", "W2", "W3"],
        xlabel="kernel",
        ylabel="singular value",
    )
    c.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _util.save(fig, out, "quickstart.png")


def main(argv=None):
    parser = _util.parser(__doc__)
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    args = parser.parse_args(argv)
    steps = 5 if args.smoke else args.steps
    timer = _util.Timer()

    k_data, k_init, k_reg = jax.random.split(jax.random.key(args.seed), 3)
    x, y = make_data(k_data)
    model = MLP()
    variables = model.init(k_init, x)
    tree = constrain(variables, k_reg)
    print("Registered parametrizations:\n" + px.summary(tree))

    print("Registration (right_inverse is the initialization transform):")
    init = jax.tree_util.tree_map(np.asarray, variables)["params"]
    got = jax.tree_util.tree_map(np.asarray, px.materialize(tree))["params"]
    w1, w2 = (init[n].pop("kernel") for n in ("Dense_1", "Dense_2"))
    g1, g2 = (got[n].pop("kernel") for n in ("Dense_1", "Dense_2"))
    diff = _util.max_diff(init, got)  # weight_norm and positive are exact inverses
    _util.check("weight_norm, positive, plain leaves: max |value - init|", diff, diff <= 1e-6)
    q, r = np.linalg.qr(w1.T)  # torch's projection, of torch's (out, in) weight W1^T
    diff = float(np.max(np.abs(g1 - (q * np.sign(np.diag(r))).T)))
    _util.check("orthogonal: max |value - Q of QR(init^T), transposed|", diff, diff < 1e-5)
    ratio = g2 / w2  # spectral norm divides by sigma, estimated by 15 power iterations
    err = float(np.ptp(ratio) + abs(np.linalg.norm(g2, 2) - 1))
    _util.check("spectral_norm: value = init / sigma, sigma within 1e-2", err, err < 1e-2)

    params0, state0 = px.split_state(tree)  # trainable half -> optax; state threaded by hand
    print(f"Training {steps} steps (adam, full batch of {x.shape[0]}):")
    params, state, losses = train(model, params0, state0, x, y, steps, args.smoke)
    finite = bool(np.all(np.isfinite(losses)))
    learned = args.smoke or losses[-1] < 0.1 * losses[0]
    _util.check("loss (first -> last)", f"{losses[0]:.4f} -> {losses[-1]:.5f}", finite and learned)

    print("Constraints after training (px.precompute: evaluation, no state update):")
    state = refresh(params, state)  # one power step per training step lags a little
    plain = px.precompute(params, state)
    w0, w1, w2, w3 = kernels(plain)
    g = np.asarray(px.originals(params, "params/Dense_0/kernel")[0])
    err = float(np.max(np.abs(np.linalg.norm(w0, axis=0, keepdims=True) - g)))
    _util.check("weight_norm: max | ||column of W0|| - g |", err, err < 1e-5)
    err = float(np.max(np.abs(w1.T @ w1 - np.eye(32))))
    _util.check("orthogonal: max |W1^T W1 - I|", err, err < 1e-5)
    sigma = float(np.linalg.norm(w2, 2))
    _util.check("spectral_norm: top singular value of W2", f"{sigma:.6f}", abs(sigma - 1) < 1e-3)
    scale = float(plain["params"]["scale"])
    _util.check("positive: scale", scale, scale > 0)
    bound = scale * float(np.linalg.norm(w0, 2)) * float(np.linalg.norm(w3, 2))
    grads = jax.vmap(jax.grad(lambda p: model.apply(plain, p[None])[0, 0]))(x)
    slope = float(jnp.max(jnp.linalg.norm(grads, axis=1)))
    _util.check(
        "largest |grad f| on the data <= Lipschitz bound", f"{slope:.3f} <= {bound:.3f}",
        slope <= bound * (1 + 1e-5),
    )  # fmt: skip

    print("Checkpoint round trip (flax.serialization):")
    blob = serialization.to_bytes({"params": params, "state": state})
    target_tree = {"params": params0, "state": state0}  # same registrations, untrained values
    restored = serialization.from_bytes(target_tree, blob)
    back = px.precompute(restored["params"], restored["state"])
    diff = _util.max_diff(back, plain)
    _util.check(f"saved {len(blob)} bytes; max |restored - trained| weights", diff, diff == 0.0)

    print("Export to plain Flax params (remove_parametrizations, leave_parametrized=True):")
    exported = px.remove_parametrizations(px.merge_state(params, state), lambda p, leaf: True)
    same = jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(variables)
    _util.check("model.init's structure, nothing parametrized", same, same)
    eager = px.materialize(params, state)  # the same computation as the export, unjitted
    diff = _util.max_diff(model.apply(exported, x), model.apply(eager, x))
    _util.check("max |model.apply(exported) - model.apply(materialized)|", diff, diff == 0.0)

    plot(losses, model, plain, args.out)
    print(f"quickstart OK ({timer})")


if __name__ == "__main__":
    main()
