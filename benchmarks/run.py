"""paramx's benchmark suite: every case, as ratios against a baseline measured in the same run.

Usage::

    python benchmarks/run.py                      # every case (about 10 to 15 minutes on 2 cores)
    python benchmarks/run.py --quick              # a reduced set, a few minutes
    python benchmarks/run.py --smoke --json out.json   # tiny sizes, for CI
    python benchmarks/run.py --only 'overhead/*' --json results/latest.json --plot ratios.png

Each row compares paramx (``paramx_s``) with a baseline (``baseline_s``) and gives
``ratio = paramx_s / baseline_s``; lower is better, and ``met`` says whether the issue's goal
is reached. Both sides of a ratio run in this one process, alternating, after a warm-up; each
figure is the median of the repetitions (``benchmarks/_timing.py``). JAX cases live in
``cases_jax.py``; the PyTorch peers, in ``cases_torch.py``, need the ``bench`` extra
(``pip install -e ".[bench]"``) and are skipped with a note when torch is missing; so are the
geotorch peers, in ``cases_geotorch.py``, without geotorch.

Threads: XLA's CPU backend uses every core for its own thread pool; LAPACK calls go to the
OpenBLAS that SciPy ships, pinned to one thread before JAX is imported (``--blas-threads``,
as ``linalg_cost.py`` does) so its pool does not fight XLA's. The torch cases set their own
thread count (recorded in ``machine``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a reduced set, a few minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (no timing value)")
    parser.add_argument("--only", help="fnmatch pattern on case names, e.g. 'overhead/*'")
    parser.add_argument("--json", type=Path, help="write {'rows': [...], 'machine': {...}} here")
    parser.add_argument("--plot", type=Path, help="write a PNG chart of the ratios here")
    parser.add_argument("--reps", type=int, help="repetitions per ratio (default 7; smoke 3)")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="OpenBLAS threads for LAPACK calls; 0 leaves the environment unchanged",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the torch cases")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.smoke else (5 if args.quick else 7)
    return args


def version(dist: str) -> str | None:
    """A distribution's installed version, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax
    from _machine import cpu_info

    info: dict[str, Any] = {
        **cpu_info(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "optax": version("optax"),
        "numpy": version("numpy"),
        "torch": version("torch"),
        "geotorch": version("geotorch"),
        "jax_backend": jax.default_backend(),
        "xla_threads": os.cpu_count(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else ("quick" if args.quick else "full"),
        "reps": args.reps,
        "only": args.only,
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def case_modules(args: argparse.Namespace) -> list[Any]:
    """``cases_jax``, ``cases_lipschitz`` (its torch peers only where torch is wanted and
    installed) and, if their files exist and torch is wanted, ``cases_torch`` and
    ``cases_geotorch``."""
    import cases_jax
    import cases_lipschitz

    modules = [cases_jax, cases_lipschitz]
    if args.no_torch:
        print("note: torch cases skipped (--no-torch)")
    elif (HERE / "cases_torch.py").exists():
        import cases_torch

        modules.append(cases_torch)
        if (HERE / "cases_geotorch.py").exists():  # skips itself without geotorch
            import cases_geotorch

            modules.append(cases_geotorch)
    else:
        print("note: benchmarks/cases_torch.py not found; torch cases skipped")
    return modules


def fmt_value(r: dict[str, Any], key: str) -> str:
    """Seconds as ms/us, bytes as MiB, counts as plain numbers."""
    v = r[key]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    unit = str(r.get("unit", ""))
    if unit.startswith("bytes"):
        return f"{v / 2**20:.1f} MiB"
    if unit.startswith("count"):
        return f"{v:g}"
    if v >= 1.0:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e6:.1f} us"


HEADER = (
    f"{'case':34} {'paramx':>11} {'baseline':>11} {'ratio':>7} {'goal':>6} {'met':>4}  baseline"
)


def fmt_row(r: dict[str, Any]) -> str:
    """One table line."""
    goal = "-" if r["goal"] is None else f"{r['goal']:g}"
    met = {None: "-", True: "yes", False: "NO"}[r["met"]]
    return (
        f"{r['case']:34} {fmt_value(r, 'paramx_s'):>11} {fmt_value(r, 'baseline_s'):>11} "
        f"{r['ratio']:7.3f} {goal:>6} {met:>4}  {r['baseline']}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (for the README)."""
    lines = ["| case | paramx | baseline | ratio | goal | met | baseline is |", "|---" * 7 + "|"]
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['goal']:g}"
        met = {None: "", True: "yes", False: "**no**"}[r["met"]]
        lines.append(
            f"| {r['case']} | {fmt_value(r, 'paramx_s')} | {fmt_value(r, 'baseline_s')} | "
            f"{r['ratio']:.3f} | {goal} | {met} | {r['baseline']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, info: dict[str, Any]) -> None:
    """A horizontal bar chart of the ratios (log scale), goals marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"] > 0 and math.isfinite(r["ratio"])]
    height = max(3.0, 0.22 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    ys = list(range(len(rows)))[::-1]
    colors = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[r["met"]] for r in rows]
    ax.barh(ys, [r["ratio"] for r in rows], color=colors)
    for y, r in zip(ys, rows):
        if r["goal"] is not None:
            ax.plot([r["goal"], r["goal"]], [y - 0.4, y + 0.4], color="black", lw=1.5)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["case"] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("ratio paramx / baseline (lower is better); black tick: goal")
    ax.set_title(
        f"paramx benchmarks, {info['mode']}: green met, red missed, gray no goal\n"
        f"{info['cpu']} ({info['cpu_class']}), {info['cores']} cores, jax {info['jax']}, "
        f"{info['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """``{"rows": [...], "machine": {...}}``, indented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "machine": info}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.blas_threads > 0:  # before NumPy/SciPy/JAX load OpenBLAS
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.blas_threads))
    sys.path[:0] = [str(HERE), str(ROOT)]
    cfg = SimpleNamespace(quick=args.quick, smoke=args.smoke, only=args.only, reps=args.reps)
    modules = case_modules(args)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    print(HEADER)
    print("-" * len(HEADER))
    sys.stdout.flush()
    for module in modules:
        for r in module.rows(cfg):
            rows.append(r)
            print(fmt_row(r))
            sys.stdout.flush()
            if args.json:  # so an interrupted run keeps what it measured
                write_json(args.json, rows, {**machine(args), "partial": True})
    info = machine(args)
    info["wall_s"] = round(time.perf_counter() - start, 1)
    missed = [r for r in rows if r["met"] is False]
    print(f"\n{len(rows)} rows in {info['wall_s']} s; goals missed: {len(missed)}")
    for r in missed:
        print(f"  missed: {r['case']}: ratio {r['ratio']:.3f} > goal {r['goal']:g}")
    print(
        f"machine: {info['cpu']} ({info['cpu_class']}), {info['cores']} cores, "
        f"python {info['python']}, "
        f"jax {info['jax']}, flax {info['flax']}, optax {info['optax']}, torch {info['torch']}"
    )
    if args.json:
        write_json(args.json, rows, info)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(rows, args.plot, info)
            print(f"wrote {args.plot}")
        except ImportError:
            print("note: matplotlib is not installed; --plot skipped (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
