"""geotorch peer cases of the benchmark suite (imported by ``benchmarks/run.py``).

One row per constraint that paramx's catalogue (``paramx.constraints``, plus
``paramx.orthogonal``) and geotorch 0.4.0 both have: a jitted paramx training step against
geotorch's training step on the same matrix shape, measured in one process with
:func:`_timing.measure` (alternating blocks, after warm-up, medians). ``ratio`` is
``paramx_s / geotorch_s``; the goal (issue 13) is <= 0.5.

The step, on both sides: the constrained matrix ``W`` (shape ``(n, k)``), a batch ``x`` of 64
rows, a target ``y``; ``loss = mean((x @ W - y)^2)``; gradient; one Adam update (lr 1e-6,
defaults otherwise).

* paramx: ``{"params": {"w": value}}`` registered with the constraint's tree function
  (``constraints.<name>(tree, "params/w", ...)``, which calls
  :func:`paramx.register_parametrization`), :func:`paramx.split_state`, and a jitted step
  ``value_and_grad`` of the loss of ``px.materialize(params, state, update_state=True)`` plus
  ``optax.adam``, buffers donated (torch updates in place).
* geotorch: a module holding one ``weight`` parameter of shape ``(n, k)`` with
  ``geotorch.<name>(module, "weight", ...)`` registered (``geotorch.SO`` through
  ``torch.nn.utils.parametrize`` for ``special_orthogonal``, which has no function);
  ``opt.zero_grad``, the loss inside ``parametrize.cached()``, ``loss.backward()``,
  ``torch.optim.Adam.step()``, eager.

Same start. geotorch registers at a point it samples from its manifold; paramx is then
registered on that same value (its ``right_inverse``), so both steps start from the same
matrix and ``loss_diff`` (absolute difference of the first step's losses) is about rounding.
Where the two libraries parametrize the set differently (geotorch's ``positive_definite`` is
``Q f(Λ) Qᵀ`` with ``Q = base · expm(A)``, paramx's is ``L Lᵀ`` of a Cholesky factor), only the
value is shared, not the coordinates; the row's ``maps`` field says what each side computes.
For ``special_orthogonal`` and ``orthogonal`` (same map, ``base · expm(A)``), the bases are made
equal and both originals are set to the same point with ``||A||_1 = 1`` (as
``cases_torch.py`` does: the cost of a matrix exponential depends on ``||A||``, and at the
chart's centre it is the cheapest); with lr 1e-6 ``A`` hardly moves while measured. Every other
geotorch trivialization sits at its chart's centre (``A = 0``) after registration.

``paramx_cpu_s``/``geotorch_cpu_s``/``cpu_ratio``: the same two steps timed in CPU seconds of
the process (``time.process_time``, alternating, medians), which on a loaded machine leave out
the time spent waiting for a core.

``matmuls``: forward + backward of the parametrization alone (``value_and_grad`` of
``sum(W * C)`` with respect to the original, jitted), timed against one jitted ``m x m``
float32 matrix product, ``m`` the larger side of ``W``, as ``linalg_cost.py`` does;
``matmuls_flops``: XLA's cost-analysis flops of that compiled program over ``2 m^3`` (XLA
does not count LAPACK calls, and counts a loop body once); ``geotorch_matmuls``: the same
timing for geotorch's parametrization against one torch matrix product.

Constraints that other parts of the catalogue may not export yet (``almost_orthogonal``,
``grassmannian``, ``invertible``, ``sln``, ``low_rank``, ``fixed_rank``,
``positive_semidefinite_fixed_rank``) are looked up by name in ``paramx.constraints`` and skipped
with a note when missing. The whole family is skipped (with a note) when torch or geotorch is
not installed. Threads as ``cases_torch.py``: ``torch.set_num_threads(n)``, n the CPUs of the
process (XLA's pool size), ``--smoke``: 1.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

from _timing import block_calls, measure, row
from cases_torch import _cpus, _measure, _wanted, _xla_threads

_BATCH = 64
_LR = 1e-6  # small: the trivializations' originals hardly move while measured
_GOAL = 0.5
_START_NORM = 1.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One constraint: how each library registers it, and on which shape."""

    name: str
    square: bool = True  # (n, n); else tall (n, k)
    rank: bool = False  # takes rank = k
    geotorch: str | None = None  # geotorch function (default: name)
    geotorch_kwargs: tuple[tuple[str, Any], ...] = ()
    paramx: str | None = None  # paramx.constraints function (default: name)
    paramx_kwargs: tuple[tuple[str, Any], ...] = ()
    skew_start: bool = False  # same base and ||A||_1 = 1 originals on both sides
    maps: str = ""


_CASES = (
    Case("symmetric", maps="both: tril(X) + tril(X, -1)ᵀ"),
    Case("skew", maps="both: tril(X, -1) - tril(X, -1)ᵀ"),
    Case(
        "sphere",
        paramx_kwargs=(("axis", -1),),
        maps="paramx: rows x/|x| (axis=-1); geotorch (default): exponential map at a base",
    ),
    Case(
        "sphere_embedded",
        geotorch="sphere",
        geotorch_kwargs=(("embedded", True),),
        paramx="sphere",
        paramx_kwargs=(("axis", -1),),
        maps="both: rows x/|x|",
    ),
    Case(
        "special_orthogonal",
        geotorch="SO",
        skew_start=True,
        maps="both: base @ expm(L - Lᵀ) (paramx: + one Newton-Schulz step)",
    ),
    Case(
        "orthogonal",
        square=False,
        paramx="orthogonal",
        paramx_kwargs=(("orthogonal_map", "matrix_exp"),),
        skew_start=True,
        maps="both: base @ expm(A)[:, :k], A from tril of the padded original "
        "(paramx: + one Newton-Schulz step)",
    ),
    Case(
        "orthogonal_householder",
        square=False,
        geotorch="orthogonal",
        paramx="orthogonal",
        paramx_kwargs=(("orthogonal_map", "householder"),),
        maps="paramx: householder (its default for a tall matrix); geotorch: base @ expm(A)",
    ),
    Case(
        "positive_definite",
        maps="paramx: L Lᵀ (Cholesky factor, softplus diagonal); geotorch: Q softplus(λ) Qᵀ, "
        "Q = base @ expm(A)",
    ),
    Case(
        "positive_semidefinite",
        maps="paramx: A Aᵀ; geotorch: Q |λ| Qᵀ, Q = base @ expm(A)",
    ),
    Case(
        "positive_semidefinite_low_rank",
        rank=True,
        maps="paramx: A Aᵀ, A (n, r); geotorch: Q |λ| Qᵀ, Q (n, r) from base @ expm(A)",
    ),
    # Catalogue entries other helpers are adding: measured when paramx.constraints has them.
    Case("almost_orthogonal", geotorch_kwargs=(("lam", 0.1),), paramx_kwargs=(("lam", 0.1),)),
    Case("grassmannian", square=False),
    Case("invertible"),
    Case("sln"),
    Case("low_rank", rank=True),
    Case("fixed_rank", rank=True),
    Case("positive_semidefinite_fixed_rank", rank=True),
)


def _shape(case: Case, smoke: bool) -> tuple[int, int]:
    n, k = (8, 4) if smoke else (64, 16)
    return (n, n) if case.square else (n, k)


# ----------------------------------------------------------------------------------------------
# geotorch side.


def _torch_module(case: Case, shape: tuple[int, int], rank: int | None, seed: int) -> Any:
    """A module with one ``weight`` of ``shape``, the constraint registered by geotorch."""
    import geotorch
    import torch
    from torch.nn.utils import parametrize

    torch.manual_seed(seed)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.randn(*shape) / shape[0] ** 0.5)
    name = case.geotorch or case.name
    if name == "SO":  # no function for SO(n) in geotorch: register its manifold by hand
        manifold = geotorch.SO(module.weight.size())
        with torch.no_grad():
            module.weight.copy_(manifold.sample())
        parametrize.register_parametrization(module, "weight", manifold, unsafe=True)
    else:
        kwargs = dict(case.geotorch_kwargs)
        if rank is not None:
            kwargs["rank"] = rank
        getattr(geotorch, name)(module, "weight", **kwargs)
    return module


def _torch_step(module: Any, x: Any, y: Any) -> Callable[[], object]:
    import torch
    from torch.nn.utils import parametrize

    opt = torch.optim.Adam(module.parameters(), lr=_LR)

    def call() -> object:
        opt.zero_grad(set_to_none=True)
        with parametrize.cached():
            loss = torch.mean((x @ module.weight - y) ** 2)
        loss.backward()
        opt.step()
        return loss

    return call


# ----------------------------------------------------------------------------------------------
# paramx side.


def _register(case: Case, value: Any, rank: int | None) -> Any:
    """``{"params": {"w": value}}`` with the constraint registered, or None if paramx lacks it."""
    import paramx as px
    from paramx import constraints

    name = case.paramx or case.name
    fn = getattr(px, name) if name == "orthogonal" else getattr(constraints, name, None)
    if fn is None:
        return None
    kwargs = dict(case.paramx_kwargs)
    if rank is not None:
        kwargs["rank"] = rank
    return fn({"params": {"w": value}}, "params/w", **kwargs)


def _jax_step(tree: Any, x: Any, y: Any) -> tuple[Callable[[], object], Any]:
    """A zero-arg callable running one jitted Adam step, and the jitted map alone."""
    import jax
    import jax.numpy as jnp
    import optax

    import paramx as px

    params, state = px.split_state(tree)
    tx = optax.adam(_LR)
    opt_state = tx.init(params)

    def loss_fn(params: Any, state: Any) -> tuple[jax.Array, Any]:
        plain, new_state = px.materialize(params, state, update_state=True)
        return jnp.mean((x @ plain["params"]["w"] - y) ** 2), new_state

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

    return call, (params, state)


def _skew_start(shape: tuple[int, int], seed: int) -> Any:
    """An (n, k) original whose skew matrix (strict lower triangle of the zero-padded original,
    minus its transpose) has 1-norm 1: the same ``A`` for paramx's and geotorch's maps."""
    import numpy as np

    n, k = shape
    x = np.random.default_rng(seed).standard_normal((n, k))
    low = np.zeros((n, n))
    low[:, :k] = np.tril(x, -1)
    a = low - low.T
    return (x * (_START_NORM / np.abs(a).sum(axis=0).max())).astype(np.float32)


def _same_start(tree: Any, module: Any, shape: tuple[int, int], seed: int) -> Any:
    """Sets both originals to ``_skew_start`` and geotorch's base to paramx's; returns the tree."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    node = tree["params"]["w"]
    x0 = _skew_start(shape, seed)
    base = np.asarray(node.state["0"]["base"])
    param = module.parametrizations.weight
    with torch.no_grad():
        param.original.copy_(torch.from_numpy(x0))
        param[0].base.copy_(torch.from_numpy(base.copy()))
    return {"params": {"w": node.replace(originals=(jnp.asarray(x0),))}}


# ----------------------------------------------------------------------------------------------
# Cost of the map alone, in matrix products.


def _map_costs(tree: Any, module: Any, shape: tuple[int, int], reps: int) -> dict[str, Any]:
    """Forward + backward of each side's parametrization in units of one m x m product."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import paramx as px

    m = max(shape)
    rng = np.random.default_rng(1)
    c = rng.standard_normal(shape).astype(np.float32)
    a = jnp.asarray(rng.standard_normal((m, m)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((m, m)).astype(np.float32))
    params, state = px.split_state(tree)
    cj = jnp.asarray(c)

    def read(params: Any, state: Any) -> jax.Array:
        return jnp.sum(px.materialize(params, state)["params"]["w"] * cj)

    fb = jax.jit(jax.value_and_grad(read))
    mm = jax.jit(lambda a, b: a @ b)
    flops = None
    try:
        cost = fb.lower(params, state).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) / (2.0 * m**3) or None
    except Exception:  # cost analysis is optional in XLA
        pass
    t_fb, t_mm = measure(
        lambda: jax.block_until_ready(fb(params, state)),
        lambda: jax.block_until_ready(mm(a, b)),
        reps=reps,
    )
    at, bt, ct = (torch.from_numpy(np.array(v)) for v in (a, b, c))
    leaves = [p for p in module.parameters() if p.requires_grad]

    def torch_read() -> object:
        loss = torch.sum(module.weight * ct)
        return torch.autograd.grad(loss, leaves)

    t_gfb, t_gmm = measure(torch_read, lambda: at @ bt, reps=reps)
    return {
        "matmuls": t_fb / t_mm,
        "matmuls_flops": flops,
        "geotorch_matmuls": t_gfb / t_gmm,
        "matmul_size": m,
    }


# ----------------------------------------------------------------------------------------------
# CPU time.


def _cpu_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def _cpu_times(
    fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int
) -> tuple[float, float]:
    """CPU seconds (all threads of the process) per call of each side, alternating, medians.

    On a loaded machine wall-clock time also counts the waits for a core (a jitted call hands
    work to XLA's threads and waits to be woken), which the CPU time leaves out: the ratio of
    CPU times is the work each side does per step.
    """
    calls_a = block_calls(fn_a, 0.1)
    calls_b = block_calls(fn_b, 0.1)
    times_a: list[float] = []
    times_b: list[float] = []
    for rep in range(max(reps, 1)):
        pair = [(fn_a, calls_a, times_a), (fn_b, calls_b, times_b)]
        for fn, calls, out in pair if rep % 2 == 0 else pair[::-1]:
            out.append(_cpu_per_call(fn, calls))
    return statistics.median(times_a), statistics.median(times_b)


# ----------------------------------------------------------------------------------------------
# Rows.


def _case_row(case: Case, cfg: SimpleNamespace, common: dict[str, Any]) -> dict | None:
    import jax.numpy as jnp
    import numpy as np
    import torch

    shape = _shape(case, cfg.smoke)
    rank = (4 if cfg.smoke else 16) if case.rank else None
    seed = sum(map(ord, case.name))
    module = _torch_module(case, shape, rank, seed)
    value = module.weight.detach().numpy().copy()
    try:
        tree = _register(case, jnp.asarray(value), rank)
    except ValueError:
        # geotorch's sample for GL+(n) can have det < 0 (to rounding): flip one row, and give
        # both sides that value (geotorch through its right_inverse).
        value[0] = -value[0]
        module.weight = torch.from_numpy(value.copy())
        value = module.weight.detach().numpy().copy()
        tree = _register(case, jnp.asarray(value), rank)
    if tree is None:
        return None
    if case.skew_start:
        tree = _same_start(tree, module, shape, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((_BATCH, shape[0])).astype(np.float32)
    y = rng.standard_normal((_BATCH, shape[1])).astype(np.float32)
    jax_step, _ = _jax_step(tree, jnp.asarray(x), jnp.asarray(y))
    costs = _map_costs(tree, module, shape, cfg.reps)
    torch_step = _torch_step(module, torch.from_numpy(x), torch.from_numpy(y))
    # The first step of each side, from the same point: the losses must agree.
    loss_px, loss_geo = float(jax_step()), float(torch_step().item())
    paramx_s, torch_s, ref = _measure(jax_step, torch_step, cfg.reps)
    paramx_cpu, torch_cpu = _cpu_times(jax_step, torch_step, cfg.reps)
    return row(
        f"geotorch/{case.name}",
        paramx_s,
        f"geotorch {common['geotorch_version']}",
        torch_s,
        _GOAL,
        side="geotorch",
        shape=list(shape),
        rank=rank,
        loss=loss_px,
        loss_diff=abs(loss_px - loss_geo),
        same_coordinates=case.skew_start or case.maps.startswith("both"),
        maps=case.maps,
        paramx_cpu_s=paramx_cpu,
        geotorch_cpu_s=torch_cpu,
        cpu_ratio=paramx_cpu / torch_cpu if torch_cpu else None,
        **costs,
        baseline_detail=f"geotorch {common['geotorch_version']} on torch "
        f"{common['torch_version']}, eager, parametrize.cached(), "
        f"{common['torch_threads']} threads",
        **ref,
        **common,
    )


def rows(cfg: SimpleNamespace) -> Iterator[dict]:
    """Yields the geotorch rows as each is measured; nothing (and a note) without geotorch."""
    try:
        import geotorch
        import torch
    except ImportError:
        print(
            "note: torch or geotorch is not installed; skipping the geotorch rows "
            '(pip install -e ".[bench]" installs both)',
            file=sys.stderr,
        )
        return
    from paramx import constraints

    default = 1 if cfg.smoke else _cpus()
    threads = int(os.environ.get("PARAMX_BENCH_TORCH_THREADS", "0")) or default
    torch.set_num_threads(threads)
    common = {
        "geotorch_version": getattr(geotorch, "__version__", "?"),
        "torch_version": torch.__version__.split("+")[0],
        "torch_threads": threads,
        "xla_threads": _xla_threads(),
    }
    for case in _CASES:
        if not _wanted(f"geotorch/{case.name}", cfg):
            continue
        name = case.paramx or case.name
        if name != "orthogonal" and not hasattr(constraints, name):
            print(
                f"note: paramx.constraints has no {name!r} yet; geotorch/{case.name} skipped",
                file=sys.stderr,
            )
            continue
        try:
            r = _case_row(case, cfg, common)
        except Exception as e:  # one constraint's setup must not stop the others
            print(f"note: geotorch/{case.name} skipped: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if r is not None:
            yield r
