"""Small numeric helpers shared by the built-in parametrizations, and their option checks."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: Any) -> Any:
    """The dtype to compute in: float32 for floats narrower than 32 bits (bfloat16, float16,
    the float8 types), else the input's."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype


def check_dtype(x: Any, name: str, *, complex_ok: bool = True, hint: str = "") -> None:
    """Refuses a tensor that is not floating point (or complex, where ``complex_ok``).

    An integer or boolean tensor has no useful image under any built-in (a norm rounds to an
    integer, a QR factor does not exist), so it is refused instead of computed wrongly.
    """
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return
    if jnp.issubdtype(dtype, jnp.complexfloating):
        if complex_ok:
            return
        raise TypeError(f"{name} does not support complex tensors (got {dtype.name}). {hint}")
    kinds = "a floating-point or complex" if complex_ok else "a floating-point"
    raise TypeError(
        f"{name} needs {kinds} tensor; got dtype {dtype.name}. Cast the tensor to a float dtype "
        f"(e.g. `x.astype(jnp.float32)`) before registering, or leave this leaf unparametrized."
    )


def normalize_axis(dim: int, ndim: int, hint: str = "") -> int:
    """``dim`` as a non-negative axis; torch's IndexError text when it is out of range."""
    if dim >= ndim or dim < -ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}] but "
            f"got {dim}). {hint}".rstrip()
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


# jaxlib (0.10.2) splits a batched LAPACK call (LU, QR, SVD, eigh, Cholesky, triangular solve)
# whose estimated work reaches 2e5 flops into tasks on XLA:CPU's intra-op thread pool and
# blocks its thread until they finish; that thread is itself a pool worker, so when as many
# such calls run at once as the pool has threads (independent layers of one training step,
# or a step and the programs that registration left running), every worker waits for tasks
# no free worker can take: the process hangs. jaxlib estimates the work per matrix as at most
# 10 m n min(m, n) flops, 3 times that for complex matrices (the SVD's estimate; LU, QR,
# Cholesky, eigh and the triangular solve estimate less).
_LAPACK_TASK_FLOPS = 200_000


def _lapack_flops(x: Any) -> int:
    m, n = x.shape[-2:]
    flops = 10 * m * n * min(m, n)
    return 3 * flops if jnp.issubdtype(x.dtype, jnp.complexfloating) else flops


def _lanes() -> int:
    """How many chunks run side by side: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def lapack(fn: Any, *xs: jax.Array, **options: Any) -> Any:
    """``fn(*xs, **options)`` for a batched LAPACK-backed function (``jnp.linalg.svd``,
    ``lax.linalg.lu``, ...) over matrices ``xs`` that share their batch axes, computed on the
    CPU in chunks small enough that jaxlib runs each one on the calling thread.

    On the CPU (the default backend when traced), a batch whose estimated work reaches
    jaxlib's threshold is cut into chunks under it: as many independent calls side by side as
    the process has CPUs (XLA runs independent calls on its pool, none waiting for another),
    repeated by ``lax.map`` over the rest. Results, gradients and vmap are those of ``fn`` on
    the whole batch. Everywhere else, and for a batch under the threshold, this is
    ``fn(*xs, **options)``. Why: the comment above ``_LAPACK_TASK_FLOPS``.
    """
    x = xs[0]
    batch = tuple(x.shape[:-2])
    size = math.prod(batch)
    per_call = max(1, (_LAPACK_TASK_FLOPS - 1) // max(1, max(_lapack_flops(y) for y in xs)))
    if (
        size <= per_call
        or jax.default_backend() != "cpu"
        or any(tuple(y.shape[: len(batch)]) != batch or y.ndim != x.ndim for y in xs)
    ):
        return fn(*xs, **options)
    flat = [y.reshape(size, *y.shape[len(batch) :]) for y in xs]
    lanes = min(_lanes(), -(-size // per_call))

    def side_by_side(parts: list[jax.Array], count: int) -> Any:
        """``count`` items of ``parts`` (leading axis) in calls of at most ``per_call``."""
        outs = [
            fn(*(y[i : i + per_call] for y in parts), **options) for i in range(0, count, per_call)
        ]
        return jax.tree.map(lambda *o: jnp.concatenate(o), *outs) if len(outs) > 1 else outs[0]

    step = lanes * per_call
    loops, rest = divmod(size, step)
    pieces = []
    if loops:
        head = [y[: loops * step].reshape(loops, step, *y.shape[1:]) for y in flat]
        out = jax.lax.map(lambda parts: side_by_side(list(parts), step), head)
        pieces.append(jax.tree.map(lambda o: o.reshape(loops * step, *o.shape[2:]), out))
    if rest:
        pieces.append(side_by_side([y[loops * step :] for y in flat], rest))
    out = pieces[0] if len(pieces) == 1 else jax.tree.map(lambda *o: jnp.concatenate(o), *pieces)
    return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)


# ----- option checks (run by the built-ins' __post_init__) --------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def option_int(owner: str, name: str, value: Any) -> int:
    """``value`` as a Python int; a bool, a float or an array is refused (TypeError)."""
    if not _is_int(value) or isinstance(value, jax.Array):
        raise TypeError(
            f"{owner}: {name} must be an int; got {value!r} ({type(value).__name__}). Pass a "
            f"Python int such as {name}=1."
        )
    return int(value)


def option_dim(owner: str, value: Any, *, default: str) -> int | None:
    """An axis option: an int (not a bool) or None."""
    if value is None:
        return None
    if not _is_int(value) or isinstance(value, jax.Array):
        raise TypeError(
            f"{owner}: dim must be an int (an axis of the tensor) or None ({default}); got "
            f"{value!r} ({type(value).__name__})."
        )
    return int(value)


def option_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` as a Python bool; only True, False (and numpy's bools) are accepted."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(
        f"{owner}: {name} must be True or False; got {value!r} ({type(value).__name__})."
    )


def option_positive_float(owner: str, name: str, value: Any) -> float:
    """A positive, finite real number, as a Python float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool | jax.Array):
        raise TypeError(
            f"{owner}: {name} must be a positive real number; got {value!r} "
            f"({type(value).__name__})."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{owner}: {name} must be positive and finite; got {name}={value}. It is the floor of "
            f"the norms it divides by: {name}=0 gives 0/0 = NaN for a zero tensor. The default is "
            f"1e-12, as in torch."
        )
    return value


def option_name(owner: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{owner}: name must be a str; got {value!r} ({type(value).__name__}).")
    return value


def default_atol(x: jax.Array) -> jax.Array:
    """The default membership tolerance of a (batch of) matrices in the last two axes:
    ``10·n·eps`` of ``x``'s dtype times the largest magnitude of each matrix (at least 1), for
    ``n = x.shape[-1]``; one per matrix."""
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=(-2, -1)), 1)
    return 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps) * scale
