"""Shared timing helpers of the benchmark suite (``benchmarks/run.py``).

Every ratio in the suite comes from :func:`measure`: the two sides run in one process, after a
warm-up, in alternating blocks of calls long enough to be timed, and each side's figure is the
median over the repetitions. :func:`row` turns a pair of timings into a result row.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["block_calls", "measure", "row", "time_block"]


def time_block(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls of ``fn`` (which must block)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def block_calls(fn: Callable[[], object], min_block_s: float) -> int:
    """How many calls of ``fn`` make a block of at least ``min_block_s`` seconds."""
    per_call = min(time_block(fn, 1) for _ in range(3))
    return max(1, int(min_block_s / max(per_call, 1e-9)) + 1)


def measure(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    *,
    reps: int = 7,
    warmup: int = 2,
    min_block_s: float = 0.05,
) -> tuple[float, float]:
    """Seconds per call of ``fn_a`` and ``fn_b``, measured alternating.

    Both callables take no argument and must block until their result is ready (call
    ``jax.block_until_ready`` inside; torch on CPU is synchronous). Each is first called
    ``warmup`` times (compilation, caches), then the number of calls per block is chosen so a
    block lasts at least ``min_block_s``. Each of the ``reps`` repetitions times one block of
    ``fn_a`` and one of ``fn_b``, the order flipping every repetition (a b, b a, a b, ...) so
    that drifts in machine load hit both sides alike. Returns the medians.
    """
    for _ in range(max(warmup, 1)):
        fn_a()
        fn_b()
    calls_a = block_calls(fn_a, min_block_s)
    calls_b = block_calls(fn_b, min_block_s)
    times_a: list[float] = []
    times_b: list[float] = []
    for rep in range(max(reps, 1)):
        if rep % 2 == 0:
            times_a.append(time_block(fn_a, calls_a))
            times_b.append(time_block(fn_b, calls_b))
        else:
            times_b.append(time_block(fn_b, calls_b))
            times_a.append(time_block(fn_a, calls_a))
    return statistics.median(times_a), statistics.median(times_b)


def row(
    case: str,
    paramx_s: float,
    baseline: str,
    baseline_s: float,
    goal: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row: ``ratio = paramx_s / baseline_s`` and ``met = ratio <= goal``.

    ``met`` is ``None`` when there is no goal. Extra keyword arguments become extra fields
    (e.g. ``unit="bytes"`` for rows that compare memory rather than seconds).
    """
    ratio = paramx_s / baseline_s if baseline_s else float("nan")
    met = None if goal is None else bool(ratio <= goal)
    return {
        "case": case,
        "paramx_s": paramx_s,
        "baseline": baseline,
        "baseline_s": baseline_s,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        **extra,
    }
