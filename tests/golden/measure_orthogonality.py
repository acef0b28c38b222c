"""Measure torch's orthogonality error after a fixed training run (the constants of
``tests/test_builtins.py::TORCH_ORTHOGONALITY_ERROR``).

Run with a Python that has ``torch==2.13.0`` and ``numpy`` (NOT needed at test time)::

    python tests/golden/measure_orthogonality.py

The run, which the test repeats with paramx: a batch of 16 weights of shape (12, 5) (tall, so
torch and paramx work on the same matrix, untransposed), drawn with
``np.random.default_rng(0).standard_normal`` (first the weights, then the targets), float32;
``orthogonal(module, "weight", map, use_trivialization=...)``; 1,000 steps of Adam (lr 1e-2)
on ``sum((weight - target) ** 2)``; then the largest ``max |Q^T Q - I|`` over the batch,
computed in float64. torch on CPU, one thread. With trivialization torch draws the base's
completion columns at random: the smallest error over 5 seeds is kept.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import parametrizations

SHAPE = (16, 12, 5)
STEPS = 1000


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)


def orthogonality_error(q: np.ndarray) -> float:
    q = np.asarray(q, np.float64)
    gram = np.swapaxes(q, -1, -2) @ q
    return float(np.abs(gram - np.eye(q.shape[-1])).max())


def run(orthogonal_map: str, use_trivialization: bool, seed: int) -> float:
    w, t = data()
    torch.manual_seed(seed)  # torch completes a non-square base with random columns
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))
    parametrizations.orthogonal(
        module, "weight", orthogonal_map, use_trivialization=use_trivialization
    )
    target = torch.tensor(t, dtype=torch.float32)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        ((module.weight - target) ** 2).sum().backward()
        opt.step()
    with torch.no_grad():
        return orthogonality_error(module.weight.numpy())


def main() -> None:
    """Prints, per map and setting, the smallest error over 5 torch seeds (the strictest bound
    for paramx) and the spread."""
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}")
    for omap in ("matrix_exp", "cayley", "householder"):
        for triv in (True, False):
            errors = [run(omap, triv, seed) for seed in range(5 if triv else 1)]
            spread = f"  # seeds: {', '.join(f'{e:.2e}' for e in errors)}" if triv else ""
            print(f'("{omap}", {triv}): {min(errors):.2e},{spread}')


if __name__ == "__main__":
    main()
