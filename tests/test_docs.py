"""Every public name is documented with a runnable example, and the examples run."""

import inspect

from conftest import run_python

import paramx as px


def test_every_public_name_has_a_docstring_with_an_example():
    missing = []
    for name in px.__all__:
        doc = inspect.getdoc(getattr(px, name)) or ""
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"public names without a runnable example: {missing}"


def test_docstring_examples_run():
    # A fresh interpreter: the suite's conftest turns on float64, which changes printed dtypes.
    script = """
import doctest, importlib, pkgutil, sys
import paramx
names = [m.name for m in pkgutil.iter_modules(paramx._src.__path__)]
mods = [paramx] + [importlib.import_module("paramx._src." + n) for n in names]
flags = doctest.NORMALIZE_WHITESPACE
results = [doctest.testmod(m, optionflags=flags) for m in mods]
print("attempted", sum(r.attempted for r in results))
sys.exit(1 if sum(r.failed for r in results) else 0)
"""
    run = run_python("-c", script, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert int(run.stdout.split("attempted")[-1]) > 50
