"""paramx.nnx: constrain the layers of a Flax NNX MLP in place, torch style, and train it.

1. An NNX MLP (2 -> 32 -> 32 -> 16 -> 1, tanh) fits a smooth function of points generated
   with ``jax.random``.
2. Three torch-named helpers constrain its layers in place: ``weight_norm`` on ``l1``
   (g and v are both ``nnx.Param``), ``orthogonal`` on the square ``l2`` and
   ``spectral_norm`` on ``l3`` (u and v are ``ParametrizationState``, not ``Param``);
   ``l4`` stays plain.
   ``nnx.Linear`` is not modified: it reads ``self.kernel[...]``, which now returns the
   constrained value.
3. ``nnx.Optimizer(model, optax.adam, wrt=nnx.Param)`` trains the raw originals under
   ``nnx.jit``; in training mode each read of the spectral-norm kernel runs one power
   iteration, and NNX carries the new u, v out of the jitted step.
4. The constraints are checked in eval mode (``model.eval()``), the originals are shown
   to hold exactly what the optimizer wrote, and ``remove_parametrizations`` exports a
   plain NNX model that computes the same outputs.

Writes ``nnx_training.png``: the loss curve and the singular values of each kernel.
"""

import _util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import paramx.nnx as pnx


class MLP(nnx.Module):
    """2 -> 32 -> 32 -> 16 -> 1 with tanh activations."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(2, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 32, rngs=rngs)
        self.l3 = nnx.Linear(32, 16, rngs=rngs)
        self.l4 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.l1(x))
        x = jnp.tanh(self.l2(x))
        return self.l4(jnp.tanh(self.l3(x)))


def make_data(key, n=256):
    """Points in [-2, 2]^2 and a smooth target, sin(2 x0) cos(x1)."""
    x = jax.random.uniform(key, (n, 2), jnp.float32, minval=-2.0, maxval=2.0)
    return x, jnp.sin(2.0 * x[:, :1]) * jnp.cos(x[:, 1:])


check = _util.check


def sigma(kernel):
    """Exact spectral norm of a kernel, by SVD."""
    return float(np.linalg.norm(np.asarray(kernel, np.float64), 2))


def orthogonality_error(q):
    """max |Q^T Q - I| for a square kernel."""
    q = np.asarray(q, np.float64)
    return float(np.max(np.abs(q.T @ q - np.eye(q.shape[1]))))


def constrain(model, x, key):
    """Registers the three parametrizations in place and checks what registration did."""
    before_l1 = model.l1(x)
    pnx.weight_norm(model.l1)  # original0 = g (1, 32), original1 = v (2, 32)
    pnx.orthogonal(model.l2)  # original = -I, state: an orthogonal base
    pnx.spectral_norm(model.l3, key=key)  # original = the kernel, state: u, v
    diff = float(jnp.max(jnp.abs(model.l1(x) - before_l1)))
    check("weight_norm: l1's outputs unchanged by registration", diff, diff < 1e-5)
    err = orthogonality_error(model.l2.kernel)
    check("orthogonal: max |K^T K - I| of l2.kernel (its Q factor)", err, err < 1e-5)
    s = sigma(model.l3.kernel)
    check("spectral_norm: top singular value of l3.kernel", f"{s:.5f}", abs(s - 1) < 1e-3)
    print("  where things live (nnx.state paths, as torch's parametrizations.weight.original):")
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if "parametrizations" in path:
            shape = tuple(var.get_value().shape)
            print(f"    {'/'.join(map(str, path)):<44} {type(var).__name__}{list(shape)}")


def train(model, x, y, steps, smoke=False):
    """Adam on every nnx.Param (the originals), one nnx.jit step that reads each kernel once."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    show = _util.every(steps)
    for step in _util.progress(steps, "training", smoke=smoke):
        losses.append(train_step(model, optimizer))  # no host sync per step
        if step + 1 in show:
            print(f"  step {step + 1:5d}  loss {float(losses[-1]):.5f}")
    losses = [float(loss) for loss in losses]
    ok = bool(np.all(np.isfinite(losses))) and (steps < 2 or losses[-1] < losses[0])
    check("loss went down", f"{losses[0]:.4f} -> {losses[-1]:.4f}", ok)
    return optimizer, losses


def plot(model, losses, out):
    fig, (a, b) = _util.figure(1, 2, figsize=(10, 3.6))
    a.semilogy(np.arange(1, len(losses) + 1), losses)
    a.set(title="training loss (MSE)", xlabel="step", ylabel="mean squared error")
    labels = ["l1 weight_norm", "l2 orthogonal", "l3 spectral_norm", "l4 plain"]
    for i, (layer, label) in enumerate(zip((model.l1, model.l2, model.l3, model.l4), labels)):
        s = np.linalg.svd(np.asarray(layer.kernel[...]), compute_uv=False)
        b.plot(np.full(s.shape, i), s, "o", alpha=0.6, label=label)
    b.axhline(1.0, color="gray", lw=0.8)
    b.set(
        title="singular values of each kernel (eval mode)", xticks=range(4), ylabel="singular value"
    )
    b.set_xticklabels(["l1", "l2", "l3", "l4"])
    b.legend(fontsize=7)
    _util.save(fig, out, "nnx_training.png")


def main(argv=None):
    parser = _util.parser(__doc__)
    parser.add_argument("--steps", type=int, default=400, help="training steps (400)")
    args = parser.parse_args(argv)
    steps = 5 if args.smoke else args.steps
    timer = _util.Timer()

    k_data, k_model, k_sn = jax.random.split(jax.random.key(args.seed), 3)
    x, y = make_data(k_data)
    model = MLP(nnx.Rngs(int(jax.random.randint(k_model, (), 0, 2**30))))
    print("Registration (in place; right_inverse is the initialization transform):")
    constrain(model, x, k_sn)
    state_before = nnx.state(model, pnx.ParametrizationState)

    print(f"Training {steps} steps (adam under nnx.jit, full batch of {x.shape[0]}):")
    optimizer, losses = train(model, x, y, steps, args.smoke)

    print("Constraints after training (model.eval(): reads no longer update state):")
    in_training = sigma(model.l3.kernel)  # this read is in training mode: one more step
    for _ in range(20):  # one power step per training step lags a little; catch up
        _ = model.l3.kernel
    model.eval()
    err = orthogonality_error(model.l2.kernel)
    check("orthogonal: max |K^T K - I| of l2.kernel", err, err < 1e-4)
    s = sigma(model.l3.kernel)
    check(
        "spectral_norm: top singular value of l3.kernel",
        f"{s:.5f} (in training: {in_training:.5f})",
        abs(s - 1) < 1e-2,
    )
    plist = model.l1.parametrizations["kernel"]
    norms = jnp.linalg.norm(model.l1.kernel, axis=0, keepdims=True)
    diff = float(jnp.max(jnp.abs(norms - plist.original0[...])))
    check("weight_norm: column norms of l1.kernel == g (trained)", diff, diff < 1e-5)
    base = model.l2.parametrizations["kernel"].state["0"]["base"][...]
    base_before = state_before["l2"]["parametrizations"]["kernel"]["state"]["0"]["base"][...]
    same = bool(jnp.array_equal(base, base_before))
    check("orthogonal base untouched by the optimizer", same, same)
    opt_paths = [p for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))]
    in_opt = any(p[-1] in ("base", "u", "v") for p in opt_paths)
    check("no ParametrizationState in the optimizer state", not in_opt, not in_opt)
    raw = model.l3.parametrizations["kernel"].original[...]
    model(x)
    kept = bool(jnp.array_equal(model.l3.parametrizations["kernel"].original[...], raw))
    check("a forward leaves the raw l3 kernel as stored (flax#5576)", kept, kept)

    plot(model, losses, args.out)

    print("Evaluation with pnx.cached() (each constrained kernel computed once):")
    with pnx.cached():
        batches = [model(xb) for xb in jnp.split(x, 4)]
    diff = float(jnp.max(jnp.abs(jnp.concatenate(batches) - model(x))))
    check("max |batched - full| outputs", diff, diff < 1e-5)

    print("Export to a plain NNX model (remove_parametrizations, leave_parametrized=True):")
    y_constrained = model(x)
    for layer in (model.l1, model.l2, model.l3):
        pnx.remove_parametrizations(layer, "kernel")
    plain = type(model.l1).__name__ == "Linear" and not pnx.is_parametrized(model.l3)
    check("classes restored, nothing parametrized", plain, plain)
    diff = float(jnp.max(jnp.abs(model(x) - y_constrained)))
    check("max |plain model - constrained model| outputs", diff, diff == 0.0)
    print(f"nnx_training OK ({timer})")


if __name__ == "__main__":
    main()
