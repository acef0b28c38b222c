"""Small numeric helpers shared by the built-in parametrizations, and their option checks."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import stacks


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
        f"{name} needs its state ({what}) but the tree it reads has none (the trainable half "
        f"from `paramx.split_state`?). Give the state half too: `paramx.materialize(params, "
        f"state)`, or the whole tree `paramx.merge_state(params, state)` to the other "
        f"functions; with paramx.linen, the state is `variables['paramx_state']`."
    )


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision.

    JAX's default lets accelerators multiply float32 matrices in TF32 or bf16 passes (about 3
    significant digits on an H100); an orthogonal map or a power iteration computed that way
    is orthogonal, or normalized, to only about 1e-3. torch multiplies in full float32 by
    default, and so does paramx, inside its built-ins. On CPU this changes nothing.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def newton_schulz(q: jax.Array) -> jax.Array:
    """One Newton-Schulz step towards the orthonormal polar factor: ``Q + Q (I - Q^H Q) / 2``.

    An orthogonality error ``E = I - Q^H Q`` becomes ``O(E^2)``; what is left is the rounding
    of ``Q^H Q`` itself. Differentiated by autodiff (four products in a backward pass); see
    :func:`polish` for the step after a map whose value is orthonormal by construction.
    """
    k = q.shape[-1]
    e = jnp.broadcast_to(jnp.eye(k, dtype=q.dtype), (*q.shape[:-2], k, k))
    return q + 0.5 * matmul(q, e - matmul(jnp.conj(jnp.swapaxes(q, -1, -2)), q))


@jax.custom_jvp
def polish(q: jax.Array) -> jax.Array:
    """:func:`newton_schulz` whose derivative is the identity: the last step of the maps whose
    value is orthonormal by construction (``Q(A)`` with ``Q(A)^H Q(A) = I`` for every ``A``
    in exact arithmetic: the matrix exponential and Cayley map of a skew matrix, a product of
    Householder reflectors, their products with an orthogonal base), which it frees of
    rounding.

    At an orthonormal ``Q`` the step's derivative is the projection onto the tangent space,
    ``dQ - Q sym(Q^H dQ)``, and such a map's derivative only produces tangent directions, on
    which the projection is the identity. So the chain's derivative is the map's own, up to
    ``O(E)`` relative to it, ``E`` being the rounding the step removes (float32: 1e-7 to
    1e-5). Autodiff of the step differs from this by O(E) too, and costs four products in
    every backward pass; this one costs none. A map that is only approximately orthonormal
    (the polar map's iteration) keeps :func:`newton_schulz`, whose derivative is exact
    everywhere.
    """
    return newton_schulz(q)


@polish.defjvp
def _polish_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[Any, Any]:
    (q,), (dq,) = primals, tangents
    return polish(q), dq


def lapack(fn: Any, *xs: jax.Array, **options: Any) -> Any:
    """``fn(*xs, **options)`` for a batched LAPACK-backed function (``jnp.linalg.svd``,
    ``lax.linalg.lu``, ...) over matrices ``xs`` that share their batch axes, computed on the
    CPU in chunks small enough that jaxlib runs each one on the calling thread.

    On the CPU (the default backend when traced), a batch whose estimated work reaches
    jaxlib's threshold is cut into chunks under it: as many independent calls side by side as
    the process has CPUs, repeated by ``lax.map`` over the rest (``stacks.chunked_call``).
    Results, gradients and vmap are those of ``fn`` on the whole batch. Everywhere else, and
    for a batch under the threshold, this is ``fn(*xs, **options)``. Why: the notes of
    ``paramx._src.core.stacks`` (which also keeps stacks of tensors under the threshold).
    """
    x = xs[0]
    batch = tuple(x.shape[:-2])
    size = math.prod(batch)
    work = max(stacks.lapack_flops(y.shape, y.dtype) for y in xs)
    per_call = max(1, (stacks.LAPACK_TASK_FLOPS - 1) // max(1, work))
    if (
        size <= per_call
        or not stacks.on_cpu()
        or any(tuple(y.shape[: len(batch)]) != batch or y.ndim != x.ndim for y in xs)
    ):
        return fn(*xs, **options)
    flat = tuple(y.reshape(size, *y.shape[len(batch) :]) for y in xs)
    out = stacks.chunked_call(lambda *parts: fn(*parts, **options), flat, size, per_call)
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


_EPS_WHY = (
    "It is the floor of the norms it divides by: {name}=0 gives 0/0 = NaN for a zero tensor. "
    "The default is 1e-12, as in torch."
)


def option_positive_float(owner: str, name: str, value: Any, why: str = _EPS_WHY) -> float:
    """A positive, finite real number, as a Python float; ``why`` says what the option is
    (default: an ``eps`` floor)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool | jax.Array):
        raise TypeError(
            f"{owner}: {name} must be a positive real number; got {value!r} "
            f"({type(value).__name__})."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{owner}: {name} must be positive and finite; got {name}={value}. "
            + why.format(name=name)
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
