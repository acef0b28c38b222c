"""A gallery of `paramx.constraints`: one small fit per family of constraints.

Each problem is a Flax-style parameter dict (``{"params": {...}}``, as ``model.init`` returns)
with one or two constrained leaves, trained by optax's Adam in a jitted ``lax.scan`` (one
compiled call per chunk of steps, so the progress bar moves). Every problem has a known answer
(a closed-form or float64 reference), and after every chunk the constrained values are checked
against their set with the parametrization's own ``distance`` and ``in_manifold``:

(a) covariance (``constraints.positive_definite``): the maximum-likelihood covariance of a
    zero-mean Gaussian, whose closed form is the sample covariance;
(b) matrix completion (``constraints.positive_semidefinite_low_rank``): a symmetric positive
    semidefinite matrix of rank r seen on about 30% of its entries (a symmetric pattern), fit
    by least squares on the seen ones; the error is measured on the unseen ones;
(c) mixture weights (``constraints.simplex``): the weights of a 1-D Gaussian mixture with known
    components, against EM run to convergence in float64;
(d) correlation (``constraints.correlation_cholesky`` and ``constraints.positive``): a Gaussian
    whose covariance is ``diag(s) L Lᵀ diag(s)``, with ``L`` the Cholesky factor of a
    correlation matrix (initialized from its LKJ sampler, ``px.sampler``) and ``s > 0``. The
    fitted ``L Lᵀ`` must reach the sample correlation.

The figure has one column per problem: the loss (its gap to the reference optimum, or the
error itself) over training above, and the fitted values against the reference below.
Larger settings: ``--dim 16 --samples 20000 --steps 3000``.
"""

from __future__ import annotations

import math
import os

# The fits make small LAPACK calls (Cholesky factorizations, triangular solves, eigh): one
# thread is fastest there, and OpenBLAS's worker threads make them much slower on a busy
# machine (examples/README.md, "CPU note").
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from collections.abc import Callable
from typing import Any, NamedTuple

import _util
import jax
import jax.numpy as jnp
import numpy as np
import optax

import paramx as px
from paramx import constraints

# ----- training: one jitted lax.scan per chunk of steps ---------------------------------------


class Fit(NamedTuple):
    """What a training run gives back: the tree and its history."""

    tree: Any
    loss: np.ndarray  # (steps,) the loss before each update
    checked_at: np.ndarray  # (chunks + 1,) steps at which the constraints were checked
    distance: np.ndarray  # (chunks + 1,) the largest distance to the set, relative to ||value||
    inside: np.ndarray  # (chunks + 1,) whether every constrained value was in its set


def health(tree: Any) -> tuple[jax.Array, jax.Array]:
    """The worst relative distance to its set over the constrained leaves, and whether all lie
    in it: each node's first link is the constraint, and its ``distance`` / ``in_manifold``
    judge the materialized value."""
    plain = px.materialize(tree)
    dists, inside = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, px.Parametrized)
    )[0]:
        if not isinstance(leaf, px.Parametrized):
            continue
        value = plain
        for k in path:
            value = value[k.key]
        constraint = leaf.chain[0]
        dists.append(constraint.distance(value) / jnp.maximum(jnp.linalg.norm(value), 1e-30))
        inside.append(jnp.all(constraint.in_manifold(value)))
    return jnp.max(jnp.stack(dists)), jnp.all(jnp.stack(inside))


def train(
    tree: Any,
    loss_fn: Callable[[Any], jax.Array],
    *,
    steps: int,
    lr: float,
    chunks: int,
    desc: str,
    smoke: bool,
) -> Fit:
    """Adam with a cosine schedule on a registered tree; ``loss_fn`` reads the plain tree.

    The tree is split into its trainable half and its state (the bases of a trivialization;
    empty for the constraints used here): Adam sees only the originals. ``px.materialize`` runs
    once per step inside the scanned step.
    """
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    per = max(1, steps // chunks)

    @jax.jit
    def run(params: Any, state: Any, opt_state: Any) -> tuple[Any, ...]:
        def step(carry: Any, _: Any) -> tuple[Any, jax.Array]:
            params, opt_state = carry
            loss, grads = jax.value_and_grad(lambda p: loss_fn(px.materialize(p, state)))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        before = health(px.merge_state(params, state))
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), length=per)
        after = health(px.merge_state(params, state))
        return params, state, opt_state, losses, before, after

    params, state = px.split_state(tree)
    opt_state = tx.init(params)
    losses, checked, dists, oks = [], [0], [], []
    for i in _util.progress(math.ceil(steps / per), desc, smoke=smoke):
        params, state, opt_state, chunk, before, (dist, ok) = run(params, state, opt_state)
        if i == 0:  # the registered starting point
            dists.append(float(before[0]))
            oks.append(bool(before[1]))
        losses.append(np.asarray(chunk))
        checked.append(min(steps, (i + 1) * per))
        dists.append(float(dist))
        oks.append(bool(ok))
    loss = np.concatenate(losses)[:steps]
    tree = px.merge_state(params, state)
    return Fit(tree, loss, np.array(checked), np.array(dists), np.array(oks))


def rel(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` (Frobenius), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def summary(label: str, error: str, fit: Fit, set_name: str) -> None:
    """The one-line summary of a problem: its error and the constraint's health."""
    worst = float(np.max(fit.distance))
    inside = "yes" if bool(np.all(fit.inside)) else "NO"
    print(
        f"{label:<24} {error} | max distance to {set_name} / norm over training {worst:.1e}, "
        f"in the set at all {len(fit.inside)} checks: {inside}"
    )


def health_checks(fit: Fit, name: str) -> None:
    """The constraint held at every check, up to float32 rounding."""
    worst = float(np.max(fit.distance))
    _util.check(f"{name}: max relative distance to the set", worst, worst < 1e-5)
    _util.check(f"{name}: in_manifold at every check", bool(np.all(fit.inside)), fit.inside.all())


# ----- (a) a covariance: maximum likelihood under positive_definite ----------------------------


def gaussian_nll(cov: jax.Array, x: jax.Array) -> jax.Array:
    """The mean negative log-likelihood of zero-mean samples ``x`` (rows) under N(0, cov)."""
    chol = jnp.linalg.cholesky(cov)
    return chol_nll(chol, x)


def chol_nll(chol: jax.Array, x: jax.Array) -> jax.Array:
    """The same, given the covariance's lower Cholesky factor."""
    z = jax.scipy.linalg.solve_triangular(chol, x.T, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol))))
    return 0.5 * (logdet + jnp.mean(jnp.sum(z * z, axis=0)) + x.shape[1] * math.log(2 * math.pi))


def reference_nll(cov: np.ndarray, x: np.ndarray) -> float:
    """``gaussian_nll`` in float64 with NumPy, for the reference optimum."""
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, x.T)
    logdet = 2.0 * np.sum(np.log(np.diag(chol)))
    return float(0.5 * (logdet + np.mean(np.sum(z * z, axis=0)) + x.shape[1] * np.log(2 * np.pi)))


def random_covariance(rng: np.random.Generator, dim: int, low: float, high: float) -> np.ndarray:
    """A random covariance whose eigenvalues spread geometrically from ``high`` to ``low``."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.geomspace(high, low, dim)) @ q.T


def gaussian_samples(rng: np.random.Generator, cov: np.ndarray, n: int) -> np.ndarray:
    """``n`` zero-mean samples of N(0, cov), rounded to float32 (what the model sees)."""
    x = rng.standard_normal((n, cov.shape[0])) @ np.linalg.cholesky(cov).T
    return x.astype(np.float32).astype(np.float64)


def covariance_problem(rng: np.random.Generator, args: Any) -> dict[str, Any]:
    true = random_covariance(rng, args.dim, 0.05, 3.0)
    x64 = gaussian_samples(rng, true, args.samples)
    x = jnp.asarray(x64, jnp.float32)
    sample = x64.T @ x64 / args.samples  # the maximum-likelihood estimate
    best = reference_nll(sample, x64)

    tree = {"params": {"cov": jnp.eye(args.dim)}}
    tree = constraints.positive_definite(tree, "params/cov")  # the value I is kept
    fit = train(
        tree,
        lambda p: gaussian_nll(p["params"]["cov"], x),
        steps=args.steps,
        lr=0.05,
        chunks=args.chunks,
        desc="(a) covariance",
        smoke=args.smoke,
    )
    cov = np.asarray(px.materialize(fit.tree)["params"]["cov"], np.float64)
    err, noise = rel(cov, sample), rel(sample, true)
    summary(
        "(a) covariance (PD)",
        f"||cov - sample cov|| / ||sample cov|| {err:.1e} (sampling error {noise:.3f})",
        fit,
        "PD cone",
    )
    limit = rel(np.eye(args.dim), sample) if args.smoke else args.tol  # smoke: it improved
    _util.check("(a): ||cov - sample covariance|| / ||sample covariance||", err, err < limit)
    health_checks(fit, "(a)")
    return {"fit": fit, "best": best, "fitted": cov, "reference": sample, "true": true}


# ----- (b) matrix completion: least squares under positive_semidefinite_low_rank -----------------


def completion_problem(rng: np.random.Generator, args: Any) -> dict[str, Any]:
    n, r = args.rows, args.rank
    factor = rng.standard_normal((n, r)) / math.sqrt(r)
    target64 = factor @ factor.T  # symmetric PSD of rank r, entries of about unit size
    upper = np.triu(rng.random((n, n)) < args.observed)
    seen64 = upper | upper.T  # a symmetric pattern: entry (i, j) is seen with (j, i)
    target = jnp.asarray(target64, jnp.float32)
    seen = jnp.asarray(seen64, jnp.float32)
    n_seen = float(seen64.sum())

    def loss(p: Any) -> jax.Array:
        return jnp.sum(seen * (p["params"]["kernel"] - target) ** 2) / n_seen

    # Start from a small random PSD matrix of rank r (registration keeps it).
    g = 0.3 * rng.standard_normal((n, r))
    start = jnp.asarray(g @ g.T, jnp.float32)
    tree = constraints.positive_semidefinite_low_rank(
        {"params": {"kernel": start}}, "params/kernel", r
    )
    fit = train(
        tree,
        loss,
        steps=args.completion_steps,
        lr=0.02,
        chunks=args.chunks,
        desc="(b) completion",
        smoke=args.smoke,
    )
    x = np.asarray(px.materialize(fit.tree)["params"]["kernel"], np.float64)
    t, s = target64, seen64
    err = rel(x[~s], t[~s])
    x0 = np.asarray(px.materialize(tree)["params"]["kernel"], np.float64)  # the registered start
    start_err = rel(x0[~s], t[~s])
    sv = np.linalg.svd(x, compute_uv=False)
    summary(
        f"(b) completion (rank {r})",
        f"||X - M|| / ||M|| on the {(~s).sum()} unseen entries {err:.1e} "
        f"(seen {s.mean():.0%}, singular value {r + 1}: {sv[r]:.1e})",
        fit,
        f"rank <= {r}",
    )
    limit = start_err if args.smoke else args.completion_tol
    _util.check("(b): ||X - M|| / ||M|| on the unseen entries", err, err < limit)
    health_checks(fit, "(b)")
    return {"fit": fit, "fitted": x, "target": t, "seen": s}


# ----- (c) mixture weights: maximum likelihood under simplex ----------------------------------

MEANS = np.array([-4.0, -1.5, 1.0, 3.5])
STD = 0.9
WEIGHTS = np.array([0.15, 0.4, 0.3, 0.15])


def component_logpdf(x: np.ndarray) -> np.ndarray:
    """log N(x; mean_k, STD²) for each sample and component: (samples, components)."""
    z = (x[:, None] - MEANS[None, :]) / STD
    return -0.5 * z**2 - math.log(STD * math.sqrt(2 * math.pi))


def mixture_nll(weights: jax.Array, logpdf: jax.Array) -> jax.Array:
    """The mean negative log-likelihood of the mixture with these weights."""
    return -jnp.mean(jax.nn.logsumexp(logpdf + jnp.log(weights), axis=1))


def em_weights(logpdf: np.ndarray, iterations: int = 5000) -> np.ndarray:
    """The maximum-likelihood weights by EM in float64 (the components are known)."""
    w = np.full(logpdf.shape[1], 1.0 / logpdf.shape[1])
    dens = np.exp(logpdf)
    for _ in range(iterations):
        resp = dens * w
        resp /= resp.sum(axis=1, keepdims=True)
        w = resp.mean(axis=0)
    return w


def mixture_problem(rng: np.random.Generator, args: Any) -> dict[str, Any]:
    z = rng.choice(len(WEIGHTS), args.samples, p=WEIGHTS)
    x64 = MEANS[z] + STD * rng.standard_normal(args.samples)
    logpdf64 = component_logpdf(x64)
    logpdf = jnp.asarray(logpdf64, jnp.float32)
    mle = em_weights(logpdf64, 200 if args.smoke else 5000)
    best = float(-np.mean(np.log(np.exp(logpdf64) @ mle)))

    uniform = jnp.full(len(WEIGHTS), 1.0 / len(WEIGHTS))
    tree = constraints.simplex({"params": {"weights": uniform}}, "params/weights")
    fit = train(
        tree,
        lambda p: mixture_nll(p["params"]["weights"], logpdf),
        steps=args.steps,
        lr=0.05,
        chunks=args.chunks,
        desc="(c) mixture",
        smoke=args.smoke,
    )
    w = np.asarray(px.materialize(fit.tree)["params"]["weights"], np.float64)
    err, noise = float(np.max(np.abs(w - mle))), float(np.max(np.abs(mle - WEIGHTS)))
    summary(
        "(c) mixture (simplex)",
        f"max |w - w_EM| {err:.1e} (EM against the true weights: {noise:.3f})",
        fit,
        "simplex",
    )
    limit = float(np.max(np.abs(np.asarray(uniform) - mle))) if args.smoke else args.tol
    _util.check("(c): max |w - EM weights|", err, err < limit)
    health_checks(fit, "(c)")
    return {"fit": fit, "best": best, "fitted": w, "reference": mle, "x": x64}


# ----- (d) a correlation matrix: correlation_cholesky and positive scales ---------------------


def random_correlation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A correlation matrix with sizeable correlations: a random covariance, normalized."""
    c = random_covariance(rng, dim, 0.1, 4.0)
    d = np.sqrt(np.diag(c))
    return c / d[:, None] / d[None, :]


def correlation_problem(rng: np.random.Generator, key: jax.Array, args: Any) -> dict[str, Any]:
    corr = random_correlation(rng, args.dim)
    scales = np.exp(rng.uniform(-1.0, 1.0, args.dim))
    x64 = gaussian_samples(rng, corr * scales[:, None] * scales[None, :], args.samples)
    x = jnp.asarray(x64, jnp.float32)
    cov = x64.T @ x64 / args.samples
    sd = np.sqrt(np.diag(cov))
    sample = cov / sd[:, None] / sd[None, :]  # the maximum-likelihood correlation
    best = reference_nll(cov, x64)

    def nll(p: Any) -> jax.Array:
        # diag(s) L is the Cholesky factor of diag(s) L Lᵀ diag(s): no factorization needed.
        return chol_nll(p["params"]["scale"][:, None] * p["params"]["corr_chol"], x)

    # A random start on the set: an LKJ(1) draw through px.sampler, an nn.initializers-style
    # function (nn.Dense(..., kernel_init=init) would take it as well).
    init = px.sampler(constraints.CorrelationCholesky())
    start = jax.jit(init, static_argnums=1)(key, (args.dim, args.dim))
    tree = {"params": {"corr_chol": start, "scale": jnp.asarray(sd, jnp.float32)}}
    tree = constraints.correlation_cholesky(tree, "params/corr_chol")
    tree = constraints.positive(tree, "params/scale")
    fit = train(
        tree,
        nll,
        steps=2 * args.steps,  # the slowest to converge: a scale-free original
        lr=0.05,
        chunks=args.chunks,
        desc="(d) correlation",
        smoke=args.smoke,
    )
    low = np.asarray(px.materialize(fit.tree)["params"]["corr_chol"], np.float64)
    fitted = low @ low.T
    err = float(np.max(np.abs(fitted - sample)))
    noise = float(np.max(np.abs(sample - corr)))
    summary(
        "(d) correlation (LLᵀ)",
        f"max |L Lᵀ - sample correlation| {err:.1e} (sample against true: {noise:.3f})",
        fit,
        "the set",
    )
    s0 = np.asarray(start, np.float64)
    limit = float(np.max(np.abs(s0 @ s0.T - sample))) if args.smoke else args.tol
    _util.check("(d): max |L Lᵀ - sample correlation|", err, err < limit)
    health_checks(fit, "(d)")
    return {"fit": fit, "best": best, "fitted": fitted, "reference": sample}


# ----- the figure -----------------------------------------------------------------------------


def plot(a: dict, b: dict, c: dict, d: dict, args: Any) -> Any:
    """One column per problem: the loss over training above, fitted against reference below."""
    fig, axes = _util.figure(2, 4, figsize=(17, 7.5), layout="constrained")
    floor = 1e-9

    def gap_panel(ax: Any, res: dict, title: str) -> None:
        steps = np.arange(1, len(res["fit"].loss) + 1)
        ax.semilogy(steps, np.maximum(res["fit"].loss - res["best"], floor))
        ax.set(xlabel="step", ylabel="NLL - NLL of the reference MLE", title=title)

    def scatter_panel(ax: Any, fitted: np.ndarray, ref: np.ndarray, what: str, **kw: Any) -> None:
        ax.plot(ref.ravel(), fitted.ravel(), "o", ms=4, alpha=0.7, **kw)
        lo, hi = float(min(ref.min(), fitted.min())), float(max(ref.max(), fitted.max()))
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        ax.set(xlabel=f"{what}", ylabel="fitted")

    gap_panel(axes[0, 0], a, "(a) covariance: positive_definite")
    upper = np.triu_indices(a["fitted"].shape[0])
    scatter_panel(axes[1, 0], a["fitted"][upper], a["reference"][upper], "sample covariance entry")
    axes[1, 0].set_title("fitted vs closed-form MLE")

    fb = b["fit"]
    axes[0, 1].semilogy(np.arange(1, len(fb.loss) + 1), np.maximum(fb.loss, floor))
    title = f"(b) completion: PSD, rank <= {args.rank}"
    axes[0, 1].set(xlabel="step", ylabel="MSE on the seen entries", title=title)
    s = b["seen"]
    scatter_panel(axes[1, 1], b["fitted"][~s], b["target"][~s], "true entry", label="unseen")
    axes[1, 1].plot(b["target"][s], b["fitted"][s], ".", ms=2, color="C1", label="seen")
    axes[1, 1].legend(loc="upper left")
    axes[1, 1].set_title("fitted vs true entries")

    gap_panel(axes[0, 2], c, "(c) mixture weights: simplex")
    k = np.arange(len(WEIGHTS))
    ax = axes[1, 2]
    ax.bar(k - 0.27, WEIGHTS, 0.27, label="true")
    ax.bar(k, c["reference"], 0.27, label="EM (float64)")
    ax.bar(k + 0.27, c["fitted"], 0.27, label="fitted")
    ax.set_xticks(k, [f"mean {m:g}" for m in MEANS])
    ax.set(ylabel="mixture weight", title="weights")
    ax.legend(loc="upper right")

    gap_panel(axes[0, 3], d, "(d) correlation: correlation_cholesky")
    off = ~np.eye(d["fitted"].shape[0], dtype=bool)
    scatter_panel(axes[1, 3], d["fitted"][off], d["reference"][off], "sample correlation")
    axes[1, 3].set_title("fitted L Lᵀ vs sample correlation")
    for ax, res in zip(axes[0], (a, b, c, d)):
        worst = float(np.max(res["fit"].distance))
        ax.text(
            0.97,
            0.95,
            f"distance to the set / norm\n<= {worst:.0e} at every check",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
        )
    fig.suptitle("paramx.constraints: one fit per family (Adam in a jitted lax.scan)")
    return fig


# ----- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = _util.parser(__doc__)
    parser.add_argument("--dim", type=int, default=8, help="(a), (d): dimension (default 8)")
    parser.add_argument("--samples", type=int, default=5000, help="(a), (c), (d): data size (5000)")
    parser.add_argument("--steps", type=int, default=800, help="(a), (c), (d): Adam steps (800)")
    parser.add_argument("--rows", type=int, default=40, help="(b): matrix size (default 40)")
    parser.add_argument("--rank", type=int, default=3, help="(b): its rank (default 3)")
    parser.add_argument("--observed", type=float, default=0.3, help="(b): seen fraction (0.3)")
    parser.add_argument(
        "--completion-steps", type=int, default=2000, help="(b): Adam steps (default 2000)"
    )
    args = parser.parse_args(argv)
    args.chunks, args.tol, args.completion_tol = 20, 2e-3, 2e-2
    if args.smoke:
        args.dim, args.samples, args.steps, args.chunks = 3, 300, 60, 3
        args.rows, args.rank, args.completion_steps = 8, 2, 60
    timer = _util.Timer()
    # The data come from NumPy; JAX keys only where paramx samples (one generator per problem).
    rng = [np.random.default_rng([args.seed, i]) for i in range(4)]
    key = jax.random.key(args.seed)

    a = covariance_problem(rng[0], args)
    b = completion_problem(rng[1], args)
    c = mixture_problem(rng[2], args)
    d = correlation_problem(rng[3], key, args)

    fig = plot(a, b, c, d, args)
    _util.save(fig, args.out, "constraints_gallery.png")
    print(f"constraints_gallery OK ({timer})")


if __name__ == "__main__":
    main()
