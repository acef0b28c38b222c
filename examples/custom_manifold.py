"""A parametrization written from scratch: symmetric positive definite (SPD) matrices.

The manifold of SPD matrices is the image of the symmetric matrices under the matrix
exponential, and the matrix logarithm (eigendecomposition, log of the eigenvalues) takes it
back. So a free square matrix X becomes an SPD matrix in two links of a chain:

    symmetric:  X -> S = triu(X) + triu(X, 1)^T          right_inverse: S -> triu(S)
    spd_exp:    S -> P = expm(S)                          right_inverse: P -> logm(P)

Both links are ``px.Parametrization`` values of module-level pure functions. The script

1. checks that the chain reproduces an SPD matrix assigned to it
   (``forward(right_inverse(P)) == P`` to float32 accuracy), shows the torch rule for
   appending a link (the originals are kept, so assign the value again), and compares the
   gradient through the chain (``jax.grad``) with a central finite difference in float64;
2. fits a Gaussian by maximum likelihood to generated data: a small Flax linen module holds
   a ``mean`` and a ``cov`` parameter, the chain goes on ``params/cov``, and a jitted optax
   loop trains the raw original on minibatches. The covariance has eigenvalues spread over
   more than two decades (4 down to 0.01), so the smallest sit close to the boundary of the
   SPD cone;
3. checks that every eigenvalue of the learned covariance stayed positive, that it reached
   the closed-form maximum-likelihood estimate (the sample covariance) and the true
   covariance up to sampling noise. For comparison it trains the same module without the
   parametrization: with the same optimizer an early Adam step pushes that covariance out of
   the cone (a negative eigenvalue), its Cholesky factorization returns NaN and the run stops.

The figure shows the loss, the eigenvalue trajectories and covariance ellipses over
training. Larger settings: ``--dim 16 --samples 50000 --steps 4000``.
"""

from __future__ import annotations

import math
from typing import Any

import _util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paramx as px

# ----- the parametrization -------------------------------------------------------------------


def symmetric(x: jax.Array) -> jax.Array:
    """A symmetric matrix from the upper triangle of a free square matrix."""
    return jnp.triu(x) + jnp.swapaxes(jnp.triu(x, 1), -1, -2)


def spd_exp(s: jax.Array) -> jax.Array:
    """The matrix exponential of a symmetric matrix: symmetric positive definite.

    ``jax.scipy.linalg.expm`` is differentiable everywhere (a formula through ``eigh`` would
    not be at repeated eigenvalues, e.g. at the identity). Averaging with the transpose
    removes the rounding asymmetry of the Padé solve.
    """
    e = jax.scipy.linalg.expm(s)
    return 0.5 * (e + jnp.swapaxes(e, -1, -2))


def spd_log(p: jax.Array) -> jax.Array:
    """The matrix logarithm of an SPD matrix: eigendecomposition, log of the eigenvalues.

    Only used to initialize or assign (never differentiated). A matrix that is not positive
    definite has no real logarithm and gives NaN.
    """
    w, v = jnp.linalg.eigh(0.5 * (p + jnp.swapaxes(p, -1, -2)))
    return (v * jnp.log(w)[..., None, :]) @ jnp.swapaxes(v, -1, -2)


SYMMETRIC = px.Parametrization(forward=symmetric, right_inverse=jnp.triu, name="symmetric")
SPD = px.Parametrization(forward=spd_exp, right_inverse=spd_log, name="spd_exp")


def register_spd(tree: Any, where: Any, value: jax.Array | None = None) -> Any:
    """Registers the chain [symmetric, spd_exp] on ``where``; assigns ``value`` if given.

    As in torch, registering a second link keeps the originals the first one computed, so
    right after the second registration the tensor reads expm(previous value). ``px.assign``
    runs the whole chain's right_inverse (logm, then triu) and makes it read ``value``.
    """
    tree = px.register_parametrization(tree, where, SYMMETRIC)
    tree = px.register_parametrization(tree, where, SPD)
    return tree if value is None else px.assign(tree, where, value)


# ----- the model and the data ----------------------------------------------------------------


class Gaussian(nn.Module):
    """A multivariate normal; ``__call__`` is the mean negative log-likelihood of a batch."""

    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = self.param("mean", nn.initializers.zeros, (self.dim,))
        cov = self.param("cov", lambda key, shape: jnp.eye(shape[0]), (self.dim, self.dim))
        chol = jnp.linalg.cholesky(cov)  # NaN when cov is not positive definite
        z = jax.scipy.linalg.solve_triangular(chol, (x - mean).T, lower=True)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        return 0.5 * (logdet + jnp.mean(jnp.sum(z * z, axis=0)) + self.dim * math.log(2 * math.pi))


def true_gaussian(key: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    """A random mean and a covariance with eigenvalues spread from 4 down to 0.01."""
    k_rot, k_mean = jax.random.split(key)
    q, _ = jnp.linalg.qr(jax.random.normal(k_rot, (dim, dim)))
    eig = jnp.asarray(np.geomspace(4.0, 0.01, dim), jnp.float32)
    return 0.5 * jax.random.normal(k_mean, (dim,)), (q * eig) @ q.T


def random_spd(key: jax.Array, dim: int) -> jax.Array:
    """A random SPD matrix with condition number about 100, for the round-trip check."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
    return (q * jnp.asarray(np.geomspace(10.0, 0.1, dim), jnp.float32)) @ q.T


# ----- the checks before training ------------------------------------------------------------


def round_trip_checks(key: jax.Array, dim: int) -> jax.Array:
    """forward(right_inverse(P)) == P for an SPD P, and the torch rule for appending a link.

    Returns the random SPD matrix P.
    """
    p = random_spd(key, dim)
    scale = float(jnp.max(jnp.abs(p)))

    single = px.register_parametrization({"P": p}, "P", SPD)  # registration runs logm
    err = float(jnp.max(jnp.abs(px.materialize(single)["P"] - p))) / scale
    _util.check("spd_exp alone: max |expm(logm(P)) - P| / max |P|", err, err < 1e-5)

    appended = px.register_parametrization({"P": p}, "P", SYMMETRIC)
    appended = px.register_parametrization(appended, "P", SPD)
    expm_p = jax.scipy.linalg.expm(p)
    drift = float(jnp.max(jnp.abs(px.materialize(appended)["P"] - expm_p) / jnp.max(expm_p)))
    label = "link by link, it reads expm(P) (the originals are kept)"
    _util.check(label, drift, drift < 1e-5)

    tree = px.assign(appended, "P", p)  # torch's `m.weight = P`: right_inverse of the chain
    err = float(jnp.max(jnp.abs(px.materialize(tree)["P"] - p))) / scale
    _util.check("after assign: max |forward(right_inverse(P)) - P| / max |P|", err, err < 1e-5)
    lower = float(jnp.max(jnp.abs(jnp.tril(px.originals(tree, "P")[0], -1))))
    _util.check("its original is triu(logm(P)): max |strict lower part|", lower, lower == 0.0)

    x = jax.random.normal(jax.random.fold_in(key, 1), (dim, dim))  # any free matrix
    w = np.linalg.eigvalsh(np.asarray(spd_exp(symmetric(x)), np.float64))
    label = "a random free original maps to an SPD matrix: min eigenvalue"
    _util.check(label, float(w.min()), w.min() > 0)
    return p


def gradient_check(key: jax.Array, p: jax.Array) -> None:
    """jax.grad through the chain and the model against a central finite difference (float64).

    The point is the chain holding the SPD matrix ``p``; the registered float32 tree is cast to
    float64 like any pytree (a ``Parametrized`` node's originals are its children).
    """
    dim = p.shape[0]
    model = Gaussian(dim)
    tree = register_spd({"params": {"mean": jnp.zeros(dim), "cov": p}}, "params/cov", p)
    k_x, k_d = jax.random.split(key)
    x, direction = jax.random.normal(k_x, (64, dim)), jax.random.normal(k_d, (dim, dim))
    with jax.enable_x64(True):
        tree, x, direction = jax.tree.map(lambda a: a.astype(jnp.float64), (tree, x, direction))
        loss_and_grad = jax.jit(jax.value_and_grad(lambda t: model.apply(px.materialize(t), x)))
        # The gradient is a tree like `tree`: its node holds d loss / d original.
        _, grads = loss_and_grad(tree)
        analytic = float(jnp.sum(px.originals(grads, "params/cov")[0] * direction))
        node = px.get_parametrized(tree, "params/cov")

        def along(t: float) -> float:
            moved = node.replace(originals=(node.original + t * direction,))
            return float(loss_and_grad({"params": {**tree["params"], "cov": moved}})[0])

        h = 1e-5
        numeric = (along(h) - along(-h)) / (2 * h)
    rel = abs(analytic - numeric) / abs(numeric)
    _util.check("d loss/d original along a direction: |jax.grad - FD| / |FD|", rel, rel < 1e-6)


# ----- training ------------------------------------------------------------------------------


def train(
    model: Gaussian, tree: Any, data: jax.Array, args: Any, key: jax.Array, *, desc: str
) -> tuple[Any, dict[str, Any]]:
    """Adam with a cosine schedule on minibatches; returns the trained tree and a history.

    The same jitted step trains the registered tree and the plain one: ``px.materialize``
    leaves a tree without parametrizations as it is. These links hold no state, so the
    registered tree is the trainable tree (no ``split_state`` needed). The history holds the
    covariance the model used at every step and the full-data NLL at about 150 steps; a run
    whose NLL turns NaN stops there.
    """
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))

    @jax.jit
    def step(tree, opt_state, key):
        batch = data[jax.random.randint(key, (args.batch,), 0, data.shape[0])]

        def loss_fn(tree):
            plain = px.materialize(tree)  # once per step; the model reads the plain tree
            return model.apply(plain, batch), plain["params"]["cov"]

        (_, cov), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree)
        updates, opt_state = tx.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, cov

    @jax.jit
    def evaluate(tree):
        plain = px.materialize(tree)
        return model.apply(plain, data), plain["params"]["cov"]

    covs, logged, nlls = [], [], []  # covs[s]: the covariance after s updates

    def log(s):
        nll, cov = evaluate(tree)
        logged.append(s)
        nlls.append(float(nll))
        return cov

    opt_state = tx.init(tree)
    printed = _util.every(args.steps)
    # Dense at first (the symlog axis of the figure), then every 1% of the run.
    logged_at = set(np.geomspace(1, args.steps, 60).round().astype(int).tolist()) | printed
    logged_at |= set(range(0, args.steps + 1, max(1, args.steps // 100)))
    log(0)
    for s in _util.progress(args.steps, desc, smoke=args.smoke):
        tree, opt_state, cov = step(tree, opt_state, jax.random.fold_in(key, s))
        covs.append(cov)
        if s + 1 not in logged_at:
            continue
        after = log(s + 1)  # the covariance after s + 1 updates
        failed = not np.isfinite(nlls[-1])
        if s + 1 in printed or failed:
            low = eigenvalues(np.asarray(after, np.float64)[None])[0, 0]
            print(f"  {desc:<13} step {s + 1:5d}  NLL {nlls[-1]:9.5f}  min eigenvalue {low:.4f}")
        if failed or s + 1 == args.steps:
            covs.append(after)
        if failed:
            print(f"  {desc:<13} stopped: the loss is NaN")
            break
    covs = np.asarray(covs, np.float64)
    return tree, {"cov": covs, "eig": eigenvalues(covs), "step": logged, "nll": np.array(nlls)}


def eigenvalues(covs: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of a stack of covariances; NaN rows where one holds a NaN."""
    finite = np.all(np.isfinite(covs), axis=(-2, -1))
    safe = np.where(finite[:, None, None], covs, np.eye(covs.shape[-1]))
    return np.where(finite[:, None], np.linalg.eigvalsh(safe), np.nan)


# ----- the figure ----------------------------------------------------------------------------


def ellipse(cov2: np.ndarray, n: int = 100) -> np.ndarray:
    """The one-standard-deviation ellipse of a 2x2 covariance, as (n, 2) points."""
    t = np.linspace(0.0, 2.0 * np.pi, n)
    w, v = np.linalg.eigh(cov2)
    return (np.stack([np.cos(t), np.sin(t)], 1) * np.sqrt(np.maximum(w, 0.0))) @ v.T


def plot(
    hist: dict, plain_hist: dict, best_nll: float, true_cov: np.ndarray, failure: Any, args: Any
) -> Any:
    """Loss, eigenvalue trajectories and covariance ellipses, in one figure."""
    fig, (ax_loss, ax_eig, ax_ell) = _util.figure(1, 3, figsize=(14, 4.2), layout="constrained")
    for ax in (ax_loss, ax_eig):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, args.steps)
    gap = np.maximum(hist["nll"] - best_nll, 1e-7)
    ax_loss.semilogy(hist["step"], gap, label="SPD chain")
    ok = np.isfinite(plain_hist["nll"])
    plain_gap = np.maximum(plain_hist["nll"][ok] - best_nll, 1e-7)
    ax_loss.semilogy(np.asarray(plain_hist["step"])[ok], plain_gap, label="unconstrained")
    if failure is not None:
        ax_loss.axvline(
            failure[0],
            color="C1",
            ls=":",
            label=f"leaves the SPD cone (step {failure[0]})",
        )
    ax_loss.set(xlabel="step", ylabel="NLL gap to the closed-form MLE", title="loss (full data)")
    ax_loss.legend(loc="upper right")

    # Every step up to 30, then about 300 log-spaced ones (a lighter figure, the same curves).
    steps = np.unique(
        np.r_[
            np.arange(min(30, len(hist["eig"]))),
            np.geomspace(1, len(hist["eig"]) - 1, 300).astype(int),
        ]
    )
    for i in range(hist["eig"].shape[1]):
        ax_eig.semilogy(steps, hist["eig"][steps, i], color=f"C{i % 10}", lw=1.2)
    for w in np.linalg.eigvalsh(true_cov):
        ax_eig.axhline(w, color="k", ls=":", lw=0.8)
    ax_eig.set(xlabel="step", ylabel="eigenvalue", title="learned eigenvalues (dotted: true)")

    _, v = np.linalg.eigh(true_cov)
    basis = v[:, [-1, 0]]  # the plane of the largest and the smallest true eigenvalue
    picks = sorted({min(s, args.steps) for s in (0, 5, 20, 60, args.steps)})
    for j, s in enumerate(picks):
        xy = ellipse(basis.T @ hist["cov"][s] @ basis)
        ax_ell.plot(xy[:, 0], xy[:, 1], color=f"C{j}", lw=1.2, label=f"step {s}")
    xy = ellipse(basis.T @ true_cov @ basis)
    ax_ell.plot(xy[:, 0], xy[:, 1], color="k", lw=2, ls="--", label="true")
    ax_ell.set_aspect("equal")
    ax_ell.set(
        xlabel="largest true eigenvector",
        ylabel="smallest true eigenvector",
        title="1-sigma ellipses in that plane",
    )
    ax_ell.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Maximum-likelihood Gaussian in {args.dim} dimensions, cov = expm(symmetric(X))")
    return fig


# ----- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = _util.parser(__doc__)
    parser.add_argument("--dim", type=int, default=8, help="dimension of the Gaussian (default 8)")
    parser.add_argument("--samples", type=int, default=20000, help="data set size (default 20000)")
    parser.add_argument("--batch", type=int, default=500, help="minibatch size (default 500)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak Adam learning rate (0.05)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dim, args.samples, args.batch, args.steps = 3, 200, 50, 5
    timer = _util.Timer()
    keys = jax.random.split(jax.random.key(args.seed), 6)
    k_check, k_grad, k_true, k_data, k_init, k_train = keys

    print("The parametrization (chain [symmetric, spd_exp] on a free matrix):")
    p = round_trip_checks(k_check, args.dim)
    gradient_check(k_grad, p)

    mean, true_cov = true_gaussian(k_true, args.dim)
    noise = jax.random.normal(k_data, (args.samples, args.dim))
    data = mean + noise @ jnp.linalg.cholesky(true_cov).T
    model = Gaussian(args.dim)
    variables = model.init(k_init, data[:1])  # mean 0, covariance I
    tree = register_spd(variables, "params/cov", variables["params"]["cov"])
    print(px.summary(tree))
    # The closed-form maximum-likelihood estimate: the sample mean and the (1/n) covariance.
    mle_mean = jnp.mean(data, axis=0)
    mle_cov = (data - mle_mean).T @ (data - mle_mean) / args.samples
    best_nll = float(model.apply({"params": {"mean": mle_mean, "cov": mle_cov}}, data))

    print(f"Maximum likelihood, {args.samples} samples in {args.dim}-d, batch {args.batch}:")
    _, hist = train(model, tree, data, args, k_train, desc="SPD chain")
    _, plain_hist = train(model, variables, data, args, k_train, desc="unconstrained")
    bad = np.flatnonzero(~(plain_hist["eig"][:, 0] > 0))  # NaN counts as bad
    failure = (int(bad[0]), float(plain_hist["eig"][bad[0], 0])) if bad.size else None

    print("Results:")
    low = float(np.min(hist["eig"]))
    _util.check("min eigenvalue of the learned covariance, over all steps", low, low > 0)
    cov = hist["cov"][-1]
    eig = np.array2string(hist["eig"][-1], precision=3)
    print(f"  {'learned eigenvalues':<60} {eig}")
    print(
        f"  {'true eigenvalues':<60} {np.array2string(np.linalg.eigvalsh(true_cov), precision=3)}"
    )
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    true_np, mle_np = np.asarray(true_cov, np.float64), np.asarray(mle_cov, np.float64)
    start, end = rel(hist["cov"][0], true_np), rel(cov, true_np)
    noise = rel(mle_np, true_np)
    _util.check("||cov - true|| / ||true||: start -> end", f"{start:.4f} -> {end:.4f}", end < start)
    limit = 1.5 * start if args.smoke else max(0.1, 2 * noise)
    _util.check(f"  at the end, against the MLE's sampling error {noise:.4f}", end, end < limit)
    to_mle = rel(cov, mle_np)
    _util.check("||cov - closed-form MLE|| / ||MLE||", to_mle, args.smoke or to_mle < 0.02)
    gap = float(hist["nll"][-1] - best_nll)
    _util.check("NLL - NLL of the closed-form MLE", gap, args.smoke or 0 <= gap < 1e-3)
    if failure is None:
        outcome = "stayed SPD"
    else:
        outcome = f"step {failure[0]}: min eigenvalue {failure[1]:.4f}, then NaN"
    print(f"  {'unconstrained covariance, same optimizer':<60} {outcome}")

    fig = plot(hist, plain_hist, best_nll, true_np, failure, args)
    _util.save(fig, args.out, "custom_manifold.png")
    print(f"custom_manifold OK ({timer})")


if __name__ == "__main__":
    main()
