"""Training a Flax linen model whose parametrizations are declared in the model definition.

The adding problem (a standard test for recurrent networks): each sequence carries random
values and two markers; the target is the sum of the two marked values. The model is an
RNN whose recurrent kernel is orthogonal (`paramx.linen.Parametrize` around the scanned
cell, so the matrix exponential is computed once per sequence, not once per step), read out
by a spectral-normalized layer and a weight-normalized layer.

Shows: declaring parametrizations with `paramx.linen.Parametrize`; init storing
right_inverse of the initializer's output; the state updated only in a training step
(`use_running_average=not train`, as for BatchNorm); a jitted optax loop; constraints
checked after training; a msgpack checkpoint round trip; and exporting the plain parameters
for a model without paramx.

Writes ``linen_training.png``, the loss curve against the loss of guessing the mean.
"""

from __future__ import annotations

import _util
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paramx as px


class Cell(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, h, x):
        w = self.param("recurrent", nn.initializers.orthogonal(), (self.hidden, self.hidden))
        h = jnp.tanh(h @ w + nn.Dense(self.hidden, name="input")(x))
        return h, h


class Readout(nn.Module):
    @nn.compact
    def __call__(self, h):
        h = jax.nn.relu(nn.Dense(32, name="hidden")(h))
        return nn.Dense(1, name="out")(h)[:, 0]


class AddingRNN(nn.Module):
    """The model; ``parametrized=False`` is the same architecture without paramx."""

    hidden: int
    parametrized: bool = True

    @nn.compact
    def __call__(self, xs, train: bool = False):
        rnn = nn.scan(
            Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
        )(self.hidden, name="rnn")
        readout = Readout(name="readout")
        if self.parametrized:
            # Around the scanned cell: the orthogonal map runs once per sequence.
            rnn = px.linen.Parametrize(rnn, {"recurrent": px.Orthogonal("matrix_exp")})
            # As for BatchNorm: spectral norm's power iteration runs in training steps only.
            readout = px.linen.Parametrize(
                readout,
                {"hidden/kernel": px.SpectralNorm(), "out/kernel": px.WeightNorm()},
                use_running_average=not train,
            )
        _, hs = rnn(jnp.zeros((xs.shape[0], self.hidden), xs.dtype), xs)
        return readout(hs[:, -1])


def adding_batch(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    kv, km = jax.random.split(key)
    values = jax.random.uniform(kv, (batch, length))
    first = jax.random.randint(km, (batch,), 0, length // 2)
    second = jax.random.randint(jax.random.fold_in(km, 1), (batch,), length // 2, length)
    rows = jnp.arange(batch)
    markers = jnp.zeros((batch, length)).at[rows, first].set(1.0).at[rows, second].set(1.0)
    target = values[rows, first] + values[rows, second]
    return jnp.stack([values, markers], axis=-1), target


def plot(losses: list[float], baseline: float, out) -> None:
    fig, ax = _util.figure(figsize=(6, 3.6))
    ax.semilogy(np.arange(1, len(losses) + 1), losses, lw=0.8, label="orthogonal RNN (paramx)")
    ax.axhline(baseline, color="k", ls="--", label="guessing the mean")
    ax.set(title="adding problem: training loss", xlabel="step", ylabel="MSE")
    ax.legend()
    _util.save(fig, out, "linen_training.png")


def main(argv: list[str] | None = None) -> None:
    parser = _util.parser(__doc__)
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--length", type=int, default=20, help="sequence length (default 20)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.length, args.hidden = 20, 8, 8
    timer = _util.Timer()

    model = AddingRNN(args.hidden)
    key = jax.random.key(args.seed)
    xs, _ = adding_batch(key, args.batch, args.length)
    variables = model.init(key, xs)
    params, state = variables["params"], variables["paramx_state"]
    print(px.summary(params))

    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, state, opt_state, key):
        xs, ys = adding_batch(key, args.batch, args.length)

        def loss_fn(params):
            # A training step: spectral norm takes one power-iteration step, and the new
            # state comes back in the mutable collection.
            pred, updated = model.apply(
                {"params": params, "paramx_state": state}, xs, train=True, mutable=["paramx_state"]
            )
            return jnp.mean((pred - ys) ** 2), updated["paramx_state"]

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    baseline = 1.0 / 6.0  # the loss of always predicting 1, the mean of the target
    report, losses = _util.every(args.steps, 8), []
    for step in _util.progress(args.steps, "training", smoke=args.smoke):
        params, state, opt_state, loss = train_step(
            params, state, opt_state, jax.random.fold_in(key, step + 1)
        )
        losses.append(float(loss))
        if step + 1 in report:
            print(f"step {step + 1:4d}  loss {losses[-1]:.4f}  (guessing the mean: {baseline:.4f})")

    # Constraints hold after training.
    plain = px.materialize(params, state)
    rec = np.asarray(plain["rnn"]["recurrent"], np.float64)  # checked in float64, on the host
    ortho_err = float(np.max(np.abs(rec.T @ rec - np.eye(args.hidden))))
    sigma = float(np.linalg.svd(np.asarray(plain["readout"]["hidden"]["kernel"]))[1][0])
    print(f"recurrent kernel: max |W^T W - I| = {ortho_err:.2e}")
    print(f"readout hidden kernel: largest singular value = {sigma:.4f} (spectral norm: ~1)")
    if ortho_err > 1e-4 or abs(sigma - 1.0) > 0.1:
        raise SystemExit("a constraint does not hold")

    # Checkpoint round trip: nested keys, state included.
    trained = {"params": params, "paramx_state": state}
    blob = flax.serialization.to_bytes(trained)
    target = jax.eval_shape(lambda: model.init(key, xs))
    restored = flax.serialization.from_bytes(target, blob)
    x_eval, y_eval = adding_batch(jax.random.fold_in(key, 10**6), 256, args.length)
    y_trained = model.apply(trained, x_eval)
    same = np.array_equal(model.apply(restored, x_eval), y_trained)
    print(f"checkpoint: {len(blob) / 1024:.1f} KiB, restored model gives identical outputs: {same}")

    # Export for serving: the plain model (no paramx) reads the materialized tree.
    served = AddingRNN(args.hidden, parametrized=False).apply({"params": plain}, x_eval)
    gap = float(jnp.max(jnp.abs(served - y_trained)))
    print(f"export: plain model vs parametrized model, max difference {gap:.1e}")
    eval_loss = float(jnp.mean((y_trained - y_eval) ** 2))
    print(f"eval loss {eval_loss:.4f}")
    plot(losses, baseline, args.out)
    if not same or gap > 1e-5:
        raise SystemExit("checkpoint or export mismatch")
    if not args.smoke and eval_loss > 0.75 * baseline:
        raise SystemExit(f"training did not beat the baseline: {eval_loss:.4f}")
    print(f"linen_training OK ({timer})")


if __name__ == "__main__":
    main()
