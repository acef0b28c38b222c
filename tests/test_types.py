"""Static types: mypy over the package, as configured in pyproject.toml ([tool.mypy]).

The core (paramx._src.core) is checked in strict mode, the rest of paramx with mypy's normal
check. This test is how the type check runs in CI (which runs pytest and ruff only). mypy's
cache goes to a temporary folder, so a fresh checkout needs nothing beforehand.
"""

import importlib.util

import pytest
from conftest import ROOT, run_python


def test_mypy_reports_no_errors(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.fail('mypy is not installed; install the test extra: pip install -e ".[test]"')
    # The files to check and every option come from pyproject.toml.
    result = run_python(
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "mypy_cache"),
        "--no-error-summary",
        "--show-error-codes",
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(
            "mypy reports type errors (run `python -m mypy` from the repository root):\n"
            + result.stdout
            + result.stderr
        )
