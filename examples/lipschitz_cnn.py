"""A 1-Lipschitz CNN with certified robust accuracy, against a plain CNN, on generated textures.

The data are 16x16 grayscale images of five texture classes (horizontal, vertical and
diagonal stripes, checkerboards, concentric rings), each with a random frequency, phase,
contrast and a smooth background, plus pixel noise: generated here, nothing is downloaded.

Two CNNs of the same shape (Flax linen; the 1 input channel zero-padded to 16, two 3x3 conv
layers at 16x16, a 2x2 average pool times 2, zero-padding to 32 channels, two 3x3 conv layers
at 8x8, a global average pool times 8, a Dense head; every conv with circular padding and
followed by MaxMin, the pairwise sort of channel halves) see the same batches:

* the 1-Lipschitz CNN: every kernel constrained with one of paramx's Lipschitz / orthogonal
  convolutions (``--method``, registered on ``model.init``'s output with the conv's
  ``ConvGeometry``; the default ``aol``); every other piece of the network is 1-Lipschitz in
  the l2 norm (channel zero-padding and MaxMin are isometries, the pools as scaled above have
  norm 1), so the network's certified bound L is the product of the layers' certified bounds
  (each parametrization's ``lipschitz_bound``), 1 up to float rounding. Trained with
  cross-entropy on ``temperature * logits``, the true class's logit lowered by a margin
  (``--margin``): a 1-Lipschitz network needs its logits scaled up to be confident;
* a plain CNN, trained with plain cross-entropy. Its L is the product of the exact operator
  norms of its layers: for a circular conv, the largest singular value over all DFT
  frequencies (Sedghi et al. 2019), computed in float64.

A test point is CERTIFIED at l2 radius r when it is classified correctly and its logit
margin exceeds sqrt(2) * L * r: then no perturbation of norm at most r can change the
prediction. Both models are also attacked (l2 PGD on the margin) at each radius: the attacked
accuracy is an upper bound on the true robust accuracy, the certified one a lower bound.

What it checks (non-zero exit when one fails):
  * each constrained layer's exact operator norm (float64, circular) is at most its certified
    bound, and the 1-Lipschitz network's bound L is at most 1 + 1e-3 (``power``: 1 + 1e-2,
    one power step per update lags behind the moving kernel);
  * the measured Lipschitz constant of each network (the largest spectral norm of its input
    Jacobian over test points, a lower estimate) is at most its certified L;
  * no certified point is broken by the attack at its radius;
  * accuracy thresholds that the defaults reach (none with --smoke).

The figure: samples of each class, certified and attacked accuracy against the radius for
both models, and the training loss.

Run: ``python examples/lipschitz_cnn.py`` (1-2 minutes on 2 CPU cores). Other methods:
``--method soc`` (skew-orthogonal convs, 6 terms: 11x11 merged kernels, about 70x the CPU
time per step), ``cayley`` (orthogonal circular convs by the Cayley transform in the
Fourier domain, with kernels as large as the feature maps: slower still),
``power`` / ``fft`` / ``gram`` (operator-norm spectral normalization: power iteration, exact
FFT, certified Gram bound), ``sll`` (SLL residual blocks in place of conv + MaxMin).
"""

from __future__ import annotations

import os

# AOL's and Cayley's registration call eigh / SVD on small matrices: one OpenBLAS thread is
# fastest, and its worker threads are slow on a busy machine (examples/README.md, "CPU note").
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math
from collections.abc import Callable, Sequence
from typing import Any

import _util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paramx as px
from paramx import lipschitz

CLASSES = ("horizontal", "vertical", "diagonal", "checker", "rings")
METHODS = ("aol", "soc", "cayley", "power", "fft", "gram", "sll")
SOC_TERMS = 6


# ----- data ------------------------------------------------------------------------------------


def make_images(rng: np.random.Generator, n: int, size: int, noise: float) -> tuple:
    """``n`` images ``(n, size, size, 1)`` in float32 and their labels: a random texture of each
    class with random frequency, phase, contrast, a smooth background and pixel noise."""
    labels = rng.integers(0, len(CLASSES), n)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    yy, xx = yy[None] / size, xx[None] / size  # (1, size, size), in [0, 1)
    freq = rng.uniform(1.5, 3.5, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    sign = rng.choice([-1.0, 1.0], (n, 1, 1))
    cy, cx = rng.uniform(0.25, 0.75, (2, n, 1, 1))
    waves = {
        0: np.sin(2 * np.pi * freq * yy + phase),
        1: np.sin(2 * np.pi * freq * xx + phase),
        2: np.sin(2 * np.pi * freq * (xx + sign * yy) / np.sqrt(2) + phase),
        3: np.sin(2 * np.pi * freq * xx + phase) * np.sin(2 * np.pi * freq * yy + phase * 0.7),
        4: np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy) * 1.5 + phase),
    }
    images = np.zeros((n, size, size))
    for c, wave in waves.items():
        images = np.where((labels == c)[:, None, None], wave, images)
    contrast = rng.uniform(0.3, 0.8, (n, 1, 1))
    slope = rng.normal(0, 0.5, (n, 2, 1, 1))
    background = slope[:, 0] * (yy - 0.5) + slope[:, 1] * (xx - 0.5)
    images = contrast * images + background + noise * rng.standard_normal(images.shape)
    return images[..., None].astype(np.float32), labels.astype(np.int32)


# ----- the network -------------------------------------------------------------------------------


def maxmin(x: jax.Array) -> jax.Array:
    """The pairwise sort of the two channel halves: 1-Lipschitz, gradient-norm preserving."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)


def pad_channels(x: jax.Array, c: int) -> jax.Array:
    """Zero channels up to ``c``: an isometry."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c - x.shape[-1])])


class CNN(nn.Module):
    """Four conv layers (circular padding) with MaxMin, 1-Lipschitz pools, a Dense head.

    ``kernel`` is each conv's spatial kernel size (``None``: as large as its input, for the
    Cayley convs); ``sll`` replaces each conv + MaxMin by an SLL residual block.
    """

    widths: tuple[int, int]
    classes: int
    kernel: int | None = 3
    sll: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(4):
            if i == 2:
                x = 2.0 * nn.avg_pool(x, (2, 2), strides=(2, 2))  # norm 1
            if i in (0, 2):
                x = pad_channels(x, self.widths[i // 2])
            c = self.widths[i // 2]
            k = x.shape[1] if self.kernel is None else self.kernel
            if self.sll:
                x = px.linen.SLLConv(c, (3, 3), padding="CIRCULAR", name=f"conv{i}")(x)
            else:
                x = maxmin(nn.Conv(c, (k, k), padding="CIRCULAR", name=f"conv{i}")(x))
        x = jnp.mean(x, axis=(1, 2)) * math.sqrt(x.shape[1] * x.shape[2])  # norm 1
        return nn.Dense(self.classes, name="head")(x)


def input_sizes(image: int) -> dict[str, int]:
    """The spatial size of each conv layer's input."""
    return {"conv0": image, "conv1": image, "conv2": image // 2, "conv3": image // 2}


def kernel_size(method: str | None) -> int | None:
    """The conv kernel size a method's Conv must declare."""
    if method == "soc":
        return lipschitz.soc_kernel_size(3, SOC_TERMS)[0]
    return None if method == "cayley" else 3


def register(tree: Any, method: str, image: int, key: jax.Array) -> Any:
    """Constrains every conv kernel (and the head) of ``model.init``'s output with ``method``."""

    def constrain(tree: Any, where: str, geometry: Any, key: jax.Array) -> Any:
        if method == "aol":
            return lipschitz.aol(tree, where, geometry=geometry)
        if method == "soc":
            return lipschitz.soc(tree, where, terms=SOC_TERMS, geometry=geometry)
        if method == "cayley":
            return lipschitz.cayley_conv(tree, where, geometry=geometry)
        return lipschitz.conv_spectral_norm(tree, where, geometry=geometry, method=method, key=key)

    keys = jax.random.split(key, 5)
    if method != "sll":  # SLL blocks are 1-Lipschitz by their construction
        for i, (layer, size) in enumerate(input_sizes(image).items()):
            geometry = lipschitz.ConvGeometry(input_size=(size, size), padding="CIRCULAR")
            tree = constrain(tree, f"params/{layer}/kernel", geometry, keys[i])
    if method in ("sll", "fft", "cayley"):  # Dense head: AOL (fft and cayley are for convs)
        return lipschitz.aol(tree, "params/head/kernel")
    return constrain(tree, "params/head/kernel", None, keys[4])


# ----- Lipschitz bounds --------------------------------------------------------------------------


def circular_norm(kernel: np.ndarray, size: int) -> float:
    """The exact operator norm of a circular, stride-1 conv on ``size x size`` inputs, in
    float64: the largest singular value of its matrices at the DFT frequencies (a kernel larger
    than the input wraps around, as the circular conv does); a Dense kernel's spectral norm."""
    k = np.asarray(kernel, np.float64)
    if k.ndim == 2:
        return float(np.linalg.norm(k, 2))
    dft = [
        np.exp(-2j * np.pi * np.outer(np.arange(size), np.arange(n)) / size) for n in k.shape[:2]
    ]
    resp = np.einsum("at,bs,tsio->abio", dft[0], dft[1], k)
    return float(np.linalg.svd(resp, compute_uv=False).max())


def layer_bounds(tree: Any, image: int) -> dict[str, tuple[float, float]]:
    """Per layer: (certified bound, exact norm in float64).

    The certified bounds come from paramx's reading function ``lipschitz``: a parametrized
    kernel's parametrization certifies its own layer (``lipschitz_bound``), a plain kernel is
    bounded by Gram iteration on its circular conv (tight); its table is printed. An SLL
    block's bound is ``SLL.block_lipschitz_bound`` of its rescaled kernel (the block is
    1-Lipschitz by construction; ``lipschitz`` reads kernels, not blocks)."""
    plain = px.materialize(tree)["params"]
    sizes = {**input_sizes(image), "head": 0}
    geometry = {
        f"params/{layer}/kernel": lipschitz.ConvGeometry(input_size=(n, n), padding="CIRCULAR")
        for layer, n in input_sizes(image).items()
    }
    kernels = lambda path, leaf: px.path_keys(path)[-1] == "kernel"
    report = lipschitz.lipschitz(tree, kernels, geometry=geometry)
    print(str(report))
    out = {}
    for layer, size in sizes.items():
        value = plain[layer]["kernel"]
        if "log_q" in plain[layer]:  # an SLL block: its rescaled kernel K
            kernel = lipschitz.SLL().forward(value, plain[layer]["log_q"])
            certified = float(lipschitz.SLL().block_lipschitz_bound(kernel))
            out[layer] = (certified, circular_norm(np.asarray(kernel), size))
            continue
        certified = float(report[f"params/{layer}/kernel"].certified)
        out[layer] = (certified, circular_norm(np.asarray(value), size))
    return out


# ----- training and evaluation -------------------------------------------------------------------


def make_step(model: CNN, tx: Any, temperature: float, margin: float) -> Callable:
    """One jitted Adam step on the split tree; ``temperature = 1, margin = 0`` is plain
    cross-entropy."""

    @jax.jit
    def step(params: Any, state: Any, opt: Any, x: jax.Array, y: jax.Array) -> tuple:
        def loss_fn(params: Any) -> tuple:
            plain, new_state = px.materialize(params, state, update_state=True)
            logits = model.apply(plain, x)
            shifted = logits - margin * jax.nn.one_hot(y, logits.shape[-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(temperature * shifted, y)
            return jnp.mean(ce), new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), state, opt, loss

    return step


def margins(logits: jax.Array, y: jax.Array) -> jax.Array:
    """``f_y(x) - max_{j != y} f_j(x)`` (negative where the prediction is wrong)."""
    true = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1]) > 0, -jnp.inf, logits), -1)
    return true - other


def pgd_margins(
    apply: Callable, x: jax.Array, y: jax.Array, radius: float, steps: int
) -> jax.Array:
    """The margin after an l2 PGD attack of norm ``radius`` on it (``steps`` normalized
    gradient steps of size 2.5 r / steps, projected on the ball)."""

    def margin_sum(delta: jax.Array) -> jax.Array:
        return jnp.sum(margins(apply(x + delta), y))

    def body(_: int, delta: jax.Array) -> jax.Array:
        g = jax.grad(margin_sum)(delta)
        g = (
            g
            / jnp.maximum(jnp.linalg.norm(g.reshape(len(g), -1), axis=-1), 1e-12)[
                :, None, None, None
            ]
        )
        delta = delta - 2.5 * radius / steps * g
        norm = jnp.linalg.norm(delta.reshape(len(delta), -1), axis=-1)[:, None, None, None]
        return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))

    delta = jax.lax.fori_loop(0, steps, body, jnp.zeros_like(x))
    return margins(apply(x + delta), y)


def jacobian_norm(apply: Callable, x: jax.Array) -> float:
    """The largest spectral norm of the logits' Jacobian over the points ``x``: a lower
    estimate of the network's Lipschitz constant."""
    jac = jax.vmap(jax.jacrev(lambda p: apply(p[None])[0]))(x)  # (n, classes, h, w, 1)
    jac = jac.reshape(len(x), jac.shape[1], -1)
    return float(jnp.max(jnp.linalg.norm(jac, ord=2, axis=(1, 2))))


# ----- figure ------------------------------------------------------------------------------------


def plot(
    images: np.ndarray,
    labels: np.ndarray,
    radii: np.ndarray,
    attack_radii: Sequence[float],
    curves: dict[str, dict[str, np.ndarray]],
    losses: dict[str, list[float]],
    method: str,
    out: Any,
) -> None:
    """Samples; certified and attacked accuracy against the radius; training losses."""
    fig = _util.figure(figsize=(13, 4.2))[0]
    fig.clf()
    grid = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.4, 1.2], wspace=0.3)
    sub = grid[0].subgridspec(len(CLASSES), 3, hspace=0.15, wspace=0.05)
    for c in range(len(CLASSES)):
        picks = np.flatnonzero(labels == c)[:3]
        for j, idx in enumerate(picks):
            ax = fig.add_subplot(sub[c, j])
            ax.imshow(images[idx, ..., 0], cmap="gray", vmin=-1.5, vmax=1.5)
            ax.set(xticks=[], yticks=[])
            if j == 0:
                ax.set_ylabel(CLASSES[c], fontsize=9)
    ax = fig.add_subplot(grid[1])
    colors = {"1-Lipschitz CNN": "tab:blue", "plain CNN": "tab:orange"}
    for name, curve in curves.items():
        ax.plot(radii, curve["certified"], color=colors[name], lw=2, label=f"{name}, certified")
        ax.plot(attack_radii, curve["attacked"], "o--", color=colors[name], label=f"{name}, PGD")
    ax.set(
        xlabel="l2 radius r",
        ylabel="test accuracy",
        ylim=(-0.02, 1.02),
        title=f"certified vs attacked accuracy ({method})",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(grid[2])
    for name, loss in losses.items():
        ax.plot(np.arange(1, len(loss) + 1), loss, color=colors[name], label=name, alpha=0.8)
    ax.set(xlabel="training step", ylabel="training loss (own objective)", yscale="log")
    ax.set_title("training")
    ax.legend(fontsize=8)
    _util.save(fig, out, "lipschitz_cnn.png")


# ----- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Trains both CNNs, certifies them, checks the bounds, writes the figure."""
    p = _util.parser(__doc__)
    p.add_argument("--method", choices=METHODS, default="aol", help="constraint (default aol)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--image", type=int, default=16, help="image size (default 16)")
    p.add_argument("--widths", type=int, nargs=2, default=(16, 32), help="channels (16 32)")
    p.add_argument("--noise", type=float, default=0.5, help="pixel noise std (default 0.5)")
    p.add_argument("--temperature", type=float, default=8.0, help="logit scale, 1-Lip (8)")
    p.add_argument("--margin", type=float, default=0.3, help="logit margin, 1-Lip (0.3)")
    p.add_argument("--train", type=int, default=6000, help="training images (default 6000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--attacked", type=int, default=200, help="test images attacked (200)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.image, args.widths = 6, 16, 8, (4, 8)
        args.train, args.test, args.pgd_steps, args.attacked = 64, 32, 2, 16
    timer = _util.Timer()
    rng = np.random.default_rng(args.seed)
    x_train, y_train = make_images(rng, args.train, args.image, args.noise)
    x_test, y_test = make_images(rng, args.test, args.image, args.noise)
    print(
        f"Data: {args.train} training / {args.test} test images {args.image}x{args.image}, "
        f"{len(CLASSES)} classes, pixel noise {args.noise}; mean image l2 norm "
        f"{np.linalg.norm(x_test.reshape(len(x_test), -1), axis=1).mean():.2f}"
    )
    widths = tuple(args.widths)
    key = jax.random.key(args.seed)
    k_lip, k_plain, k_reg = jax.random.split(key, 3)
    models = {
        "1-Lipschitz CNN": CNN(
            widths, len(CLASSES), kernel_size(args.method), sll=args.method == "sll"
        ),
        "plain CNN": CNN(widths, len(CLASSES)),
    }
    dummy = jnp.zeros((1, args.image, args.image, 1))
    trees = {
        "1-Lipschitz CNN": register(
            models["1-Lipschitz CNN"].init(k_lip, dummy), args.method, args.image, k_reg
        ),
        "plain CNN": models["plain CNN"].init(k_plain, dummy),
    }
    print("1-Lipschitz CNN's parametrizations:\n" + px.summary(trees["1-Lipschitz CNN"]))
    objective = {"1-Lipschitz CNN": (args.temperature, args.margin), "plain CNN": (1.0, 0.0)}
    tx = optax.adam(args.lr)
    losses: dict[str, list[float]] = {}
    for name, model in models.items():
        params, state = px.split_state(trees[name])
        opt = tx.init(params)
        step = make_step(model, tx, *objective[name])
        losses[name] = []
        report = _util.every(args.steps)
        print(f"Training the {name} ({args.steps} Adam steps, lr {args.lr}, batch {args.batch}):")
        batches = np.random.default_rng(args.seed + 1)  # the same batches for both models
        for i in _util.progress(args.steps, name, smoke=args.smoke):
            idx = batches.integers(0, args.train, args.batch)
            params, state, opt, loss = step(
                params, state, opt, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
            )
            losses[name].append(float(loss))
            if i + 1 in report:
                print(f"  step {i + 1:5d}  loss {float(loss):.4f}")
        trees[name] = px.merge_state(params, state)

    radii = np.linspace(0, 1.0, 21)
    attack_radii = (0.25, 0.5, 1.0)
    xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
    xa, ya = xt[: args.attacked], yt[: args.attacked]
    curves: dict[str, dict[str, np.ndarray]] = {}
    print("Lipschitz bounds per layer (paramx's reading; checked against float64 exact norms):")
    for name, model in models.items():
        plain = px.precompute(*px.split_state(trees[name]))  # evaluation: no state update
        apply = jax.jit(lambda x, plain=plain, model=model: model.apply(plain, x))
        per_layer = layer_bounds(trees[name], args.image)
        for layer, (certified, exact) in per_layer.items():
            _util.check(
                f"{name}: {layer}: exact {exact:.6f} <= certified",
                f"{certified:.6f}",
                exact <= certified * (1 + 1e-5),
            )
        big_l = float(np.prod([c for c, _ in per_layer.values()]))
        if name == "1-Lipschitz CNN":
            # one power step per update lags behind the moving kernel: "power" is within 1%
            tol = 1e-2 if args.method == "power" else 1e-3
            _util.check(f"{name}: certified L (<= 1 + {tol:g})", f"{big_l:.6f}", big_l <= 1 + tol)
        else:
            _util.check(
                f"{name}: certified L (product of the layers' bounds)", f"{big_l:.3f}", True
            )
        measured = jacobian_norm(apply, xt[: min(100, len(xt))])
        _util.check(
            f"{name}: measured L (max Jacobian norm, 100 points) <= {big_l:.4g}",
            f"{measured:.4f}",
            measured <= big_l,
        )
        m = np.asarray(margins(apply(xt), yt))
        certified_acc = np.array([(m > math.sqrt(2) * big_l * r).mean() for r in radii])
        pgd = jax.jit(lambda x, y, r, apply=apply: pgd_margins(apply, x, y, r, args.pgd_steps))
        ma = m[: args.attacked]
        attacked_acc = [float((ma > 0).mean())]
        for r in attack_radii:
            after = np.asarray(pgd(xa, ya, r))
            attacked_acc.append(float((after > 0).mean()))
            broken = int(np.sum((ma > math.sqrt(2) * big_l * r) & (after <= 0)))
            label = f"{name}: certified points broken by PGD at r = {r:.2f} ({len(ma)} points)"
            _util.check(label, broken, broken == 0)
        curves[name] = {"certified": certified_acc, "attacked": np.array(attacked_acc)}

    print(
        f"Test accuracy at l2 radius r: certified ({args.test} images) / under PGD "
        f"({args.attacked} images, {args.pgd_steps} steps):"
    )
    shown = [0.0, *attack_radii]
    print("  " + " " * 18 + "".join(f"{f'r = {r:.2f}':>17}" for r in shown))
    for name, curve in curves.items():
        cert = [curve["certified"][int(np.argmin(np.abs(radii - r)))] for r in shown]
        cells = "".join(f"{f'{c:.1%} / {a:.1%}':>17}" for c, a in zip(cert, curve["attacked"]))
        print(f"  {name:<18}{cells}")
    lip, plain_c = curves["1-Lipschitz CNN"], curves["plain CNN"]
    # Thresholds the default run (aol, seed 0) reaches with room: clean 78%, certified 41%
    # at r = 0.25 (the plain CNN: 95% clean, 1.5% certified there).
    need = (0.0, 0.0) if args.smoke else (0.7, 0.3)
    i25 = int(np.argmin(np.abs(radii - 0.25)))
    _util.check(
        f"1-Lipschitz CNN: clean accuracy (need >= {need[0]:.0%})",
        f"{lip['certified'][0]:.1%}",
        lip["certified"][0] >= need[0],
    )
    _util.check(
        f"1-Lipschitz CNN: certified accuracy at r = 0.25 (need >= {need[1]:.0%})",
        f"{lip['certified'][i25]:.1%}",
        lip["certified"][i25] >= need[1],
    )
    _util.check(
        "plain CNN: certified accuracy at r = 0.25 (below the 1-Lipschitz CNN's)",
        f"{plain_c['certified'][i25]:.1%}",
        args.smoke or plain_c["certified"][i25] < lip["certified"][i25],
    )
    plot(x_test, y_test, radii, (0.0, *attack_radii), curves, losses, args.method, args.out)
    print(f"lipschitz_cnn OK ({timer})")


if __name__ == "__main__":
    main()
