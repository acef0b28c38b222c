"""Small numeric helpers shared by the built-in parametrizations."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def compute_dtype(dtype: Any) -> Any:
    """The dtype to compute in: float32 for bfloat16 and float16 inputs, else the input's."""
    low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return jnp.float32 if low else dtype


def normalize_axis(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative axis; torch's IndexError text when it is out of range."""
    if dim >= ndim or dim < -ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}] but "
            f"got {dim})"
        )
    return dim % ndim
