"""Tiny loader for the PyTorch golden files (numpy only; torch is not needed).

Usage from a test::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import load

    for case in load.load("orthogonal"):
        case["id"], case["dtype"], case["original"]  # metadata and numpy arrays together
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent
FAMILIES = ("orthogonal", "spectral_norm", "weight_norm")


def manifest() -> dict:
    """The parsed ``manifest.json``."""
    return json.loads((GOLDEN_DIR / "manifest.json").read_text())


def load(family: str) -> list[dict]:
    """Every case of ``family``: its manifest metadata plus its arrays (by short name)."""
    fam = manifest()["families"][family]
    cases = []
    with np.load(GOLDEN_DIR / fam["file"], allow_pickle=False) as npz:
        for meta in fam["cases"]:
            case = dict(meta)
            for name in meta["arrays"]:
                case[name] = npz[f"{meta['id']}.{name}"]
            cases.append(case)
    return cases


def tolerance(dtype: str) -> float:
    """Parity tolerance for a case's ``dtype`` name (1e-5 single, 1e-10 double precision)."""
    return manifest()["tolerances"][dtype]
