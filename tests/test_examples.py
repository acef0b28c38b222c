"""The examples run (tiny settings) and fail loudly when a check fails."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# The examples import paramx from this checkout, installed or not.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_smoke(script):
    run = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stdout.splitlines()[-1]


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_help(script):
    run = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert run.returncode == 0 and "usage" in run.stdout
