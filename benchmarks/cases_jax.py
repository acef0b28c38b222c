"""The JAX cases of the benchmark suite (``benchmarks/run.py``).

Families (see ``benchmarks/README.md`` for the goals):

* ``overhead/<p>/W<w>``: a jitted Adam step of a 4-layer tanh MLP whose kernels are all
  parametrized, through ``split_state`` + ``materialize(update_state=True)``, against the same
  step written by hand: the built-ins' own methods (``Orthogonal.forward``,
  ``SpectralNorm.update_state``/``forward``, ``WeightNorm.forward``) called directly on arrays
  whose state is threaded by hand.
* ``expm/<norm1|random>/n<n>``: forward plus backward of ``expm_skew`` against one n x n
  matrix product; ``.../jax_scipy`` compares it with autodiff through
  ``jax.scipy.linalg.expm`` on the same matrix. ``cayley/n<n>`` and ``householder/n<n>``: the
  same for the other two orthogonal maps.
* ``flax/<spectral_norm|weight_norm>/W<w>``: the MLP step with ``paramx.linen.Parametrize``
  against ``flax.linen.SpectralNorm`` / ``WeightNorm`` wrapping each layer.
* ``rnn/T<T>``: an RNN under ``nn.scan`` whose recurrent kernel is orthogonal, the wrapper
  outside the scan, against the plain RNN plus one materialization of that kernel.
* ``compile/L<L>/<p>``: trace, lower and compile time of the step of an L-layer MLP, every
  kernel parametrized, against the same MLP without parametrizations (extra fields: the
  hand-inlined step's time, ``hand_inlined_s``, and ``ratio_vs_hand_inlined``).
* ``compile/L<L>scan/<p>``: the same for the JAX way to a deep stack of equal layers,
  ``nn.scan`` over layers with the wrapper inside the scanned layer, against the plain scanned
  MLP (no goal: it shows how much of the unrolled figure is the unrolling).
* ``compile/expm/n<n>``: compile time of forward + backward of paramx's matrix exponential
  against autodiff through ``jax.scipy.linalg.expm`` (no goal).
* ``batched/<p>/<L>x<w>``: the step of an L-layer MLP of w x w kernels with
  ``materialize(batch=True)`` (equal kernels computed in one vmapped call) against
  ``batch=False`` (one computation per kernel), with both compile times as extra fields.
* ``memory/<p>/W<w>``: XLA's peak memory of the compiled step against the hand-written one
  (``paramx_s``/``baseline_s`` hold bytes in these rows: ``unit`` says so).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from types import SimpleNamespace
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from _inputs import skew_inputs
from _timing import measure, row

import paramx as px
from paramx._src.parametrizations import linalg

PARAMS = ("orthogonal", "spectral_norm", "weight_norm")
BATCH = 64
DEPTH = 4


# ----- configuration ---------------------------------------------------------------------------


def sizes(cfg: SimpleNamespace) -> SimpleNamespace:
    """Problem sizes and timing settings for the run mode (smoke, quick or full)."""
    if cfg.smoke:
        return SimpleNamespace(
            widths=[16], ns=[16], expm_ns=[16], flax_widths=[16], T=5, hidden=16,
            compile_layers=4, compile_width=16, compile_params=("weight_norm",), mem_width=32,
            block=0.002, overhead_block=0.002, compile_reps=1,
            batched=[("orthogonal", 4, 16)],
        )  # fmt: skip
    if cfg.quick:
        return SimpleNamespace(
            widths=[128, 256], ns=[64, 256], expm_ns=[64, 256], flax_widths=[128], T=100,
            hidden=128, compile_layers=64, compile_width=64,
            compile_params=("spectral_norm", "weight_norm"), mem_width=512, block=0.05,
            overhead_block=0.1, compile_reps=5, batched=[("orthogonal", 16, 256)],
        )  # fmt: skip
    return SimpleNamespace(
        widths=[128, 256, 512], ns=[64, 256, 512], expm_ns=[64, 256, 512],
        flax_widths=[128, 256, 512], T=100, hidden=128, compile_layers=64, compile_width=64,
        compile_params=PARAMS, mem_width=512, block=0.1, overhead_block=0.2, compile_reps=5,
        batched=[
            ("orthogonal", 16, 256), ("orthogonal", 64, 64), ("spectral_norm", 64, 64),
            ("weight_norm", 64, 64),
        ],
    )  # fmt: skip


def wanted(cfg: SimpleNamespace, case: str) -> bool:
    """Whether ``--only`` selects this case."""
    return cfg.only is None or fnmatch(case, cfg.only)


def blocking(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A zero-argument callable running ``fn(*args)`` and waiting for the result."""
    return lambda: jax.block_until_ready(fn(*args))


PIPELINE = 8


def pipelined(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``PIPELINE`` calls of ``fn(*args)`` dispatched back to back, then one wait.

    For kernel costs (the linear-algebra rows): dispatch of one call overlaps the execution
    of the previous one, as in ``linalg_cost.py``, so a small matrix product is not dominated
    by the per-call wait. Divide the measured time by ``PIPELINE``.
    """

    def run() -> Any:
        out = None
        for _ in range(PIPELINE):
            out = fn(*args)
        return jax.block_until_ready(out)

    return run


def kernel_measure(
    f: Callable[..., Any], f_args: tuple, g: Callable[..., Any], g_args: tuple, **kw: Any
) -> tuple[float, float]:
    """:func:`measure` of two pipelined kernels; seconds per single call."""
    a, b = measure(pipelined(f, *f_args), pipelined(g, *g_args), **kw)
    return a / PIPELINE, b / PIPELINE


# ----- the MLP and its parametrizations --------------------------------------------------------


def plain_mlp_params(width: int, depth: int, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """``{'l<i>': {'kernel': (w, w), 'bias': (w,)}}`` with LeCun-normal kernels."""
    keys = jax.random.split(key, depth)
    init = jax.nn.initializers.lecun_normal()
    return {
        f"l{i}": {"kernel": init(k, (width, width), jnp.float32), "bias": jnp.zeros((width,))}
        for i, k in enumerate(keys)
    }


def mlp_apply(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """tanh after every layer but the last."""
    n = len(params)
    for i in range(n):
        layer = params[f"l{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def is_kernel(path: Any, leaf: Any) -> bool:
    """Selects every ``kernel`` leaf."""
    return px.path_keys(path)[-1] == "kernel"


def parametrization(name: str) -> Any:
    """The built-in object registered by the benchmarks for ``name``."""
    return {
        "orthogonal": px.Orthogonal(),
        "spectral_norm": px.SpectralNorm(),
        "weight_norm": px.WeightNorm(),
    }[name]


def register(name: str, plain: Any) -> Any:
    """``plain`` with every kernel parametrized by ``name``."""
    return px.register_parametrization(plain, is_kernel, parametrization(name), unsafe=True)


def hand_split(name: str, tree: Any) -> tuple[dict, dict]:
    """The registered tree as plain dicts: trainable arrays and hand-threaded state.

    Trainable: ``kernel`` holds the original (orthogonal, spectral norm) or ``g`` and ``v``
    (weight norm); state: ``base`` (orthogonal) or ``u`` and ``v`` (spectral norm).
    """
    params: dict = {}
    state: dict = {}
    for layer, leaves in tree.items():
        node = leaves["kernel"]
        p = {"bias": leaves["bias"]}
        if name == "weight_norm":
            p["g"], p["v"] = node.originals
        else:
            p["kernel"] = node.originals[0]
            state[layer] = dict(node.state["0"])
        params[layer] = p
    return params, state


def hand_kernels(name: str, params: dict, state: dict) -> tuple[dict, dict]:
    """The plain MLP params and the new state, computed by calling the built-ins directly."""
    p = parametrization(name)
    sg = jax.lax.stop_gradient
    plain, new_state = {}, {}
    for layer, leaves in params.items():
        if name == "orthogonal":
            kernel = p.forward(leaves["kernel"], params=None, state=sg(state[layer]))
            new_state[layer] = state[layer]
        elif name == "spectral_norm":
            st = p.update_state(sg(leaves["kernel"]), params=None, state=sg(state[layer]))
            kernel = p.forward(leaves["kernel"], params=None, state=st)
            new_state[layer] = st
        else:
            kernel = p.forward(leaves["g"], leaves["v"])
        plain[layer] = {"kernel": kernel, "bias": leaves["bias"]}
    return plain, new_state


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean((pred - target) ** 2)


def make_steps(name: str, width: int, depth: int = DEPTH, seed: int = 0) -> SimpleNamespace:
    """The paramx step, the hand-written step, and their arguments (same numbers)."""
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    tree = register(name, plain_mlp_params(width, depth, k_init))
    params, state = px.split_state(tree)
    hparams, hstate = hand_split(name, tree)
    x = jax.random.normal(k_x, (BATCH, width))
    y = jax.random.normal(k_y, (BATCH, width))
    opt = optax.adam(1e-3)

    def px_loss(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        plain, new_state = px.materialize(params, state, update_state=True)
        return mse(mlp_apply(plain, x), y), new_state

    def hand_loss(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        plain, new_state = hand_kernels(name, params, state)
        return mse(mlp_apply(plain, x), y), new_state

    def make(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(params: Any, state: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
            (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, x, y
            )
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_state, opt_state, loss

        return step

    return SimpleNamespace(
        px_step=make(px_loss),
        hand_step=make(hand_loss),
        px_args=(params, state, opt.init(params), x, y),
        hand_args=(hparams, hstate, opt.init(hparams), x, y),
        make=make,
        px_loss=px_loss,
    )


def flat_leaves_fn(step: Callable[..., Any], args: tuple) -> tuple[Callable[..., Any], list]:
    """``step`` jitted to take and return flat lists of arrays, and the flat arguments."""
    leaves, treedef = jax.tree_util.tree_flatten(args)

    def flat(*leaves: jax.Array) -> list[jax.Array]:
        return jax.tree_util.tree_leaves(step(*jax.tree_util.tree_unflatten(treedef, leaves)))

    return jax.jit(flat), leaves


# ----- families --------------------------------------------------------------------------------


def overhead_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    for name in PARAMS:
        for w in sz.widths:
            case = f"overhead/{name}/W{w}"
            if not wanted(cfg, case):
                continue
            s = make_steps(name, w)
            f_px, f_hand = jax.jit(s.px_step), jax.jit(s.hand_step)
            # Same math: the two steps' losses and updates agree.
            out_px, out_hand = f_px(*s.px_args), f_hand(*s.hand_args)
            loss_diff = float(abs(out_px[3] - out_hand[3]))
            t_px, t_hand = measure(
                blocking(f_px, *s.px_args),
                blocking(f_hand, *s.hand_args),
                reps=max(cfg.reps, 9) if not cfg.smoke else cfg.reps,
                min_block_s=sz.overhead_block,
            )
            # The same two programs called on flat lists of arrays: what the compiled code
            # costs without the host-side flattening of the argument and result trees.
            g_px, px_leaves = flat_leaves_fn(s.px_step, s.px_args)
            g_hand, hand_leaves = flat_leaves_fn(s.hand_step, s.hand_args)
            f_px_s, f_hand_s = measure(
                blocking(g_px, *px_leaves),
                blocking(g_hand, *hand_leaves),
                reps=max(cfg.reps, 9) if not cfg.smoke else cfg.reps,
                min_block_s=sz.overhead_block,
            )
            yield row(
                case, t_px, "hand-inlined JAX step (built-ins' methods, state by hand)", t_hand,
                goal=1.02, side="jax", loss_diff=loss_diff, flat_paramx_s=f_px_s,
                flat_baseline_s=f_hand_s, flat_ratio=f_px_s / f_hand_s,
            )  # fmt: skip


def skew(n: int, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``_inputs.skew_inputs`` as JAX arrays."""
    return tuple(jnp.asarray(v) for v in skew_inputs(n, kind))


def fwd_bwd(f: Callable[[jax.Array], jax.Array], c: jax.Array) -> Callable[[jax.Array], Any]:
    """Jitted ``value_and_grad`` of ``sum(f(a) * c)``."""
    return jax.jit(jax.value_and_grad(lambda a: jnp.sum(f(a) * c)))


def householder_map(a: jax.Array) -> jax.Array:
    return px.Orthogonal("householder", use_trivialization=False).forward(
        a, params=None, state=None
    )


def linalg_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    matmul = jax.jit(lambda x, y: x @ y)
    goals = {("norm1", 256): 15.0, ("random", 256): 30.0}
    reps = max(cfg.reps, 9) if not cfg.smoke else cfg.reps
    for n in sz.expm_ns:
        for kind in ("norm1", "random"):
            case = f"expm/{kind}/n{n}"
            a, c, b = skew(n, kind)
            f_px = fwd_bwd(linalg.expm_skew, c)
            t_mm = None
            if wanted(cfg, case):
                t_px, t_mm = kernel_measure(
                    f_px, (a,), matmul, (a, b), reps=reps, min_block_s=sz.block
                )
                _, res = jax.jit(linalg._expm_forward)(a)
                plan = f"m={linalg._FLOAT32.degrees[int(res.degree)]}, s={int(res.s)}"
                yield row(
                    case, t_px, f"one {n}x{n} float32 matmul", t_mm, goal=goals.get((kind, n)),
                    side="jax", plan=plan,
                )  # fmt: skip
            case = f"expm/{kind}/n{n}/jax_scipy"
            if wanted(cfg, case):
                f_jax = fwd_bwd(jax.scipy.linalg.expm, c)
                t_px, t_jax = kernel_measure(
                    f_px, (a,), f_jax, (a,), reps=reps, min_block_s=sz.block
                )
                extra = {}
                if t_mm is not None:
                    extra = {"paramx_matmuls": t_px / t_mm, "baseline_matmuls": t_jax / t_mm}
                yield row(case, t_px, "jax.scipy.linalg.expm autodiff", t_jax, side="jax", **extra)
    for n in sz.ns:
        a, c, b = skew(n, "random")
        for case, fn in ((f"cayley/n{n}", linalg.cayley), (f"householder/n{n}", householder_map)):
            if not wanted(cfg, case):
                continue
            f = fwd_bwd(fn, c)
            t_f, t_mm = kernel_measure(f, (a,), matmul, (a, b), reps=reps, min_block_s=sz.block)
            yield row(case, t_f, f"one {n}x{n} float32 matmul", t_mm, side="jax")


class DenseStack(nn.Module):
    """The benchmark MLP as a linen module (layers ``l0`` ... ``l<depth-1>``)."""

    width: int
    depth: int = DEPTH
    wrap: str | None = None  # None, "spectral_norm" or "weight_norm": Flax's own wrappers

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        for i in range(self.depth):
            dense = nn.Dense(self.width, name=f"l{i}")
            if self.wrap == "spectral_norm":
                x = nn.SpectralNorm(dense, n_steps=1)(x, update_stats=update_stats)
            elif self.wrap == "weight_norm":
                x = nn.WeightNorm(dense)(x)
            else:
                x = dense(x)
            if i < self.depth - 1:
                x = jnp.tanh(x)
        return x


def flax_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    opt = optax.adam(1e-3)
    for name in ("spectral_norm", "weight_norm"):
        for w in sz.flax_widths:
            case = f"flax/{name}/W{w}"
            if not wanted(cfg, case):
                continue
            k_x, k_y = jax.random.split(jax.random.key(1))
            x = jax.random.normal(k_x, (BATCH, w))
            y = jax.random.normal(k_y, (BATCH, w))
            ours = px.linen.Parametrize(
                DenseStack(w), {is_kernel: parametrization(name)}, use_running_average=False
            )
            theirs = DenseStack(w, wrap=name)
            v_ours = ours.init(jax.random.key(0), x)
            v_theirs = theirs.init(jax.random.key(0), x)

            def make(model: nn.Module, mutable: list[str], kwargs: dict) -> Callable[..., Any]:
                def step(params: Any, rest: Any, opt_state: Any, xb: jax.Array, yb: jax.Array):
                    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
                        out, new = model.apply(
                            {"params": params, **rest}, xb, mutable=mutable, **kwargs
                        )
                        return mse(out, yb), new

                    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                    updates, opt_state = opt.update(grads, opt_state, params)
                    return optax.apply_updates(params, updates), new, opt_state, loss

                return jax.jit(step)

            def split(v: dict) -> tuple[Any, dict]:
                return v["params"], {k: val for k, val in v.items() if k != "params"}

            p_o, r_o = split(v_ours)
            p_t, r_t = split(v_theirs)
            step_o = make(ours, ["paramx_state"], {})
            kw = {"update_stats": True} if name == "spectral_norm" else {}
            step_t = make(theirs, ["batch_stats"] if name == "spectral_norm" else [], kw)
            args_o = (p_o, r_o, opt.init(p_o), x, y)
            args_t = (p_t, r_t, opt.init(p_t), x, y)
            t_o, t_t = measure(
                blocking(step_o, *args_o), blocking(step_t, *args_t), reps=cfg.reps,
                min_block_s=sz.overhead_block,
            )  # fmt: skip
            g_o, l_o = flat_leaves_fn(step_o, args_o)
            g_t, l_t = flat_leaves_fn(step_t, args_t)
            f_o, f_t = measure(
                blocking(g_o, *l_o), blocking(g_t, *l_t), reps=cfg.reps,
                min_block_s=sz.overhead_block,
            )  # fmt: skip
            flax_name = "SpectralNorm" if name == "spectral_norm" else "WeightNorm"
            yield row(
                case, t_o, f"flax.linen.{flax_name} around each Dense", t_t, goal=1.0, side="jax",
                power_iterations=1 if name == "spectral_norm" else None, flat_paramx_s=f_o,
                flat_baseline_s=f_t, flat_ratio=f_o / f_t,
            )  # fmt: skip


class Cell(nn.Module):
    """``h' = tanh(x Wx + h Wh + b)``."""

    hidden: int

    @nn.compact
    def __call__(self, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.tanh(
            nn.Dense(self.hidden, use_bias=False, name="wx")(x)
            + nn.Dense(self.hidden, name="wh")(h)
        )
        return h, h


class RNN(nn.Module):
    """``Cell`` under ``nn.scan`` over the leading (time) axis."""

    hidden: int

    @nn.compact
    def __call__(self, xs: jax.Array) -> jax.Array:
        scan = nn.scan(
            Cell,
            variable_broadcast=["params", "paramx_state"],
            split_rngs={"params": False},
            in_axes=0,
            out_axes=0,
        )
        h0 = jnp.zeros((xs.shape[1], self.hidden), xs.dtype)
        _, ys = scan(self.hidden, name="cell")(h0, xs)
        return ys


@dataclasses.dataclass(frozen=True)
class CountingOrthogonal(px.Orthogonal):
    """``Orthogonal`` that counts its evaluations at run time (host callback)."""

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        jax.debug.callback(_tick)
        return super().forward(x, params=params, state=state)


_COUNT = [0]


def _tick() -> None:
    _COUNT[0] += 1


def rnn_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    case = f"rnn/T{sz.T}"
    if not wanted(cfg, case):
        return
    batch, n_in, hidden = 32, 32, sz.hidden
    k_x, k_y = jax.random.split(jax.random.key(2))
    xs = jax.random.normal(k_x, (sz.T, batch, n_in))
    ys = jax.random.normal(k_y, (sz.T, batch, hidden))
    opt = optax.adam(1e-3)
    where = "cell/wh/kernel"

    def build(p: Any) -> tuple[nn.Module, dict]:
        model = px.linen.Parametrize(RNN(hidden), {where: p}, use_running_average=False)
        return model, model.init(jax.random.key(0), xs)

    def px_step_for(model: nn.Module) -> Callable[..., Any]:
        def step(params: Any, state: Any, opt_state: Any) -> Any:
            def loss_fn(params: Any) -> tuple[jax.Array, Any]:
                out, new = model.apply(
                    {"params": params, "paramx_state": state}, xs, mutable=["paramx_state"]
                )
                return mse(out, ys), new["paramx_state"]

            (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new, opt_state, loss

        return jax.jit(step)

    # How many times the parametrization runs in one training step.
    model_c, v_c = build(CountingOrthogonal())
    step_c = px_step_for(model_c)
    args_c = (v_c["params"], v_c["paramx_state"], opt.init(v_c["params"]))
    jax.block_until_ready(step_c(*args_c))
    jax.effects_barrier()
    _COUNT[0] = 0
    jax.block_until_ready(step_c(*args_c))
    jax.effects_barrier()
    evaluations = _COUNT[0]

    model, v = build(px.Orthogonal())
    params, state = v["params"], v["paramx_state"]
    step_px = px_step_for(model)
    args_px = (params, state, opt.init(params))

    # Baseline: the plain RNN, its recurrent kernel computed once per step by hand.
    plain_model = RNN(hidden)
    orth = px.Orthogonal()
    node = params["cell"]["wh"]["kernel"]
    base = node.state.get("0") or state["cell"]["wh"]["kernel"]["0"]
    hparams = jax.tree_util.tree_map(lambda x: x, params, is_leaf=px.is_parametrized)
    hparams = {
        "cell": {
            "wx": params["cell"]["wx"],
            "wh": {"kernel": node.originals[0], "bias": params["cell"]["wh"]["bias"]},
        }
    }

    def hand_step(params: Any, base: Any, opt_state: Any) -> Any:
        def loss_fn(params: Any) -> jax.Array:
            kernel = orth.forward(
                params["cell"]["wh"]["kernel"], params=None, state=jax.lax.stop_gradient(base)
            )
            plain = {"cell": {**params["cell"], "wh": {**params["cell"]["wh"], "kernel": kernel}}}
            return mse(plain_model.apply({"params": plain}, xs), ys)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), base, opt_state, loss

    step_hand = jax.jit(hand_step)
    args_hand = (hparams, base, opt.init(hparams))
    loss_diff = float(abs(step_px(*args_px)[3] - step_hand(*args_hand)[3]))
    t_px, t_hand = measure(
        blocking(step_px, *args_px), blocking(step_hand, *args_hand), reps=cfg.reps,
        min_block_s=sz.overhead_block,
    )  # fmt: skip
    yield row(
        case, t_px, "plain nn.scan RNN + one materialization of Wh (by hand)", t_hand,
        goal=1.05, side="jax", evaluations_per_step=evaluations, hidden=hidden, batch=batch,
        loss_diff=loss_diff,
    )  # fmt: skip


def compile_seconds(make_fn: Callable[[], Callable[..., Any]], args: tuple) -> np.ndarray:
    """Seconds to trace, lower and compile a fresh jitted function (no cache reuse)."""
    fn = jax.jit(make_fn())
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return np.array([t1 - t0, t2 - t1, t3 - t2])


def compile_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    layers, width = sz.compile_layers, sz.compile_width
    opt = optax.adam(1e-3)
    plain = plain_mlp_params(width, layers, jax.random.key(3))
    x = jnp.ones((BATCH, width))

    def make_plain() -> Callable[..., Any]:
        def step(params: Any, opt_state: Any, x: jax.Array) -> Any:
            loss, grads = jax.value_and_grad(lambda p: mse(mlp_apply(p, x), x))(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    plain_args = (plain, opt.init(plain), x)
    reps = 1 if cfg.smoke else sz.compile_reps
    for name in sz.compile_params:
        case = f"compile/L{layers}/{name}"
        if not wanted(cfg, case):
            continue
        s = make_steps(name, width, depth=layers, seed=3)

        def make_px(s: SimpleNamespace = s) -> Callable[..., Any]:
            def step(params: Any, state: Any, opt_state: Any, x: jax.Array, y: jax.Array):
                return s.px_step(params, state, opt_state, x, y)

            return step

        def make_hand(s: SimpleNamespace = s) -> Callable[..., Any]:
            def step(params: Any, state: Any, opt_state: Any, x: jax.Array, y: jax.Array):
                return s.hand_step(params, state, opt_state, x, y)

            return step

        t_px_all, t_plain_all, t_hand_all = [], [], []
        for rep in range(reps + 1):  # the first round warms up the tracing machinery
            triple = (
                compile_seconds(make_px, s.px_args),
                compile_seconds(make_plain, plain_args),
                compile_seconds(make_hand, s.hand_args),
            )
            if rep > 0 or reps == 1:
                t_px_all.append(triple[0])
                t_plain_all.append(triple[1])
                t_hand_all.append(triple[2])
        t_hand = float(np.median([t.sum() for t in t_hand_all]))
        px_split = np.median(np.array(t_px_all), axis=0)
        plain_split = np.median(np.array(t_plain_all), axis=0)
        t_px = float(np.median([t.sum() for t in t_px_all]))
        t_plain = float(np.median([t.sum() for t in t_plain_all]))
        yield row(
            case, t_px, f"the same {layers}-layer MLP step without parametrizations", t_plain,
            goal=2.0 if name == "orthogonal" else 1.5, side="jax",
            unit="seconds to trace+lower+compile", reps=len(t_px_all),
            paramx_trace_lower_compile_s=[round(float(t), 4) for t in px_split],
            baseline_trace_lower_compile_s=[round(float(t), 4) for t in plain_split],
            hand_inlined_s=t_hand, ratio_vs_hand_inlined=t_px / t_hand,
        )  # fmt: skip


def batched_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    """``batched/<p>/<L>x<w>``: the Adam step of an L-layer MLP whose w x w kernels are all
    parametrized, ``materialize(batch=True)`` (one vmapped call for the L equal kernels)
    against ``batch=False`` (one computation per kernel); goal 0.8 for 16 x 256 orthogonal.
    Extra fields: each side's trace+lower+compile seconds (one round)."""
    for name, layers, width in sz.batched:
        case = f"batched/{name}/{layers}x{width}"
        if not wanted(cfg, case):
            continue
        s = make_steps(name, width, depth=layers, seed=5)

        def loss_for(batch: bool) -> Callable[..., Any]:
            def loss(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
                plain, new_state = px.materialize(params, state, update_state=True, batch=batch)
                return mse(mlp_apply(plain, x), y), new_state

            return loss

        compiled, seconds = {}, {}
        for batch in (True, False):
            t0 = time.perf_counter()
            compiled[batch] = jax.jit(s.make(loss_for(batch))).lower(*s.px_args).compile()
            seconds[batch] = time.perf_counter() - t0
        f_on, f_off = compiled[True], compiled[False]
        loss_diff = float(abs(f_on(*s.px_args)[3] - f_off(*s.px_args)[3]))
        t_on, t_off = measure(
            blocking(f_on, *s.px_args), blocking(f_off, *s.px_args),
            reps=max(cfg.reps, 9) if not cfg.smoke else cfg.reps, min_block_s=sz.overhead_block,
        )  # fmt: skip
        yield row(
            case, t_on, "materialize(batch=False): one computation per kernel", t_off,
            goal=0.8 if (name, layers, width) == ("orthogonal", 16, 256) else None, side="jax",
            loss_diff=loss_diff, layers=layers, width=width,
            compile_s_batched=seconds[True], compile_s_per_tensor=seconds[False],
        )  # fmt: skip


class ScanLayer(nn.Module):
    """One ``tanh(Dense(x))`` layer, its kernel parametrized by ``p`` (or plain)."""

    width: int
    p: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        dense = nn.Dense(self.width)
        if self.p is not None:
            dense = px.linen.Parametrize(dense, {"kernel": self.p}, use_running_average=False)
        return jnp.tanh(dense(x)), None


class ScanMLP(nn.Module):
    """``layers`` copies of :class:`ScanLayer` under ``nn.scan`` over stacked parameters."""

    width: int
    layers: int
    p: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(
            ScanLayer,
            variable_axes={"params": 0, "paramx_state": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        return stack(self.width, self.p, name="layers")(x, None)[0]


def scan_compile_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    """The JAX way to a deep stack of equal layers: ``nn.scan`` over layers, the wrapper
    inside the scanned layer (each layer's kernel is materialized once per step)."""
    layers, width = sz.compile_layers, sz.compile_width
    opt = optax.adam(1e-3)
    x = jnp.ones((BATCH, width))
    reps = 1 if cfg.smoke else sz.compile_reps

    def setup(p: Any) -> tuple[Callable[[], Callable[..., Any]], tuple]:
        model = ScanMLP(width, layers, p)
        v = model.init(jax.random.key(3), x)
        params, rest = v["params"], {k: a for k, a in v.items() if k != "params"}

        def make() -> Callable[..., Any]:
            def step(params: Any, rest: Any, opt_state: Any) -> Any:
                def loss_fn(params: Any) -> tuple[jax.Array, Any]:
                    out, new = model.apply({"params": params, **rest}, x, mutable=list(rest))
                    return mse(out, x), new

                (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, opt_state = opt.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), new, opt_state, loss

            return step

        return make, (params, rest, opt.init(params))

    plain = setup(None)
    for name in sz.compile_params:
        case = f"compile/L{layers}scan/{name}"
        if not wanted(cfg, case):
            continue
        ours = setup(parametrization(name))
        t_px, t_plain = [], []
        for rep in range(reps + 1):  # the first round warms up the tracing machinery
            pair = (compile_seconds(*ours).sum(), compile_seconds(*plain).sum())
            if rep > 0 or reps == 1:
                t_px.append(pair[0])
                t_plain.append(pair[1])
        yield row(
            case, float(np.median(t_px)),
            f"the same {layers}-layer nn.scan MLP step without parametrizations",
            float(np.median(t_plain)), side="jax", unit="seconds to trace+lower+compile",
            reps=len(t_px),
        )  # fmt: skip


def expm_compile_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    """Compile time of one matrix exponential's forward + backward: paramx's against
    ``jax.scipy.linalg.expm``'s autodiff (what a map-by-hand would use)."""
    n = sz.compile_width
    case = f"compile/expm/n{n}"
    if not wanted(cfg, case):
        return
    a = jnp.full((n, n), 0.01)
    reps = 1 if cfg.smoke else sz.compile_reps

    def maker(expm: Callable[[jax.Array], jax.Array]) -> Callable[[], Callable[..., Any]]:
        def make() -> Callable[..., Any]:
            return jax.grad(lambda a: jnp.sum(expm(a - a.T) * a))

        return make

    t_px, t_sp = [], []
    for rep in range(reps + 1):
        pair = (
            compile_seconds(maker(linalg.expm_skew), (a,)).sum(),
            compile_seconds(maker(jax.scipy.linalg.expm), (a,)).sum(),
        )
        if rep > 0 or reps == 1:
            t_px.append(pair[0])
            t_sp.append(pair[1])
    yield row(
        case, float(np.median(t_px)), "jax.scipy.linalg.expm autodiff (fwd+bwd)",
        float(np.median(t_sp)), side="jax", unit="seconds to trace+lower+compile", reps=len(t_px),
    )  # fmt: skip


def peak_bytes(fn: Callable[..., Any], args: tuple) -> int:
    """XLA's peak memory estimate for ``jit(fn)(*args)``."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    if peak <= 0:
        peak = (
            stats.temp_size_in_bytes
            + stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
        )
    return peak


def memory_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    w = sz.mem_width
    for name in PARAMS:
        case = f"memory/{name}/W{w}"
        if not wanted(cfg, case):
            continue
        s = make_steps(name, w)
        b_px = peak_bytes(s.px_step, s.px_args)
        b_hand = peak_bytes(s.hand_step, s.hand_args)
        yield row(
            case, float(b_px), "hand-inlined JAX step", float(b_hand), goal=1.05, side="jax",
            unit="bytes (XLA peak_memory_in_bytes)",
        )  # fmt: skip


# ----- device-friendly plans (issue 15) ---------------------------------------------------------


_CALLBACKS = ("pure_callback", "io_callback", "debug_callback", "debug_print")


def control_flow_count(jaxpr: Any) -> int:
    """``while``, data-dependent ``cond`` and host-callback equations of a jaxpr, sub-jaxprs
    included: each is a device-to-host round trip on an accelerator (a ``cond`` with
    ``branches_platforms`` is resolved per platform at compile time)."""
    count = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("while", *_CALLBACKS) or (
            name == "cond" and not eqn.params.get("branches_platforms")
        ):
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += control_flow_count(sub)
    return count


def dot_count(jaxpr: Any) -> int:
    """``dot_general`` equations of a jaxpr, sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += dot_count(sub)
    return count


def device_plan_rows(cfg: SimpleNamespace, sz: SimpleNamespace) -> Iterator[dict]:
    """``controlflow/<map>``: ``while``/``cond``/callback equations in the forward+backward of
    each built-in orthogonal map under the device plan (``expm_plan="static"``): ``ratio`` is
    1 + that count (the schema wants positive figures), goal 1, i.e. no control flow; the
    count and the adaptive plan's are in ``count_device_plan``/``count_adaptive_plan``
    (``tests/test_device_plan.py`` checks every exported parametrization the same way).
    ``polar/n<n>/matmuls``: the
    polar map's forward products (goal 15) and ``polar/n<n>/fwd_bwd``: its forward+backward
    time against its forward (goal 3). ``expm/<kind>/n<n>/static``: forward+backward of
    ``expm_skew(plan="static")`` against the adaptive plan (no goal: the default on CPU stays
    adaptive)."""
    n_cf = 16 if cfg.smoke else 64
    for omap in ("matrix_exp", "cayley", "householder", "polar"):
        case = f"controlflow/{omap}"
        if not wanted(cfg, case):
            continue
        counts = []
        for plan in ("static", "adaptive"):
            w = jax.random.normal(jax.random.key(0), (n_cf, n_cf), jnp.float32)
            p = px.Orthogonal(omap, expm_plan=plan)
            params, state = px.split_state(px.register_parametrization({"w": w}, "w", p))
            loss = lambda pr, state=state: jnp.sum(px.materialize(pr, state)["w"] ** 2)
            counts.append(control_flow_count(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
        yield row(
            case, 1.0 + counts[0], "1 (ratio = 1 + count under the device plan)", 1.0,
            goal=1.0, side="jax",
            unit="count + 1 (while/cond/callback equations, forward+backward)",
            count_device_plan=counts[0], count_adaptive_plan=counts[1],
        )  # fmt: skip
    n = 16 if cfg.smoke else 256
    a, c, _ = skew(n, "random")
    q = px.Orthogonal().sample(jax.random.key(0), (n, n), jnp.float32)
    x = q + 0.05 * jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    polar = px.Orthogonal("polar", use_trivialization=False)
    fwd = jax.jit(lambda x: polar.forward(x, params=None, state=None))
    both = fwd_bwd(lambda x: polar.forward(x, params=None, state=None), c)
    case = f"polar/n{n}/matmuls"
    if wanted(cfg, case):
        count = dot_count(jax.make_jaxpr(fwd)(x).jaxpr)
        count_both = dot_count(jax.make_jaxpr(both)(x).jaxpr)
        yield row(
            case, float(count), "1 (ratio = forward products)", 1.0, goal=15.0, side="jax",
            unit="count (dot_general, forward)", products_forward_backward=count_both,
        )  # fmt: skip
    case = f"polar/n{n}/fwd_bwd"
    if wanted(cfg, case):
        reps = max(cfg.reps, 9) if not cfg.smoke else cfg.reps
        t_both, t_fwd = kernel_measure(both, (x,), fwd, (x,), reps=reps, min_block_s=sz.block)
        w = np.asarray(fwd(x), np.float64)
        orth = float(np.abs(w.T @ w - np.eye(n)).max())
        yield row(
            case, t_both, "its forward", t_fwd, goal=3.0, side="jax", orthogonality=orth,
            orthogonality_limit=10 * n * float(np.finfo(np.float32).eps),
        )  # fmt: skip
    for n in sz.expm_ns:
        for kind in ("norm1", "random"):
            case = f"expm/{kind}/n{n}/static"
            if not wanted(cfg, case):
                continue
            a, c, _ = skew(n, kind)
            f_static = fwd_bwd(lambda a: linalg.expm_skew(a, plan="static"), c)
            f_adaptive = fwd_bwd(lambda a: linalg.expm_skew(a, plan="adaptive"), c)
            reps = max(cfg.reps, 9) if not cfg.smoke else cfg.reps
            t_s, t_a = kernel_measure(
                f_static, (a,), f_adaptive, (a,), reps=reps, min_block_s=sz.block
            )
            yield row(case, t_s, "expm_skew(plan='adaptive')", t_a, side="jax")


def rows(cfg: SimpleNamespace) -> Iterator[dict]:
    """Every JAX case, yielded as soon as it is measured."""
    sz = sizes(cfg)
    yield from overhead_rows(cfg, sz)
    yield from linalg_rows(cfg, sz)
    yield from flax_rows(cfg, sz)
    yield from rnn_rows(cfg, sz)
    yield from batched_rows(cfg, sz)
    yield from compile_rows(cfg, sz)
    yield from scan_compile_rows(cfg, sz)
    yield from expm_compile_rows(cfg, sz)
    yield from memory_rows(cfg, sz)
    yield from device_plan_rows(cfg, sz)
