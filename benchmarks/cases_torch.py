"""PyTorch peer cases of the benchmark suite (imported by ``benchmarks/run.py``).

Every row compares a paramx program (jitted JAX) with the same math written with
``torch.nn.utils.parametrize`` in eager PyTorch on the CPU, measured in one process with
:func:`_timing.measure` (alternating blocks, after warm-up, medians). ``ratio`` is
``paramx_s / torch_s``: below 1 paramx is faster.

Cases:

* ``torch/<p>/W<w>``, p in ``orthogonal`` (the default map of a square kernel, matrix_exp),
  ``orthogonal_cayley``, ``spectral_norm``, ``weight_norm``: one Adam training step of a
  4-layer tanh MLP (Dense/Linear w -> w, batch 64, input dim w, mean squared loss), every
  kernel parametrized. paramx: ``px.orthogonal`` / ``px.spectral_norm`` / ``px.weight_norm``
  on the Flax tree, :func:`paramx.split_state`, ``px.materialize(..., update_state=True)``
  inside a jitted step with ``optax.adam`` (buffers donated, as torch updates in place).
  torch: ``nn.Linear`` layers with ``torch.nn.utils.parametrizations.*`` (defaults: trivialized
  orthogonal with ``base``, one power iteration per training forward), ``torch.optim.Adam``
  (defaults but the learning rate), forward inside ``parametrize.cached()``, training mode,
  eager. Goals: <= 0.6 (w=128), <= 0.7 (w=256), <= 0.8 (w=512).

  Same state on both sides: the cost of the matrix exponential (both libraries) depends on
  ||A||, and registration starts at A = 0, so a measurement that trains freely would time
  different matrices on the faster and the slower side. The orthogonal originals of both
  sides are set to the same matrix, with ||A||_1 = 1 (:func:`_skew_start`), and both Adams
  use lr = 1e-6, so A stays there while measured (checked: 0.995 after 500 steps). The
  cost of Adam and of the other maps does not depend on the learning rate.
* ``expm/<norm1|random>/n<n>/torch``: ``value_and_grad`` of ``sum(expm_skew(A) * C)`` jitted
  against ``torch.linalg.matrix_exp`` forward and backward of the same sum, on the same
  float32 matrices as the JAX expm rows (``A = X - X^T``, ``X ~ N(0, 1)``; ``norm1`` scales A
  to 1-norm 1). No goal (reference row).
* ``cayley/n<n>/torch``: paramx's ``linalg.cayley`` against torch's Cayley map as
  ``orthogonal(..., "cayley")`` computes it (``torch.linalg.solve(I - A/2, I + A/2)``),
  forward and backward, on the ``random`` matrices.
* ``householder/n<n>/torch``: reading a tall (2n, n) weight through
  ``orthogonal(..., "householder")`` (trivialized, ``base @ Q``) forward and backward,
  against paramx's ``Orthogonal("householder").forward`` with its base, jitted.
* ``rnn/T100/torch`` and ``rnn/T100/torch_cached``: an RNN with an orthogonal (matrix_exp)
  recurrent weight, hidden 128, batch 32, input 16, T = 100, squared loss on the last hidden
  state, one Adam step. torch reads the parametrized weight at every time step: without
  ``cached()`` it computes the matrix exponential 100 times per step, with ``cached()`` once.
  The paramx side is a hand-written ``jax.lax.scan`` over the cell with
  ``px.materialize(..., update_state=True)`` called once per training step, outside the scan
  (the pattern the docs recommend; ``paramx.linen.Parametrize`` around an ``nn.scan`` is
  measured by the JAX cases' ``rnn/T100``).

Threads: torch runs with ``torch.set_num_threads(n)``, n = the environment variable
``PARAMX_BENCH_TORCH_THREADS`` or else the number of CPUs this process may use, which is the
size of XLA's CPU thread pool (``--smoke``: 1). Each row records ``torch_threads`` and
``xla_threads``, and ``torch_1thread_s`` (the torch side on one thread, best of 3 blocks,
measured after the pair) with ``ratio_vs_torch_1thread``, and ``torch_pool_stalled`` (n
threads more than twice as slow as one). On a shared 2-core machine,
torch's OpenMP pool of 2 collapses whenever another process takes a core (steps up to 100x
slower: a barrier waits for a descheduled thread), while one thread does not; compare the
two fields before trusting a ratio, or run with ``PARAMX_BENCH_TORCH_THREADS=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from types import SimpleNamespace
from typing import Any

from _inputs import skew_inputs
from _timing import block_calls, measure, row, time_block

_WIDTHS = (128, 256, 512)
_QUICK_WIDTHS = (128, 256)
_SMOKE_WIDTHS = (16,)
_GOALS = {16: None, 128: 0.6, 256: 0.7, 512: 0.8}
_PARAMS = ("orthogonal", "orthogonal_cayley", "spectral_norm", "weight_norm")
_SIZES = (64, 256, 512)
_QUICK_SIZES = (64, 256)
_SMOKE_SIZES = (16,)
_BATCH = 64
_DEPTH = 4
_LR = 1e-6  # small: the orthogonal originals hardly move while measured (see _skew_start)
_START_NORM = 1.0  # 1-norm of the skew matrix A the orthogonal rows start from


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _xla_threads() -> str:
    """What XLA's CPU backend uses: its own pool, one thread per available CPU by default."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen=false" in flags:
        return "1"
    return str(_cpus())


def _skew_start(n: int, seed: int) -> Any:
    """An original, in paramx's (in, out) kernel layout, whose skew part has 1-norm 1.

    Registration sets an orthogonal original to -I (A = 0), and the matrix exponential of
    both libraries picks its Pade degree and squarings from ||A||, so its cost changes as
    training moves A. Both sides start from this same A (torch's original is its transpose)
    and train with a small learning rate, so the cost stays that of ||A||_1 = 1 on both
    sides whatever the number of steps each runs while measured.
    """
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n, n))
    work = x.T  # the working (tall) orientation of a square kernel is its transpose
    a = np.tril(work) - np.tril(work).T
    return (x * (_START_NORM / np.abs(a).sum(axis=0).max())).astype(np.float32)


def _wanted(case: str, cfg: SimpleNamespace) -> bool:
    return cfg.only is None or fnmatch(case, cfg.only)


def _one_thread_s(fn: Callable[[], object]) -> float | None:
    """Seconds per call of the torch side on one thread (best of 3 blocks), for reference.

    On a busy 2-core machine torch's OpenMP pool can stall (a barrier waits for a thread the
    OS has descheduled), which makes the n-thread figure far slower than one thread; this
    extra field makes that visible. None when torch already runs on one thread.
    """
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        return None
    torch.set_num_threads(1)
    try:
        fn()
        calls = block_calls(fn, 0.05)
        return min(time_block(fn, calls) for _ in range(3))
    finally:
        torch.set_num_threads(threads)


def _measure(
    paramx_fn: Callable[[], object], torch_fn: Callable[[], object], reps: int
) -> tuple[float, float, dict[str, Any]]:
    """``measure`` of the two sides, plus the torch side's one-thread time as an extra."""
    paramx_s, torch_s = measure(paramx_fn, torch_fn, reps=reps)
    one = _one_thread_s(torch_fn)
    return (
        paramx_s,
        torch_s,
        {
            "torch_1thread_s": one,
            "ratio_vs_torch_1thread": None if one is None else paramx_s / one,
            # n threads more than twice as slow as one: the OpenMP pool stalled (busy machine)
            "torch_pool_stalled": None if one is None else bool(torch_s > 2 * one),
        },
    )


# ----------------------------------------------------------------------------------------------
# The training step of the MLP: paramx side.


def _set_jax_starts(tree: Any) -> Any:
    """Sets each ``Dense_i`` kernel's original to ``_skew_start(w, i)``."""
    import jax
    import jax.numpy as jnp

    import paramx as px

    def put(path: Any, leaf: Any) -> Any:
        if not isinstance(leaf, px.Parametrized):
            return leaf
        layer = int(px.path_keys(path)[-2].split("_")[-1])
        x0 = _skew_start(leaf.originals[0].shape[-1], layer)
        return leaf.replace(originals=(jnp.asarray(x0),))

    return jax.tree_util.tree_map_with_path(
        put, tree, is_leaf=lambda x: isinstance(x, px.Parametrized)
    )


def _jax_mlp_step(p: str, w: int, x: Any, y: Any) -> Callable[[], object]:
    """A zero-arg callable running one jitted Adam step of the parametrized MLP in JAX."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import paramx as px

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, h: jax.Array) -> jax.Array:
            for i in range(_DEPTH):
                h = nn.Dense(w)(h)
                if i < _DEPTH - 1:
                    h = jnp.tanh(h)
            return h

    model = MLP()
    tree = model.init(jax.random.key(0), x)

    def is_kernel(path: Any, leaf: Any) -> bool:
        return px.path_keys(path)[-1] == "kernel"

    if p == "orthogonal":
        tree = px.orthogonal(tree, is_kernel)  # default map of a square kernel: matrix_exp
    elif p == "orthogonal_cayley":
        tree = px.orthogonal(tree, is_kernel, "cayley")
    elif p == "spectral_norm":
        tree = px.spectral_norm(tree, is_kernel, key=jax.random.key(1))
    elif p == "weight_norm":
        tree = px.weight_norm(tree, is_kernel)
    if p.startswith("orthogonal"):
        tree = _set_jax_starts(tree)
    params, state = px.split_state(tree)
    tx = optax.adam(_LR)
    opt_state = tx.init(params)

    def loss_fn(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        plain, new_state = px.materialize(params, state, update_state=True)
        out = model.apply(plain, x)
        return jnp.mean((out - y) ** 2), new_state

    def step(params: Any, state: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    carry = [params, state, opt_state]

    def call() -> object:
        params, state, opt_state, loss = step(*carry, x, y)
        carry[:] = [params, state, opt_state]
        return jax.block_until_ready(loss)

    return call


# ----------------------------------------------------------------------------------------------
# The training step of the MLP: torch side.


def _torch_mlp_step(p: str, w: int, x: Any, y: Any) -> Callable[[], object]:
    """A zero-arg callable running one eager Adam step of the parametrized MLP in torch."""
    import torch
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(_DEPTH):
        linear = torch.nn.Linear(w, w)
        if p == "orthogonal":
            parametrizations.orthogonal(linear, "weight")
        elif p == "orthogonal_cayley":
            parametrizations.orthogonal(linear, "weight", orthogonal_map="cayley")
        elif p == "spectral_norm":
            parametrizations.spectral_norm(linear, "weight")
        elif p == "weight_norm":
            parametrizations.weight_norm(linear, "weight")
        if p.startswith("orthogonal"):
            with torch.no_grad():
                x0 = torch.from_numpy(_skew_start(w, i).T.copy())
                linear.parametrizations.weight.original.copy_(x0)
        layers.append(linear)
        if i < _DEPTH - 1:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers).train()
    opt = torch.optim.Adam(model.parameters(), lr=_LR)

    def call() -> object:
        opt.zero_grad(set_to_none=True)
        with parametrize.cached():
            out = model(x)
            loss = torch.nn.functional.mse_loss(out, y)
        loss.backward()
        opt.step()
        return loss

    return call


def _mlp_rows(cfg: SimpleNamespace, common: dict[str, Any]) -> Iterator[dict]:
    import jax.numpy as jnp
    import numpy as np
    import torch

    widths = _SMOKE_WIDTHS if cfg.smoke else _QUICK_WIDTHS if cfg.quick else _WIDTHS
    for w in widths:
        for p in _PARAMS:
            case = f"torch/{p}/W{w}"
            if not _wanted(case, cfg):
                continue
            rng = np.random.default_rng(w)
            x = rng.standard_normal((_BATCH, w)).astype(np.float32)
            y = rng.standard_normal((_BATCH, w)).astype(np.float32)
            jax_step = _jax_mlp_step(p, w, jnp.asarray(x), jnp.asarray(y))
            torch_step = _torch_mlp_step(p, w, torch.from_numpy(x), torch.from_numpy(y))
            paramx_s, torch_s, ref = _measure(jax_step, torch_step, cfg.reps)
            yield row(
                case,
                paramx_s,
                f"torch {common['torch_version']} parametrize+cached, eager, "
                f"{common['torch_threads']} threads",
                torch_s,
                _GOALS.get(w),
                **ref,
                **common,
            )


# ----------------------------------------------------------------------------------------------
# The maps alone.


def _jax_value_and_grad(f: Callable[[Any], Any], a: Any, c: Any) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    a, c = jnp.asarray(a), jnp.asarray(c)
    fn = jax.jit(jax.value_and_grad(lambda m, c: jnp.sum(f(m) * c)))
    return lambda: jax.block_until_ready(fn(a, c))


def _torch_value_and_grad(f: Callable[[Any], Any], a: Any, c: Any) -> Callable[[], object]:
    import torch

    at = torch.from_numpy(a).requires_grad_()
    ct = torch.from_numpy(c)

    def call() -> object:
        loss = torch.sum(f(at) * ct)
        (grad,) = torch.autograd.grad(loss, at)
        return loss, grad

    return call


def _torch_cayley(a: Any) -> Any:
    """torch's Cayley map, as ``torch.nn.utils.parametrizations.orthogonal`` computes it."""
    import torch

    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return torch.linalg.solve(torch.add(eye, a, alpha=-0.5), torch.add(eye, a, alpha=0.5))


def _householder_pair(n: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """paramx and torch reading a tall (2n, n) householder-orthogonal weight, fwd + bwd."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from torch.nn.utils import parametrizations

    import paramx as px

    rng = np.random.default_rng(n)
    w0 = rng.standard_normal((2 * n, n)).astype(np.float32)
    c = rng.standard_normal((2 * n, n)).astype(np.float32)

    # torch: weight (out, in) = (2n, n), tall; the default map of a tall matrix is householder.
    linear = torch.nn.Linear(n, 2 * n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w0))
    parametrizations.orthogonal(linear, "weight", orthogonal_map="householder")
    ct = torch.from_numpy(c)
    original = linear.parametrizations.weight.original

    def torch_call() -> object:
        loss = torch.sum(linear.weight * ct)
        (grad,) = torch.autograd.grad(loss, original)
        return loss, grad

    # paramx: the same tall matrix (a strictly tall array is its own working orientation).
    tree = px.register_parametrization(
        {"w": jnp.asarray(w0)}, "w", px.Orthogonal("householder"), unsafe=True
    )
    _, state = px.split_state(tree)
    ortho = px.Orthogonal("householder")
    base_state = state["w"]["0"]
    (x0,) = px.originals(tree, "w")
    cj = jnp.asarray(c)
    fn = jax.jit(
        jax.value_and_grad(
            lambda x, state, c: jnp.sum(ortho.forward(x, params=None, state=state) * c)
        )
    )
    return (lambda: jax.block_until_ready(fn(x0, base_state, cj))), torch_call


def _map_rows(cfg: SimpleNamespace, common: dict[str, Any]) -> Iterator[dict]:
    import torch

    from paramx._src.parametrizations import linalg

    sizes = _SMOKE_SIZES if cfg.smoke else _QUICK_SIZES if cfg.quick else _SIZES
    version = common["torch_version"]
    threads = common["torch_threads"]
    for n in sizes:
        for kind in ("norm1", "random"):
            case = f"expm/{kind}/n{n}/torch"
            if _wanted(case, cfg):
                a, c, _ = skew_inputs(n, kind)
                paramx_s, torch_s, ref = _measure(
                    _jax_value_and_grad(linalg.expm_skew, a, c),
                    _torch_value_and_grad(torch.linalg.matrix_exp, a, c),
                    cfg.reps,
                )
                yield row(
                    case,
                    paramx_s,
                    f"torch {version} linalg.matrix_exp fwd+bwd, eager, {threads} threads",
                    torch_s,
                    None,
                    paramx_side="jit(value_and_grad(sum(expm_skew(A) * C)))",
                    **ref,
                    **common,
                )
        case = f"cayley/n{n}/torch"
        if _wanted(case, cfg):
            a, c, _ = skew_inputs(n, "random")
            paramx_s, torch_s, ref = _measure(
                _jax_value_and_grad(linalg.cayley, a, c),
                _torch_value_and_grad(_torch_cayley, a, c),
                cfg.reps,
            )
            yield row(
                case,
                paramx_s,
                f"torch {version} cayley via linalg.solve fwd+bwd, eager, {threads} threads",
                torch_s,
                None,
                paramx_side="jit(value_and_grad(sum(cayley(A) * C))), A random",
                **ref,
                **common,
            )
        case = f"householder/n{n}/torch"
        if _wanted(case, cfg):
            paramx_fn, torch_fn = _householder_pair(n)
            paramx_s, torch_s, ref = _measure(paramx_fn, torch_fn, cfg.reps)
            yield row(
                case,
                paramx_s,
                f"torch {version} orthogonal(householder) read fwd+bwd, eager, {threads} threads",
                torch_s,
                None,
                shape=f"({2 * n}, {n})",
                paramx_side="jit(value_and_grad(sum(Orthogonal('householder').forward * C)))",
                **ref,
                **common,
            )


# ----------------------------------------------------------------------------------------------
# The RNN.

_RNN_HIDDEN = 128
_RNN_BATCH = 32
_RNN_INPUT = 16
_RNN_T = 100


def _rnn_data(smoke: bool) -> tuple[int, int, Any, Any, Any, Any, Any]:
    import numpy as np

    hidden = 16 if smoke else _RNN_HIDDEN
    steps = 10 if smoke else _RNN_T
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((steps, _RNN_BATCH, _RNN_INPUT)).astype(np.float32)
    target = rng.standard_normal((_RNN_BATCH, hidden)).astype(np.float32)
    w_ih = (rng.standard_normal((_RNN_INPUT, hidden)) / np.sqrt(_RNN_INPUT)).astype(np.float32)
    w_hh = rng.standard_normal((hidden, hidden)).astype(np.float32)
    b = np.zeros((hidden,), np.float32)
    return hidden, steps, xs, target, w_ih, w_hh, b


def _jax_rnn_step(data: tuple) -> Callable[[], object]:
    """paramx: lax.scan over the cell, the orthogonal weight materialized once per step."""
    import jax
    import jax.numpy as jnp
    import optax

    import paramx as px

    hidden, _, xs, target, w_ih, w_hh, b = data
    tree = {"w_ih": jnp.asarray(w_ih), "w_hh": jnp.asarray(w_hh), "b": jnp.asarray(b)}
    tree = px.orthogonal(tree, "w_hh")  # square: matrix_exp, trivialized with a base
    tree["w_hh"] = tree["w_hh"].replace(originals=(jnp.asarray(_skew_start(hidden, 99)),))
    params, state = px.split_state(tree)
    tx = optax.adam(_LR)
    opt_state = tx.init(params)
    xs, target = jnp.asarray(xs), jnp.asarray(target)

    def loss_fn(params: Any, state: Any) -> tuple[jax.Array, Any]:
        plain, new_state = px.materialize(params, state, update_state=True)

        def cell(h: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
            return jnp.tanh(x @ plain["w_ih"] + h @ plain["w_hh"] + plain["b"]), None

        h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], hidden), xs.dtype), xs)
        return jnp.mean((h - target) ** 2), new_state

    def step(params: Any, state: Any, opt_state: Any) -> tuple:
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    carry = [params, state, opt_state]

    def call() -> object:
        params, state, opt_state, loss = step(*carry)
        carry[:] = [params, state, opt_state]
        return jax.block_until_ready(loss)

    return call


def _torch_rnn_step(data: tuple, cached: bool) -> Callable[[], object]:
    """torch: a Python loop over the cell; the recurrent weight read at every time step."""
    import torch
    from torch.nn.utils import parametrizations, parametrize

    hidden, _, xs, target, w_ih, w_hh, b = data
    w_in = torch.nn.Linear(_RNN_INPUT, hidden)
    rec = torch.nn.Linear(hidden, hidden, bias=False)
    with torch.no_grad():
        w_in.weight.copy_(torch.from_numpy(w_ih.T.copy()))
        w_in.bias.copy_(torch.from_numpy(b))
        rec.weight.copy_(torch.from_numpy(w_hh.T.copy()))
    parametrizations.orthogonal(rec, "weight")  # square: matrix_exp, trivialized
    with torch.no_grad():
        x0 = torch.from_numpy(_skew_start(hidden, 99).T.copy())
        rec.parametrizations.weight.original.copy_(x0)
    model = torch.nn.ModuleList([w_in, rec]).train()
    opt = torch.optim.Adam(model.parameters(), lr=_LR)
    xs_t, target_t = torch.from_numpy(xs), torch.from_numpy(target)

    def forward() -> Any:
        h = torch.zeros(xs_t.shape[1], hidden)
        for x in xs_t:
            h = torch.tanh(w_in(x) + rec(h))
        return torch.nn.functional.mse_loss(h, target_t)

    def call() -> object:
        opt.zero_grad(set_to_none=True)
        if cached:
            with parametrize.cached():
                loss = forward()
        else:
            loss = forward()
        loss.backward()
        opt.step()
        return loss

    return call


def _rnn_rows(cfg: SimpleNamespace, common: dict[str, Any]) -> Iterator[dict]:
    cases = [(f"rnn/T{_RNN_T}/torch", False), (f"rnn/T{_RNN_T}/torch_cached", True)]
    cases = [(case, cached) for case, cached in cases if _wanted(case, cfg)]
    if not cases:
        return
    data = _rnn_data(cfg.smoke)
    hidden, steps = data[0], data[1]
    jax_step = _jax_rnn_step(data)
    for case, cached in cases:
        torch_step = _torch_rnn_step(data, cached)
        paramx_s, torch_s, ref = _measure(jax_step, torch_step, cfg.reps)
        how = "parametrize+cached" if cached else "parametrize, no cached()"
        yield row(
            case,
            paramx_s,
            f"torch {common['torch_version']} {how}, eager, {common['torch_threads']} threads",
            torch_s,
            None,
            hidden=hidden,
            steps=steps,
            batch=_RNN_BATCH,
            torch_expm_per_step=1 if cached else steps,
            paramx_side="jax.lax.scan, px.materialize once per training step",
            **ref,
            **common,
        )


# ----------------------------------------------------------------------------------------------
# Entry point.


def rows(cfg: SimpleNamespace) -> Iterator[dict]:
    """Yields the torch peer rows as each is measured; nothing (and a note) without torch."""
    try:
        import torch
    except ImportError:
        print(
            "note: torch is not installed; skipping the torch rows "
            '(pip install -e ".[bench]" installs it)',
            file=sys.stderr,
        )
        return
    # Smoke runs check that the cases run, not their timings: one thread keeps them fast on
    # a busy machine (see the module notes on torch's OpenMP pool).
    default = 1 if cfg.smoke else _cpus()
    threads = int(os.environ.get("PARAMX_BENCH_TORCH_THREADS", "0")) or default
    torch.set_num_threads(threads)
    common = {
        "torch_version": torch.__version__.split("+")[0],
        "torch_threads": threads,
        "xla_threads": _xla_threads(),
    }
    yield from _mlp_rows(cfg, common)
    yield from _map_rows(cfg, common)
    yield from _rnn_rows(cfg, common)
