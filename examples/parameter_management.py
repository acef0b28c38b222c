"""Parameter management: a tied autoencoder with an orthogonal encoder, decay rules, surgery.

The data are generated: points near a random ``rank``-dimensional subspace of R^dim (a
low-rank signal with decaying scales plus isotropic noise). The model is a Flax linen
autoencoder: ``encoder`` (Dense dim -> code), a learnable per-code ``scale`` (``self.param``),
``decoder`` (Dense code -> dim). paramx then manages its parameters:

- ``px.orthogonal`` on ``encoder/kernel``: its columns stay orthonormal (WᵀW = I);
- ``px.tie`` ties ``decoder/kernel`` to the encoder kernel's transpose: the decoder holds no
  array, so checkpoints and the optimizer see one copy, and its gradient flows into the
  encoder's original (torch: ``decoder.weight = encoder.weight`` plus a transpose);
- ``paramx.optim.tags`` with the ready-made rules ``biases`` and ``norm_scales`` gives the
  ``optax.adamw`` decay mask: no weight decay on the biases and the ``scale``;
- ``px.table`` prints every array with its role, chain and health figure (``orth_error``,
  ``‖WᵀW − I‖``) at the start and the end; the health figures are computed inside the jitted
  training loop and plotted over the steps with the loss;
- surgery a quarter of the way in (``--surgery``):
  ``px.remove_parametrizations(..., leave_parametrized=True)`` keeps the trained kernel as a
  plain array, and ``px.orthogonal`` is registered again on it (the trained kernel becomes
  the new base and the original restarts at the identity point: a re-basing of the
  matrix-exponential map, as dynamic trivialization does).
  ``paramx.optim.carry_state`` carries Adam's moments over to the new tree (they follow the
  tensors by path), so training continues without a jump; a second run from the same point
  with a fresh Adam state shows what is lost otherwise.

Checks: the checkpoint (``flax.serialization`` bytes of the trainable half) holds one copy of
the tied kernel; the decoder kernel equals the encoder kernel's transpose after training; the
orthogonality error stays below a bound; the loss went down and ends near the noise floor;
Adam's moments are carried over the surgery unchanged and the loss does not jump there; the
decay mask leaves out exactly the biases and the scale.

Run: ``python examples/parameter_management.py`` (under a minute on 2 CPU cores). Larger
settings: ``--dim 256 --code 32 --rank 32 --steps 4000``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import _util
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paramx as px
from paramx import optim

ORTH_BOUND = 1e-5  # float32: the health figure sits near 1e-7


class TiedAutoencoder(nn.Module):
    """dim -> code -> dim; the decoder kernel is tied to the encoder's by paramx, not here."""

    code: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.code, name="encoder")(x)
        scale = self.param("scale", nn.initializers.ones, (self.code,))  # a custom parameter
        return nn.Dense(x.shape[-1], name="decoder")(h * scale)


def low_rank_data(key: jax.Array, n: int, dim: int, rank: int, noise: float) -> jax.Array:
    """n points near a random rank-dimensional subspace: decaying scales plus noise, centred."""
    kb, kz, kn = jax.random.split(key, 3)
    basis, _ = jnp.linalg.qr(jax.random.normal(kb, (dim, rank)))
    scales = jnp.geomspace(3.0, 0.3, rank)
    z = jax.random.normal(kz, (n, rank)) * scales
    x = z @ basis.T + noise * jax.random.normal(kn, (n, dim))
    return x - x.mean(axis=0)


def make_chunk(model: TiedAutoencoder, x: jax.Array, tx: Any, steps: int) -> Any:
    """A jitted function running ``steps`` full-batch steps; returns the losses and health.

    The health figures are ``px.table(...).health`` of the registered tree at the end of the
    chunk (arrays, so the table is built inside jit).
    """

    def loss_fn(params: Any, state: Any) -> jax.Array:
        plain = px.materialize(px.merge_state(params, state))
        return jnp.mean(jnp.sum((model.apply({"params": plain}, x) - x) ** 2, axis=-1))

    def chunk(params: Any, state: Any, opt: Any) -> tuple:
        def step(carry: tuple, _: None) -> tuple:
            params, opt = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, state)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        (params, opt), losses = jax.lax.scan(step, (params, opt), length=steps)
        health = px.table(px.merge_state(params, state)).health
        return params, opt, losses, health

    return jax.jit(chunk)


def train(
    chunk: Any, params: Any, state: Any, opt: Any, n_chunks: int, desc: str, smoke: bool
) -> tuple:
    """Runs ``n_chunks`` chunks; returns the final params and optimizer state, the losses and
    the encoder's orthogonality error after each chunk."""
    losses, orth = [], []
    for _ in _util.progress(n_chunks, desc, smoke=smoke):
        params, opt, loss, health = chunk(params, state, opt)
        losses.append(np.asarray(loss))
        orth.append(float(health["encoder/kernel"]["orth_error"]))
    return params, opt, np.concatenate(losses), np.asarray(orth)


def decay_mask(params: Any) -> tuple[Any, optim.Tags]:
    """The weight-decay mask from tags: decay everything but the biases and norm scales."""
    tags = optim.tags(params, {"no_decay": [optim.biases, optim.norm_scales]})
    return tags.mask("no_decay", invert=True), tags


def checkpoint_arrays(params: Any) -> dict[str, tuple[int, ...]]:
    """The arrays a ``flax.serialization`` checkpoint of ``params`` holds: {path: shape}."""
    restored = flax.serialization.msgpack_restore(flax.serialization.to_bytes(params))
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {"/".join(px.path_keys(p)): tuple(np.shape(a)) for p, a in flat}


def indent(text: Any) -> str:
    """``str(text)`` with its non-empty lines indented by two spaces."""
    return "\n".join(f"  {line}" if line else "" for line in str(text).splitlines())


def plot(curves: dict[str, np.ndarray], orth: np.ndarray, chunk: int, surgery: int, args: Any):
    """Loss over the steps (carried vs fresh optimizer after surgery) and the health figure."""
    fig, axes = _util.figure(1, 2, figsize=(10, 3.8), layout="constrained")
    ax = axes[0]
    steps = np.arange(1, len(curves["carried"]) + 1)
    ax.plot(steps, curves["carried"], c="tab:blue", label="Adam state carried (carry_state)")
    after = steps[surgery:]
    ax.plot(after, curves["fresh"], c="tab:red", lw=1, label="fresh Adam state after surgery")
    ax.axhline(curves["floor"], c="gray", ls=":", label="noise floor")
    ax.axvline(surgery, c="k", ls="--", lw=1, label="surgery (re-basing)")
    ax.set(yscale="log", xlabel="step", ylabel="reconstruction loss (sum of squares)")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    ax.plot(np.arange(1, len(orth) + 1) * chunk, orth, marker=".", c="tab:green")
    ax.axvline(surgery, c="k", ls="--", lw=1)
    ax.axhline(ORTH_BOUND, c="tab:red", ls=":", label=f"check bound {ORTH_BOUND:g}")
    ax.set(yscale="log", xlabel="step", ylabel="orth_error = ‖WᵀW − I‖")
    ax.set_title("health of encoder/kernel (px.table)")
    ax.legend()
    fig.suptitle("Tied autoencoder, orthogonal encoder, decoder = encoderᵀ (px.tie)")
    _util.save(fig, args.out, "parameter_management.png")


def main(argv: Sequence[str] | None = None) -> None:
    """Builds the tied model, trains it with surgery on the way, checks, writes the figure."""
    p = _util.parser(__doc__)
    p.add_argument("--steps", type=int, default=600, help="full-batch steps (default 600)")
    p.add_argument(
        "--surgery", type=int, default=None, help="surgery after this step (default steps/4)"
    )
    p.add_argument("--dim", type=int, default=64, help="data dimension (default 64)")
    p.add_argument("--code", type=int, default=8, help="code size (default 8)")
    p.add_argument("--rank", type=int, default=8, help="rank of the signal (default 8)")
    p.add_argument("--n", type=int, default=2048, help="data points (default 2048)")
    p.add_argument("--noise", type=float, default=0.1, help="noise std (default 0.1)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    p.add_argument("--decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    p.add_argument("--chunk", type=int, default=10, help="steps between health logs (10)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.dim, args.code, args.rank, args.n, args.chunk = 40, 12, 3, 3, 128, 5
    n_chunks = max(2, args.steps // args.chunk)  # whole chunks, at least one on each side
    surgery = args.steps // 4 if args.surgery is None else args.surgery
    first = min(max(1, surgery // args.chunk), n_chunks - 1)
    timer = _util.Timer()

    k_data, k_init = jax.random.split(jax.random.key(args.seed))
    x = low_rank_data(k_data, args.n, args.dim, args.rank, args.noise)
    model = TiedAutoencoder(args.code)
    tree = model.init(k_init, x[:1])["params"]
    tree = px.orthogonal(tree, "encoder/kernel")
    tree = px.tie(tree, "decoder/kernel", "encoder/kernel", transform=jnp.transpose)
    print("Parameter table at the start (px.table):")
    print(indent(px.table(tree)))

    params, state = px.split_state(tree)
    mask, tags = decay_mask(params)
    print(f"Decay rules (paramx.optim): {tags}; no decay on {', '.join(tags.paths('no_decay'))}")
    tx = optax.adamw(args.lr, weight_decay=args.decay, mask=mask)
    opt = tx.init(params)
    floor = args.noise**2 * (args.dim - min(args.code, args.rank))  # noise outside the code

    chunk = make_chunk(model, x, tx, args.chunk)
    params, opt, loss1, orth1 = train(chunk, params, state, opt, first, "phase 1", args.smoke)

    # Surgery: make the kernel plain (its trained value), then register orthogonal again on it.
    before = px.merge_state(params, state)
    plain = px.remove_parametrizations(before, "encoder/kernel", leave_parametrized=True)
    rebased = px.orthogonal(plain, "encoder/kernel")
    new_params, new_state = px.split_state(rebased)
    new_mask, _ = decay_mask(new_params)
    new_tx = optax.adamw(args.lr, weight_decay=args.decay, mask=new_mask)
    carried = optim.carry_state(new_tx, opt, params, new_params)
    same_value = _util.max_diff(px.materialize(before), px.materialize(rebased))
    # Adam's first and second moments (state[0] of adamw's chain), old and carried, leaf by leaf
    moments = [jax.tree.leaves((o.mu, o.nu)) for o in (opt[0], carried[0])]
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*moments, strict=True))
    new_chunk = make_chunk(model, x, new_tx, args.chunk)
    final, _, loss2, orth2 = train(
        new_chunk, new_params, new_state, carried, n_chunks - first, "phase 2", args.smoke
    )
    fresh = new_tx.init(new_params)
    rest = n_chunks - first
    _, _, loss_fresh, _ = train(
        new_chunk, new_params, new_state, fresh, rest, "phase 2, fresh Adam", args.smoke
    )
    end_tree = px.merge_state(final, new_state)
    print("Parameter table at the end:")
    print(indent(px.table(end_tree)))

    losses = np.concatenate([loss1, loss2])
    orth = np.concatenate([orth1, orth2])
    n_steps = len(losses)
    print(f"Trained {n_steps} steps; surgery after step {len(loss1)}.")
    for s in sorted(_util.every(n_steps)):
        print(f"  step {s:5d}  loss {losses[s - 1]:.4f}")

    print("Checks:")
    stored = checkpoint_arrays(final)
    kernels = [k for k, shape in stored.items() if sorted(shape) == sorted((args.dim, args.code))]
    _util.check("checkpoint: copies of the tied kernel", ", ".join(kernels), len(kernels) == 1)
    untied = px.split_state(px.untie(end_tree))[0]
    tied_bytes, untied_bytes = (len(flax.serialization.to_bytes(t)) for t in (final, untied))
    print(
        f"  (checkpoint bytes: {tied_bytes:,} tied, {untied_bytes:,} after px.untie; "
        f"one kernel is {4 * args.dim * args.code:,})"
    )
    plain_end = px.materialize(end_tree)
    gap = _util.max_diff(plain_end["decoder"]["kernel"], plain_end["encoder"]["kernel"].T)
    _util.check("decoder kernel == encoder kernelᵀ: max |difference|", gap, gap == 0.0)
    w = np.asarray(plain_end["encoder"]["kernel"], np.float64)
    direct = float(np.linalg.norm(w.T @ w - np.eye(args.code)))
    worst = float(max(orth.max(), direct))
    _util.check("orthogonality error, max over training (health)", worst, worst < ORTH_BOUND)
    start, end = float(losses[0]), float(losses[-1])
    _util.check("loss went down", f"{start:.4f} -> {end:.4f}", end < 0.5 * start)
    if not args.smoke:
        _util.check(f"final loss / noise floor {floor:.4f}", end / floor, end < 1.5 * floor)
    _util.check("surgery keeps the function: max |Δ plain params|", same_value, same_value < 1e-5)
    _util.check("Adam moments carried over the surgery: max |Δ|", moved, moved == 0.0)
    jump = float(loss2[0] / loss1[-1])
    _util.check("loss after surgery / before (carried Adam state)", jump, jump < 1.01)
    fresh_jump = float(loss_fresh[: args.chunk].max() / loss1[-1])
    print(
        f"  (with a fresh Adam state: worst loss in the next {args.chunk} steps / before "
        f"= {fresh_jump:.3g})"
    )
    no_decay = tags.paths("no_decay")
    expected = ["decoder/bias", "encoder/bias", "scale"]
    _util.check("no weight decay on", ", ".join(no_decay), no_decay == expected)

    curves = {"carried": losses, "fresh": loss_fresh, "floor": floor}
    plot(curves, orth, args.chunk, len(loss1), args)
    print(f"parameter_management OK ({timer})")


if __name__ == "__main__":
    main()
