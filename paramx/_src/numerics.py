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


def missing_state(name: str, what: str) -> ValueError:
    """The error for a stateful parametrization read from a tree that has no state."""
    return ValueError(
        f"{name} needs its state ({what}) but the tree it reads has none. Give the state "
        f"half too: `paramx.materialize(params, state)`; with paramx.linen, the state is "
        f"`variables['paramx_state']`."
    )
