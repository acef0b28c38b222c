"""The examples run (tiny settings), write their figure, and fail loudly when a check fails."""

import os
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import ROOT, run_python

XDIST_SPLIT = "each"  # conftest.py: how xdist may spread this file over workers

EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
MIN_DPI = 150  # figures are meant to be readable on a slide


def png_dpi(data: bytes) -> float:
    """The resolution stored in a PNG's pHYs chunk (0 when it has none)."""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"pHYs":
            x, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            return x * 0.0254 if unit == 1 else 0.0
        if kind == b"IDAT":
            return 0.0
        pos += 12 + length
    return 0.0


def _check_smoke_run(run, figures):
    """A ``--smoke`` run passed its checks and wrote readable figures."""
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stdout.splitlines()[-1]
    pngs = list(figures)
    assert pngs, "the script wrote no figure"
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    low = {p.name: round(png_dpi(p.read_bytes())) for p in pngs}
    assert all(dpi >= MIN_DPI for dpi in low.values()), f"figures below {MIN_DPI} dpi: {low}"
    warnings = [line for line in run.stderr.splitlines() if "figure warning" in line]
    assert not warnings, "axes without labels:\n" + "\n".join(warnings)


# quickstart.py is the README's main command: its smoke run is the work-tree test below.
@pytest.mark.parametrize(
    "script",
    [p for p in EXAMPLES if p.stem != "quickstart"],
    ids=[p.stem for p in EXAMPLES if p.stem != "quickstart"],
)
def test_example_smoke(script, tmp_path, monkeypatch):
    monkeypatch.setenv("PARAMX_EXAMPLES_QUIET", "1")
    run = run_python(str(script), "--smoke", "--out", str(tmp_path))
    _check_smoke_run(run, tmp_path.glob("*.png"))


_HELP = """
import contextlib, io, os, runpy, sys
for script in sys.argv[1:]:
    sys.path.insert(0, os.path.dirname(script))  # as `python script` does
    sys.argv, out = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (0, None), (script, stop.code)
    text = out.getvalue()
    assert "usage" in text and "--smoke" in text and "--out" in text, (script, text)
print("OK", len(sys.argv))
"""


def test_every_example_has_help():
    # One interpreter for all scripts (each --help would otherwise pay JAX's import).
    run = run_python("-c", _HELP, *(str(p) for p in EXAMPLES))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().startswith("OK")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_main_command_leaves_the_work_tree_clean(tmp_path):
    # The README's main command runs examples/quickstart.py without --out: in a copy of the
    # checkout's files (a git repository of its own), a smoke run must change nothing git sees.
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    repo = tmp_path / "repo"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)

    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "copy")
    before = git("status", "--porcelain", "--untracked-files=all")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(repo), "TMPDIR": str(temp)}
    env["PARAMX_EXAMPLES_QUIET"] = "1"
    run = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--smoke"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _check_smoke_run(run, temp.rglob("quickstart.png"))  # the figure went to TMPDIR
    assert git("status", "--porcelain", "--untracked-files=all") == before == ""
