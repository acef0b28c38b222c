"""The examples run (tiny settings), write their figure, and fail loudly when a check fails."""

import pytest
from conftest import ROOT, run_python

EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_smoke(script, tmp_path, monkeypatch):
    monkeypatch.setenv("PARAMX_EXAMPLES_QUIET", "1")
    run = run_python(str(script), "--smoke", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stdout.splitlines()[-1]
    pngs = list(tmp_path.glob("*.png"))
    assert pngs, f"{script.name} wrote no figure to --out"
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_help(script):
    run = run_python(str(script), "--help")
    assert run.returncode == 0 and "usage" in run.stdout
    assert "--smoke" in run.stdout and "--out" in run.stdout
