"""Every notebook in notebooks/ executes top to bottom, and is stored with its outputs."""

import base64
import struct

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")  # the [test] extra installs it; CI must not skip
nbclient = pytest.importorskip("nbclient")

XDIST_SPLIT = "path"  # conftest.py: how xdist may spread this file over workers

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["builtins_tour.ipynb", "parametrizations_tutorial.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code"
    unrun = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unrun, f"{path.name}: code cells {unrun} are stored without outputs; re-execute it"
    counts = [c.execution_count for c in code]
    assert counts == sorted(counts), f"{path.name} was not run top to bottom: {counts}"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} is stored without its plots"


def _png_dpi(data: bytes) -> float:
    """The resolution in a PNG's pHYs chunk (0 when it has none)."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"pHYs":
            x, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            return x * 0.0254 if unit == 1 else 0.0
        if kind == b"IDAT":
            break
        pos += 12 + length
    return 0.0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_figures_are_readable_on_a_slide(path):
    # The stored plots are at 150 dpi or more (the first cell sets figure.dpi).
    nb = nbformat.read(path, as_version=4)
    pngs = [
        base64.b64decode(o["data"]["image/png"])
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    dpis = [round(_png_dpi(png)) for png in pngs]
    assert pngs and min(dpis) >= 150, f"{path.name}: stored figures at {dpis} dpi"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
