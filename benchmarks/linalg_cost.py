"""Cost of expm_skew and cayley, forward plus backward, in units of one matrix product.

For each input kind and size this measures, jitted and in one process,

* ``mm``: one n x n float32 matrix product ``a @ b`` (the unit);
* ``expm_skew``: ``jax.value_and_grad(lambda a: sum(expm_skew(a) * c))``;
* ``jax expm``: the same through ``jax.scipy.linalg.expm`` (JAX autodiff);
* ``cayley``: the same through ``cayley``;

and prints each as a multiple of ``mm``. Inputs are ``A = X - X^T`` with ``X ~ N(0, 1)``
("random") and the same scaled to ``||A||_1 = 1`` ("norm1"). The functions are timed in turns
after a warm-up: each repetition times a block of calls of every function, with a block of
matrix products right before and after it, and takes the ratio to their mean; the table
shows the median ratio over the repetitions (and the spread between quartiles).

LAPACK (the LU factorization and triangular solves, also inside ``jax.scipy.linalg.expm``)
runs in the OpenBLAS that SciPy ships, while XLA runs matrix products on its own thread pool.
On a small machine their thread pools compete and LAPACK calls become slow and erratic, so
by default the script pins OpenBLAS to one thread (``--blas-threads 1``, set before JAX is
imported); ``--blas-threads 0`` leaves the environment as it is.

Usage::

    python benchmarks/linalg_cost.py            # n = 64, 256, 512, 15 repetitions
    python benchmarks/linalg_cost.py --quick    # n = 64, 256, 7 repetitions
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 64, 256 and 7 repetitions")
    parser.add_argument("--sizes", type=int, nargs="+", help="matrix sizes (default 64 256 512)")
    parser.add_argument("--reps", type=int, help="repetitions per function (default 15)")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="OpenBLAS threads for LAPACK calls; 0 leaves the environment unchanged",
    )
    parser.add_argument(
        "--block-ms", type=float, default=50.0, help="length of one timed block of calls"
    )
    args = parser.parse_args()
    args.sizes = args.sizes or ([64, 256] if args.quick else [64, 256, 512])
    args.reps = args.reps or (7 if args.quick else 15)
    return args


ARGS = _parse()
if ARGS.blas_threads > 0:  # must happen before NumPy/SciPy/JAX load OpenBLAS
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.blas_threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.scipy.linalg import expm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from paramx._src.parametrizations import linalg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _inputs import skew_inputs  # noqa: E402
from _machine import cpu_info  # noqa: E402


def time_block(fn: Callable[..., object], args: tuple, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls (asynchronous dispatch)."""
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def measure(n: int, kind: str) -> dict[str, object]:
    a, c, b = (jnp.asarray(v) for v in skew_inputs(n, kind))
    matmul = jax.jit(lambda x, y: x @ y)

    def cost(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], object]:
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(f(x) * c)))

    functions = {
        "expm_skew": cost(linalg.expm_skew),
        "jax expm": cost(expm),
        "cayley": cost(linalg.cayley),
    }
    # Warm-up: compile, then run each a few times.
    unit = min(time_block(matmul, (a, b), 3) for _ in range(5))
    calls_mm = max(2, int(ARGS.block_ms * 1e-3 / unit))
    calls = {}
    for name, fn in functions.items():
        per_call = min(time_block(fn, (a,), 1) for _ in range(3))
        calls[name] = max(2, int(ARGS.block_ms * 1e-3 / per_call))
    ratios = {name: [] for name in functions}
    seconds = {name: [] for name in functions}
    units = []
    for _ in range(ARGS.reps):
        for name, fn in functions.items():  # alternate between the functions
            before = time_block(matmul, (a, b), calls_mm)
            t = time_block(fn, (a,), calls[name])
            after = time_block(matmul, (a, b), calls_mm)
            ratios[name].append(t / ((before + after) / 2))
            seconds[name].append(t)
            units += [before, after]
    _, res = jax.jit(linalg._expm_forward)(a)
    plan = f"m={linalg._FLOAT32.degrees[int(res.degree)]}, s={int(res.s)}"
    return {"ratios": ratios, "seconds": seconds, "unit": statistics.median(units), "plan": plan}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return q1, q2, q3


def main() -> None:
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']}, {cpu['cpu_class']} ({os.cpu_count()} logical cores)")
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, OPENBLAS_NUM_THREADS={blas}")
    print(f"float32, value_and_grad of sum(f(A) * C), median of {ARGS.reps} repetitions")
    print("cells: milliseconds per call, [multiple of one matmul: median (quartiles)]\n")
    names = ["expm_skew", "jax expm", "cayley"]
    header = f"{'case':7} {'n':>4} {'matmul':>9} {'expm_skew plan':>15} " + " ".join(
        f"{name:>27}" for name in names
    )
    print(header)
    print("-" * len(header))
    for n in ARGS.sizes:
        for kind in ("norm1", "random"):
            r = measure(n, kind)
            cells = []
            for name in names:
                q1, q2, q3 = quartiles(r["ratios"][name])
                ms = statistics.median(r["seconds"][name]) * 1e3
                cells.append(f"{ms:8.2f} ms {q2:6.1f} ({q1:4.1f}-{q3:4.1f})")
            unit = f"{r['unit'] * 1e6:7.0f}us"
            print(
                f"{kind:7} {n:4d} {unit:>9} {r['plan']:>15} " + " ".join(f"{c:>27}" for c in cells)
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
