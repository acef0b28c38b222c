"""The examples run (tiny settings) and fail loudly when a check fails."""

import pytest
from conftest import ROOT, run_python

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_smoke(script):
    run = run_python(str(script), "--smoke")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stdout.splitlines()[-1]


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_help(script):
    run = run_python(str(script), "--help")
    assert run.returncode == 0 and "usage" in run.stdout
