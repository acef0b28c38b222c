"""The API reference site builds with warnings as errors and documents every public name;
the package metadata matches the LICENSE file."""

import importlib
import re
import sys

import pytest
from conftest import ROOT, run_python

import paramx as px

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

NAMESPACES = ["linen", "nnx", "interop"]


def _public_paths():
    yield from (f"paramx.{name}" for name in px.__all__)
    for ns in NAMESPACES:
        module = importlib.import_module(f"paramx.{ns}")
        yield from (f"paramx.{ns}.{name}" for name in module.__all__)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    run = run_python("-m", "mkdocs", "build", "--strict", "--site-dir", str(out), timeout=600)
    assert run.returncode == 0, "mkdocs build --strict failed:\n" + run.stderr[-4000:]
    return out


def test_site_builds_strict_and_documents_every_public_name(site):
    html = "".join(p.read_text() for p in (site / "api").rglob("index.html"))
    anchors = set(re.findall(r'id="(paramx[\w.]*)"', html))
    missing = [path for path in _public_paths() if path not in anchors]
    assert not missing, f"public names missing from the API reference: {missing}"
    roles = sorted(set(re.findall(r":(?:class|func|meth|mod):", html)))
    assert not roles, f"Sphinx roles printed as they are in the API reference: {roles}"


def test_site_has_the_guides(site):
    for page in ("index.html", "design/index.html", "flax/index.html"):
        assert (site / page).is_file(), page


def test_every_docs_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    unlisted = [page for page in pages if page not in config]
    assert not unlisted, f"docs pages not in mkdocs.yml's nav: {unlisted}"


def test_license_matches_the_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"
    assert meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    classifiers = meta["classifiers"]
    assert "Typing :: Typed" in classifiers and (ROOT / "paramx" / "py.typed").exists()
    versions = {c.rsplit(" ", 1)[-1] for c in classifiers if "Python :: 3." in c}
    assert f"3.{sys.version_info.minor}" in versions or sys.version_info.minor > 13
    assert meta["requires-python"] == ">=3.10" and "3.10" in versions


def test_doc_tools_are_in_the_test_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "paramx[docs]" in extras["test"]
    assert any(d.startswith("mkdocstrings[python]") for d in extras["docs"])
    assert any(d.startswith("hypothesis") for d in extras["test"])
