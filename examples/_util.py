"""What every example shares: its command line, checks that fail loudly, progress, figures.

Not an example itself (``tests/test_examples.py`` skips files starting with ``_``). Each script
imports it as ``import _util``, which works because Python puts the script's own folder first
on ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

# The committed figures (the ones examples/README.md shows): written only when asked, with
# ``--out examples/figures``. By default a run writes to a temporary folder and leaves the work
# tree as it was.
FIGURES = pathlib.Path(__file__).resolve().parent / "figures"
DPI = 160  # readable on a slide; tests/test_examples.py checks the PNGs' resolution


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every example has: ``--seed``, ``--smoke`` and ``--out``.

    The description is the module docstring's first line; the rest of the docstring is printed
    after the options by ``--help``.
    """
    first, _, rest = doc.strip().partition("\n")
    p = argparse.ArgumentParser(
        description=first,
        epilog=rest.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and a few steps: checks that the script runs (used by the tests)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=default_out(),
        help=(
            "folder for the PNG (default: a temporary folder, %(default)s; "
            "--out examples/figures regenerates the figures in examples/README.md)"
        ),
    )
    return p


def default_out() -> pathlib.Path:
    """Where figures go unless ``--out`` says otherwise: outside the work tree."""
    return pathlib.Path(tempfile.gettempdir()) / "paramx-examples"


def check(label: str, value: Any, ok: bool) -> None:
    """Prints a labelled result; raises, so that the script exits non-zero, when ``ok`` is false."""
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"  {label:<60} {shown}")
    if not ok:
        raise AssertionError(f"check failed: {label}: {shown}")


def max_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between two trees of arrays of the same structure."""
    diffs = jax.tree_util.tree_map(
        lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)), a, b
    )
    return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def progress(steps: int, desc: str, *, smoke: bool = False) -> Iterator[int]:
    """``range(steps)`` with a tqdm progress bar on stderr (none in smoke runs or when piped)."""
    from tqdm.auto import tqdm  # an extra: pip install -e ".[examples]"

    quiet = smoke or os.environ.get("PARAMX_EXAMPLES_QUIET") == "1"
    return iter(tqdm(range(steps), desc=desc, disable=quiet or None, mininterval=0.5, leave=False))


def every(steps: int, count: int = 5) -> set[int]:
    """The steps (1-based) at which to print a progress line: ``count`` of them and the last."""
    stride = max(1, steps // count)
    return {s for s in range(1, steps + 1) if s == 1 or s % stride == 0 or s == steps}


def save(fig: Any, out: pathlib.Path, name: str) -> pathlib.Path:
    """Writes ``fig`` to ``out/name`` (creating ``out``), closes it, prints and returns the path."""
    import matplotlib.pyplot as plt

    for problem in unlabelled_axes(fig):
        print(f"  figure warning: {name}: {problem}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"  figure: {path}")
    return path


def unlabelled_axes(fig: Any) -> list[str]:
    """The axes of ``fig`` that show numeric ticks without an axis label.

    An axis whose ticks are hidden, or whose tick labels are names (``set_xticklabels``), needs
    no label; colorbars are skipped. ``save`` prints each problem as a ``figure warning`` on
    stderr, and tests/test_examples.py fails on any.
    """
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    problems = []
    for i, ax in enumerate(fig.axes):
        if getattr(ax, "_colorbar", None) is not None or not ax.get_visible():
            continue
        title = ax.get_title() or f"axes {i}"
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            shown = axis.get_visible() and len(axis.get_ticklocs()) > 0
            # set_xticklabels gives a FixedFormatter or, in newer matplotlib, a FuncFormatter.
            named = isinstance(axis.get_major_formatter(), (FixedFormatter, FuncFormatter))
            if shown and not named and not label:
                problems.append(f"'{title}': the {axis.axis_name} axis has no label")
    return problems


def figure(*args: Any, **kwargs: Any) -> Any:
    """``matplotlib.pyplot.subplots`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Sizes legible on a slide; a script's own fontsize= arguments would override them.
    plt.rcParams.update(
        {
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "legend.fontsize": 10,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
        }
    )
    return plt.subplots(*args, **kwargs)


class Timer:
    """Wall time since construction, for the closing ``... OK (12.3 s)`` line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.1f} s"
