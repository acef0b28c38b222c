"""Small numeric helpers shared by the built-in parametrizations."""

from __future__ import annotations

from typing import Any

import jax
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


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision.

    JAX's default lets accelerators multiply float32 matrices in TF32 or bf16 passes (about 3
    significant digits on an H100); an orthogonal map or a power iteration computed that way
    is orthogonal, or normalized, to only about 1e-3. torch multiplies in full float32 by
    default, and so does paramx, inside its built-ins. On CPU this changes nothing.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
