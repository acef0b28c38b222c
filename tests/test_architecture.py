"""The package's shape: three layers, imports pointing downwards only.

``paramx/_src/core`` (protocol, node, selection, tree transforms) imports JAX and numpy only;
``paramx/_src/parametrizations`` imports the core; ``paramx/_src/integrations`` imports both.
The public modules (``paramx/*.py``) re-export and import nothing private but from ``_src``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "paramx"
SRC = ROOT / "_src"
LAYERS = ("core", "parametrizations", "integrations")
# What each layer may import from outside paramx (the standard library is always allowed).
THIRD_PARTY = {
    "core": {"jax", "jaxlib", "numpy"},
    "parametrizations": {"jax", "jaxlib", "numpy"},
    "integrations": {"jax", "jaxlib", "numpy", "flax", "optax", "yaml", "orbax"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by ``path`` (top level and inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            out += [(name, node.lineno) for name in names]
    return out


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["paramx", "_src"] and len(parts) > 2:
        return parts[2]
    return None


def _files(layer: str) -> list[Path]:
    return sorted((SRC / layer).rglob("*.py"))


def test_the_three_layers_are_the_only_folders():
    folders = sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(LAYERS)
    assert not list(SRC.glob("*.py")), "every private module lives in one of the three layers"


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_downwards_only(layer):
    rank = LAYERS.index(layer)
    stdlib = __import__("sys").stdlib_module_names
    wrong = []
    for path in _files(layer):
        for module, line in _imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {module}"
            target = _layer_of(module)
            if target is not None:
                if target not in LAYERS or LAYERS.index(target) > rank:
                    wrong.append(f"{where} (upwards: {layer} -> {target})")
            elif top == "paramx":
                wrong.append(f"{where} (the public modules sit above every layer)")
            elif top not in stdlib and top not in THIRD_PARTY[layer]:
                wrong.append(f"{where} ({top} is not a dependency of the {layer} layer)")
    assert not wrong, "\n".join(wrong)


def test_a_detector_that_can_fail(tmp_path):
    # The checker sees imports inside functions too (a lazy upward import is still upward).
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from paramx._src.integrations import linen\n")
    assert [_layer_of(m) for m, _ in _imports(bad)] == ["integrations"]


# Batched LAPACK calls go through numerics.lapack (XLA:CPU hangs otherwise; see
# tests/test_lapack_threads.py). A direct call such as ``jnp.linalg.svd(x)`` is refused here; the
# function passed to ``numerics.lapack(jnp.linalg.svd, x)`` is not a call.
_LAPACK_BACKED = {
    "jnp.linalg": {
        "svd",
        "eigh",
        "eigvalsh",
        "eig",
        "qr",
        "cholesky",
        "det",
        "slogdet",
        "solve",
        "inv",
        "pinv",
        "lstsq",
        "matrix_rank",
    },
    "lax.linalg": {"lu", "qr", "svd", "eigh", "cholesky", "triangular_solve"},
    "jax.scipy.linalg": {
        "solve_triangular",
        "lu",
        "lu_factor",
        "qr",
        "svd",
        "eigh",
        "cholesky",
        "solve",
        "inv",
        "det",
    },
}


def _direct_lapack_calls(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in _LAPACK_BACKED.get(owner, ()):
                found.append((node.lineno, ast.unparse(node.func)))
    return found


def test_batched_lapack_calls_go_through_numerics_lapack():
    calls = [
        f"{p.relative_to(ROOT.parent)}:{line} {name}"
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "numerics.py"
        for line, name in _direct_lapack_calls(p.read_text(encoding="utf-8"))
    ]
    assert not calls, (
        "call these through paramx._src.parametrizations.numerics.lapack(fn, *matrices, "
        "**options) (a batched LAPACK call can hang XLA:CPU): " + "; ".join(calls)
    )


def test_the_lapack_detector_can_fail():
    source = "u = jnp.linalg.svd(x)\nok = numerics.lapack(jnp.linalg.svd, x)\n"
    assert _direct_lapack_calls(source) == [(1, "jnp.linalg.svd")]
