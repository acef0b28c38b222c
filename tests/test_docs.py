"""Every public name is documented with a runnable example, and the examples run."""

import importlib
import inspect
import re

import pytest
from conftest import run_python

import paramx as px

NAMESPACES = ["linen", "nnx", "interop", "tensor", "constraints", "lipschitz", "optim"]
XDIST_SPLIT = "chunk"  # conftest.py: how xdist may spread this file over workers
CHUNKS = 3  # the doctests run in this many interpreters, which xdist spreads over the cores


def _public_names():
    yield from ((name, getattr(px, name)) for name in px.__all__)
    for ns in NAMESPACES:
        module = importlib.import_module(f"paramx.{ns}")
        yield from ((f"{ns}.{name}", getattr(module, name)) for name in module.__all__)


def test_every_public_name_has_a_docstring_with_an_example():
    # Functions and classes; a constant (interop.LAYOUTS) is documented by its module.
    names = [(name, obj) for name, obj in _public_names() if callable(obj)]
    missing = [name for name, obj in names if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"public names without a runnable example: {missing}"


def test_namespaces_are_reachable_from_the_package():
    for ns in NAMESPACES:
        assert getattr(px, ns) is importlib.import_module(f"paramx.{ns}")


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_docstring_examples_run(chunk):
    # A fresh interpreter: the suite's conftest turns on float64, which changes printed dtypes.
    # The modules are dealt round-robin into CHUNKS interpreters.
    script = """
import doctest, importlib, pkgutil, sys
import paramx
chunk, chunks = int(sys.argv[1]), int(sys.argv[2])
infos = pkgutil.walk_packages(paramx._src.__path__, "paramx._src.")
names = sorted(["paramx"] + [m.name for m in infos] + ["paramx." + n for n in sys.argv[3:]])
mods = [importlib.import_module(n) for n in names[chunk::chunks]]
flags = doctest.NORMALIZE_WHITESPACE
results = [doctest.testmod(m, optionflags=flags) for m in mods]
print("attempted", sum(r.attempted for r in results))
sys.exit(1 if sum(r.failed for r in results) else 0)
"""
    # The printed outputs are CPU's: on a GPU the last digit of some float32 results differs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_PLATFORMS", "cpu")
        run = run_python("-c", script, str(chunk), str(CHUNKS), *NAMESPACES, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert int(run.stdout.split("attempted")[-1]) > 20


def test_help_gives_an_overview_and_hides_private_modules():
    # help(paramx) is pydoc's text: the docstring (with a runnable example, checked by the
    # doctests above) and the package's public contents, without paramx._src.
    import pydoc

    text = pydoc.render_doc(px, renderer=pydoc.plaintext)
    overview = text.split("PACKAGE CONTENTS")[0]
    assert ">>>" in overview and "split_state" in overview and "materialize" in overview
    sections = re.split(r"\n(?=[A-Z][A-Z ]+\n)", text)
    listed = [
        line.strip()
        for section in sections
        if section.startswith(("PACKAGE CONTENTS", "SUBMODULES"))
        for line in section.splitlines()[1:]
    ]
    assert {"constraints", "interop", "linen", "nnx", "tensor"} <= set(listed), listed
    private = [name for name in listed if name.startswith("_")]
    assert not private, f"help(paramx) lists private modules: {private}"
