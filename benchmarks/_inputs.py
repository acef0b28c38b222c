"""The matrices every map benchmark uses, one definition for the JAX, torch and linalg scripts.

Import it after any thread pinning (it imports NumPy).
"""

from __future__ import annotations

import numpy as np


def skew_inputs(n: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A float32 skew matrix ``A``, a cotangent ``C`` and a second matmul operand ``B``.

    ``A = X - X^T`` with ``X ~ N(0, 1)`` (``kind="random"``), scaled to 1-norm 1 for
    ``kind="norm1"``. Seeded by ``n``, so every script measures the same matrices.
    """
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n))
    a = x - x.T
    if kind == "norm1":
        a = a / np.abs(a).sum(axis=0).max()
    c = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    return tuple(v.astype(np.float32) for v in (a, c, b))
