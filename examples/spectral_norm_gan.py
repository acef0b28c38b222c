"""A GAN with a spectrally normalized discriminator, on 8 Gaussians around a circle.

The data are points from a mixture of 8 Gaussians (std 0.05) whose centers sit on a circle of
radius 2. The generator maps 8-D noise to the plane; the discriminator is an MLP with
leaky-ReLU activations whose three kernels are under ``px.spectral_norm``, registered with one
predicate on what ``model.init`` returns. The power-iteration vectors (u, v) are state: they are
split off with ``px.split_state`` and threaded through the jitted step, where
``px.materialize(..., update_state=True)`` takes one power step per discriminator update
(torch's training mode); the generator's step reads the discriminator without updating it.
Both nets train with Adam (betas (0, 0.9), as in the SN-GAN paper) and the non-saturating GAN
loss. The discriminator's learning rate is 4x the generator's (a two time-scale update): a
1-Lipschitz discriminator gives a weak signal at first, and a faster one learns to use its
budget within the default run; with equal rates it needs far more steps.

What it shows:
  * spectral norm holds: after training (and a few extra power iterations) every
    discriminator kernel has top singular value 1 (checked with ``np.linalg.norm(W, 2)``);
  * the product of those values bounds the discriminator's Lipschitz constant (leaky ReLU is
    1-Lipschitz); the largest gradient norm measured at many points, and the largest
    difference quotient over random pairs, stay below it (checked);
  * sample quality: how many of the 8 modes the generator covers, and the fraction of samples
    within 3 std of a center (checked against thresholds the defaults reach);
  * a figure of generated samples over the data at several points of training, plus the
    discriminator's output over the plane.

Run: ``python examples/spectral_norm_gan.py`` (about a minute on 2 CPU cores). Larger
settings: ``--steps 20000 --hidden 256`` (several minutes), or ``--std 0.02`` for sharper
modes (harder: give it more steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import _util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paramx as px

MODES = 8
RADIUS = 2.0
COVER = 0.02  # a mode is covered if at least 2% of the samples lie within 3 std of its center


class Generator(nn.Module):
    """noise -> hidden -> hidden -> 2, ReLU."""

    hidden: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        z = nn.relu(nn.Dense(self.hidden)(z))
        z = nn.relu(nn.Dense(self.hidden)(z))
        return nn.Dense(2)(z)


class Discriminator(nn.Module):
    """2 -> hidden -> hidden -> 1, leaky ReLU (1-Lipschitz); returns the logit."""

    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.leaky_relu(nn.Dense(self.hidden)(x), 0.2)
        x = nn.leaky_relu(nn.Dense(self.hidden)(x), 0.2)
        return nn.Dense(1)(x)[..., 0]


def centers() -> np.ndarray:
    """The 8 mode centers, on the circle of radius ``RADIUS``."""
    angles = 2 * np.pi * np.arange(MODES) / MODES
    return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def sample_data(key: jax.Array, n: int, std: float) -> jax.Array:
    """n points of the mixture: a random center plus Gaussian noise of the given std."""
    km, kn = jax.random.split(key)
    mode = jax.random.randint(km, (n,), 0, MODES)
    return jnp.asarray(centers())[mode] + std * jax.random.normal(kn, (n, 2))


def is_kernel(path: Any, leaf: Any) -> bool:
    """The predicate that selects every Dense kernel (by its last key, never a substring)."""
    return px.path_keys(path)[-1] == "kernel"


def quality(samples: np.ndarray, std: float) -> tuple[int, float, np.ndarray]:
    """(modes covered, fraction of high-quality samples, per-mode fractions within 3 std)."""
    dist = np.linalg.norm(samples[:, None, :] - centers()[None], axis=-1)  # (n, 8)
    near = dist.min(axis=1) <= 3 * std
    share = np.array([(near & (dist.argmin(axis=1) == m)).mean() for m in range(MODES)])
    return int((share >= COVER).sum()), float(near.mean()), share


def make_step(
    gen: Generator, disc: Discriminator, g_tx: Any, d_tx: Any, batch: int, z_dim: int, std: float
) -> Any:
    """One jitted training step: a discriminator update (one power step), then a generator one."""

    @jax.jit
    def step(g_params, d_params, d_state, g_opt, d_opt, key):
        k_real, k_z1, k_z2 = jax.random.split(key, 3)
        real = sample_data(k_real, batch, std)
        fake = gen.apply(g_params, jax.random.normal(k_z1, (batch, z_dim)))

        def d_loss_fn(d_params):
            # training mode: u and v take one power-iteration step; the new state comes back
            plain, new_state = px.materialize(d_params, d_state, update_state=True)
            logits_real = disc.apply(plain, real)
            logits_fake = disc.apply(plain, fake)
            loss = jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake))
            return loss, new_state

        (d_loss, d_state), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
        updates, d_opt = d_tx.update(grads, d_opt, d_params)
        d_params = optax.apply_updates(d_params, updates)

        d_plain = px.materialize(d_params, d_state)  # read only: no power step here

        def g_loss_fn(g_params):
            fake = gen.apply(g_params, jax.random.normal(k_z2, (batch, z_dim)))
            return jnp.mean(jax.nn.softplus(-disc.apply(d_plain, fake)))  # non-saturating

        g_loss, grads = jax.value_and_grad(g_loss_fn)(g_params)
        updates, g_opt = g_tx.update(grads, g_opt, g_params)
        g_params = optax.apply_updates(g_params, updates)
        return g_params, d_params, d_state, g_opt, d_opt, d_loss, g_loss

    return step


@jax.jit
def refresh(d_params: Any, d_state: Any) -> Any:
    """100 extra power-iteration steps and nothing else (the state is data we hold)."""
    body = lambda _, s: px.materialize(d_params, s, update_state=True)[1]
    return jax.lax.fori_loop(0, 100, body, d_state)


def top_singular_values(d_plain: Any) -> dict[str, float]:
    """The exact spectral norm of each discriminator kernel of a plain tree."""
    layers = d_plain["params"]
    return {name: float(np.linalg.norm(np.asarray(layers[name]["kernel"]), 2)) for name in layers}


def lipschitz_estimates(disc: Discriminator, d_plain: Any, key: jax.Array, n: int) -> tuple:
    """Lower estimates of D's Lipschitz constant: (max gradient norm, max pair quotient)."""

    @jax.jit
    def estimate(d_plain: Any, key: jax.Array) -> jax.Array:
        k1, k2, k3 = jax.random.split(key, 3)
        points = jax.random.uniform(k1, (n, 2), minval=-3.0, maxval=3.0)
        grads = jax.vmap(jax.grad(lambda x: disc.apply(d_plain, x)))(points)
        x = jax.random.uniform(k2, (n, 2), minval=-3.0, maxval=3.0)
        y = x + 0.05 * jax.random.normal(k3, (n, 2))  # close pairs: quotients near local slopes
        d = jnp.abs(disc.apply(d_plain, x) - disc.apply(d_plain, y))
        pair = jnp.max(d / jnp.linalg.norm(x - y, axis=-1))
        return jnp.stack([jnp.max(jnp.linalg.norm(grads, axis=-1)), pair])

    grad_max, pair_max = np.asarray(estimate(d_plain, key)).tolist()
    return grad_max, pair_max


def plot(
    snapshots: Sequence[tuple[int, np.ndarray]],
    real: np.ndarray,
    disc: Discriminator,
    d_plain: Any,
    args: Any,
) -> None:
    """Samples over the data at several points of training, and D's logit over the plane."""
    fig, axes = _util.figure(2, 3, figsize=(9.5, 6.4), layout="constrained")
    lim = RADIUS + 1.0
    for ax, (step, fake) in zip(axes.flat, snapshots):
        ax.scatter(*real[:1000].T, s=1.5, c="0.6", alpha=0.5, label="data")
        ax.scatter(*fake[:1000].T, s=1.5, c="tab:red", alpha=0.5, label="generated")
        ax.set_title(f"step {step}")
    ax = axes.flat[-1]
    grid = np.linspace(-lim, lim, 80, dtype=np.float32)
    xx, yy = np.meshgrid(grid, grid)
    logits = jax.jit(disc.apply)(d_plain, jnp.asarray(np.stack([xx, yy], axis=-1)))
    im = ax.contourf(xx, yy, np.asarray(logits), levels=12, cmap="RdBu_r")
    ax.scatter(*real[:300].T, s=2, c="k", alpha=0.5)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("discriminator logit (final)")
    for ax in axes.flat:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    axes.flat[0].legend(loc="upper right", markerscale=6)
    fig.suptitle("GAN with a spectrally normalized discriminator: 8 Gaussians")
    _util.save(fig, args.out, "spectral_norm_gan.png")


def main(argv: Sequence[str] | None = None) -> None:
    """Trains the GAN, checks the Lipschitz bound and the sample quality, writes the figure."""
    p = _util.parser(__doc__)
    p.add_argument("--steps", type=int, default=6000, help="training steps (default 6000)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="generator's learning rate (1e-3)")
    p.add_argument("--lr-d", type=float, default=4e-3, help="discriminator's learning rate (4e-3)")
    p.add_argument("--std", type=float, default=0.05, help="std of each mode (default 0.05)")
    p.add_argument("--z-dim", type=int, default=8, help="noise dimension (default 8)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.hidden = 5, 64, 16
    timer = _util.Timer()
    z_dim, n_eval = args.z_dim, 500 if args.smoke else 2000

    key = jax.random.key(args.seed)
    k_g, k_d, k_sn, k_train, k_eval = jax.random.split(key, 5)
    gen, disc = Generator(args.hidden), Discriminator(args.hidden)
    g_params = jax.jit(gen.init)(k_g, jnp.zeros((1, z_dim)))

    @jax.jit  # registration works under jit too; here it just compiles once, not op by op
    def init_discriminator(k_d: jax.Array, k_sn: jax.Array) -> Any:
        return px.spectral_norm(disc.init(k_d, jnp.zeros((1, 2))), is_kernel, key=k_sn)

    d_tree = init_discriminator(k_d, k_sn)
    print("Discriminator parametrizations:\n" + px.summary(d_tree))
    d_params, d_state = px.split_state(d_tree)  # trainable half -> optax; state threaded

    g_tx = optax.adam(args.lr_g, b1=0.0, b2=0.9)  # SN-GAN's betas
    d_tx = optax.adam(args.lr_d, b1=0.0, b2=0.9)
    g_opt, d_opt = g_tx.init(g_params), d_tx.init(d_params)
    step_fn = make_step(gen, disc, g_tx, d_tx, args.batch, z_dim, args.std)

    z_eval = jax.random.normal(k_eval, (n_eval, z_dim))
    sample = jax.jit(lambda g: gen.apply(g, z_eval))
    shots = set(np.linspace(0, args.steps, 5).astype(int).tolist())
    snapshots = [(0, np.asarray(sample(g_params)))]
    print(
        f"Training {args.steps} steps (Adam, lr G {args.lr_g} / D {args.lr_d}, batch {args.batch}):"
    )
    report = _util.every(args.steps)
    for i in _util.progress(args.steps, "gan", smoke=args.smoke):
        out = step_fn(g_params, d_params, d_state, g_opt, d_opt, jax.random.fold_in(k_train, i))
        g_params, d_params, d_state, g_opt, d_opt, d_loss, g_loss = out
        if i + 1 in shots:
            snapshots.append((i + 1, np.asarray(sample(g_params))))
        if i + 1 in report:
            modes, good, _ = quality(np.asarray(sample(g_params)), args.std)
            print(
                f"  step {i + 1:5d}  D loss {float(d_loss):.3f}  G loss {float(g_loss):.3f}"
                f"  modes {modes}/{MODES}  high quality {good:.1%}"
            )

    print("Spectral norm of the discriminator's kernels (exact, by SVD):")
    during = top_singular_values(px.precompute(d_params, d_state))  # evaluation: no state update
    # One power step per update lags a little behind the moving weights: sigma is slightly
    # underestimated, so W / sigma is slightly above 1 "in training". More steps catch up.
    d_state = refresh(d_params, d_state)
    d_plain = px.precompute(d_params, d_state)
    sigmas = top_singular_values(d_plain)
    for name, sigma in sigmas.items():
        shown = f"{sigma:.5f} (before 100 extra steps: {during[name]:.5f})"
        _util.check(f"top singular value of {name}/kernel", shown, abs(sigma - 1) < 1e-2)

    print("Lipschitz constant of the discriminator (leaky ReLU is 1-Lipschitz):")
    bound = float(np.prod(list(sigmas.values())))
    label = "upper bound: product of the kernels' spectral norms"
    _util.check(label, f"{bound:.5f}", bound < 1.03)
    grad_max, pair_max = lipschitz_estimates(disc, d_plain, k_eval, 10_000)
    label = "lower estimate: max |grad D(x)| over 10k points (<= bound)"
    _util.check(label, f"{grad_max:.5f}", grad_max <= bound)
    label = "lower estimate: max |D(x)-D(y)|/|x-y|, 10k pairs (<= bound)"
    _util.check(label, f"{pair_max:.5f}", pair_max <= bound)

    print(f"Sample quality ({n_eval} samples; covered: >= {COVER:.0%} within 3 std of a center):")
    final = np.asarray(sample(g_params))
    modes, good, share = quality(final, args.std)
    need_modes, need_good = (0, 0.0) if args.smoke else (7, 0.5)
    shares = " ".join(f"{s:.2f}" for s in share)
    _util.check("share of samples near each mode (all finite)", shares, np.isfinite(final).all())
    _util.check(f"modes covered (need >= {need_modes})", f"{modes}/{MODES}", modes >= need_modes)
    _util.check(f"high-quality samples (need >= {need_good:.0%})", good, good >= need_good)

    real = jax.jit(sample_data, static_argnums=(1, 2))(
        jax.random.fold_in(k_eval, 1), n_eval, args.std
    )
    real = np.asarray(real)
    plot(snapshots, real, disc, d_plain, args)
    print(f"spectral_norm_gan OK ({timer})")


if __name__ == "__main__":
    main()
