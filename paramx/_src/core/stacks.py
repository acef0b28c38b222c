"""Per-tensor functions over stacks of tensors, and LAPACK calls kept under jaxlib's
thread-pool threshold on the CPU.

jaxlib (0.10.2) splits a batched LAPACK call (LU, QR, SVD, eigh, Cholesky, triangular solve)
whose estimated work reaches 2e5 flops into tasks on XLA:CPU's intra-op thread pool and blocks
its thread until they finish; that thread is itself a pool worker, so when as many such calls
run at once as the pool has threads (independent layers of one training step, or a step and
the programs that registration left running), every worker waits for tasks no free worker can
take: the process hangs. jaxlib estimates the work per matrix as at most ``10 m n min(m, n)``
flops, 3 times that for complex matrices (the SVD's estimate; LU, QR, Cholesky, eigh and the
triangular solve estimate less).

Two places build such calls: a parametrization on a batch of matrices
(``numerics.lapack`` cuts the batch into chunks with :func:`chunked_call`), and ``jax.vmap``
over a stack of tensors (layers registered with ``batch_axes``, ``nn.vmap`` stacks, batched
materialization), which turns every per-tensor LAPACK call into one call over the whole stack.
:func:`per_tensor` maps a function over a stack: with ``jax.vmap`` as before, except on the
CPU when the function's own LAPACK calls times the stack size reach the threshold; then in
vmapped chunks under it, as many side by side as the process has CPUs, repeated by
``lax.map``. Values, gradients and vmap are unchanged.

:func:`stack` and :func:`unstack` build and split the stacks of batched materialization
(``batching.py``) with one slice kernel for the whole stack, in the forward and the backward,
where ``jnp.stack`` and ``jnp.split`` take one distinct kernel per tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import jaxprs_in_params

LAPACK_TASK_FLOPS = 200_000
"""jaxlib's threshold: a batched LAPACK call with at least this estimated work is split into
pool tasks."""

# The primitives that jaxlib runs as LAPACK calls on the CPU.
_LAPACK_PRIMITIVES = frozenset(
    {
        "lu",
        "qr",
        "geqrf",
        "geqp3",
        "householder_product",
        "svd",
        "eig",
        "eigh",
        "cholesky",
        "triangular_solve",
        "schur",
        "hessenberg",
        "tridiagonal",
    }
)


def lapack_flops(shape: tuple[int, ...], dtype: Any) -> int:
    """jaxlib's work estimate for one matrix of ``shape[-2:]``: ``10 m n min(m, n)`` (x3 for
    complex)."""
    if len(shape) < 2:
        return 0
    m, n = shape[-2:]
    flops = 10 * m * n * min(m, n)
    return 3 * flops if jnp.issubdtype(dtype, jnp.complexfloating) else flops


def lanes() -> int:
    """How many chunks run side by side: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def on_cpu() -> bool:
    """Whether the programs being traced run on XLA:CPU: the default backend, or the default
    device set by ``jax.default_device`` (CPU work on a GPU host meets jaxlib's thread pool
    too)."""
    device = getattr(jax.config, "jax_default_device", None)
    if device is not None:
        return str(getattr(device, "platform", device)) == "cpu"
    return jax.default_backend() == "cpu"


def chunked_call(call: Callable[..., Any], args: tuple[Any, ...], size: int, per_call: int) -> Any:
    """``call(*args)`` for a ``call`` that maps the leading axis (of length ``size``) of every
    leaf of ``args`` to the leading axis of every leaf of its result, made as calls on at most
    ``per_call`` items: ``lanes()`` independent calls side by side, none waiting for another,
    repeated by ``lax.map``, then one round for the remainder. (Whether XLA runs them at the
    same time is its choice. jax 0.10.2 on a 2-core CPU, one OpenBLAS thread, 16 independent
    256 x 256 calls in one program: LUs took 13.8x the time of one, triangular solves 12.9x,
    but chains of an LU and its two solves 8.3x; so a ``call`` that holds a whole chain
    overlaps better than one call per LAPACK step, ``linalg._lu_solve``.)"""
    if size <= per_call:
        return call(*args)
    width = min(lanes(), -(-size // per_call))

    def side_by_side(parts: tuple[Any, ...], count: int) -> Any:
        outs = [
            call(*jax.tree.map(lambda x, i=i: x[i : i + per_call], parts))
            for i in range(0, count, per_call)
        ]
        return jax.tree.map(lambda *o: jnp.concatenate(o), *outs) if len(outs) > 1 else outs[0]

    step = width * per_call
    loops, rest = divmod(size, step)
    pieces = []
    if loops:
        head = jax.tree.map(lambda x: x[: loops * step].reshape(loops, step, *x.shape[1:]), args)
        out = jax.lax.map(lambda parts: side_by_side(parts, step), head)
        pieces.append(jax.tree.map(lambda o: o.reshape(loops * step, *o.shape[2:]), out))
    if rest:
        pieces.append(side_by_side(jax.tree.map(lambda x: x[loops * step :], args), rest))
    return pieces[0] if len(pieces) == 1 else jax.tree.map(lambda *o: jnp.concatenate(o), *pieces)


def _opaque_indices(n: int) -> tuple[jax.Array, ...]:
    """``0 .. n-1`` behind an optimization barrier: XLA cannot fold them into the slices."""
    return tuple(jax.lax.optimization_barrier(tuple(jnp.int32(i) for i in range(n))))


def _take_each(x: jax.Array) -> list[jax.Array]:
    index = _opaque_indices(x.shape[0])
    return [jax.lax.dynamic_index_in_dim(x, index[i], keepdims=False) for i in range(x.shape[0])]


@jax.custom_jvp
def stack(xs: list[jax.Array]) -> jax.Array:
    """``jnp.stack(xs)`` whose reverse-mode derivative takes the pieces by one slice kernel.

    XLA:CPU compiles each distinct kernel once and reuses it for identical ones. The
    derivative of ``jnp.stack`` (and the pieces of a plain unstack) are slices at constant
    offsets: one distinct kernel per piece, often fused with the math around it, which made
    compiling a group of 64 small layers cost more than compiling the 64 layers one by one.
    Here the slices read offsets XLA cannot see (an ``optimization_barrier``), so they are one
    kernel run ``len(xs)`` times. The tangent is a sum of ``dynamic_update_slice``s into
    zeros, whose transpose is those slices (forward mode pays a sum over the stack).
    """
    return jnp.stack(xs)


@stack.defjvp
def _stack_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    (xs,), (ts,) = primals, tangents
    shape = (len(xs), *jnp.shape(ts[0]))
    index = _opaque_indices(len(xs))
    zeros = jnp.zeros(shape, jnp.result_type(ts[0]))
    parts = [jax.lax.dynamic_update_index_in_dim(zeros, t, index[i], 0) for i, t in enumerate(ts)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return stack(xs), total


@jax.custom_jvp
def unstack(x: jax.Array) -> list[jax.Array]:
    """The pieces of ``x`` along its leading axis, by one slice kernel (see :func:`stack`); the
    reverse-mode derivative is one concatenation."""
    return _take_each(x)


@unstack.defjvp
def _unstack_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    (x,), (t,) = primals, tangents
    n = x.shape[0]
    pieces = jnp.split(t, n, axis=0) if n > 1 else [t]
    return unstack(x), [jnp.squeeze(p, 0) for p in pieces]


def _lapack_work(jaxpr: Any) -> Iterator[int]:
    """The estimated work (batch x per-matrix flops) of every LAPACK call in ``jaxpr``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _LAPACK_PRIMITIVES and eqn.invars:
            aval = eqn.invars[0].aval
            shape = tuple(getattr(aval, "shape", ()))
            yield math.prod(shape[:-2]) * lapack_flops(shape, aval.dtype)
        for sub in jaxprs_in_params(eqn.params):
            yield from _lapack_work(getattr(sub, "jaxpr", sub))


def _per_call(fn: Callable[..., Any], args: tuple[Any, ...], n_axes: int) -> int | None:
    """How many tensors of the stack one vmapped call of ``fn`` may take so that none of its
    LAPACK calls reaches the threshold, or None if ``fn`` makes no LAPACK call."""

    def one(x: Any) -> Any:
        t = jax.typeof(x)
        return jax.ShapeDtypeStruct(
            tuple(t.shape[n_axes:]), t.dtype, weak_type=bool(getattr(t, "weak_type", False))
        )

    jaxpr = jax.make_jaxpr(fn)(*jax.tree.map(one, args))
    work = max(_lapack_work(jaxpr.jaxpr), default=0)
    if work == 0:
        return None
    return max(1, (LAPACK_TASK_FLOPS - 1) // work)


def per_tensor(fn: Callable[..., Any], n_axes: int) -> Callable[..., Any]:
    """``fn`` mapped over ``n_axes`` leading axes of every argument and result: ``jax.vmap``,
    in chunks under the LAPACK threshold where the stack would reach it (module notes)."""
    if n_axes == 0:
        return fn
    mapped = fn
    for _ in range(n_axes):
        mapped = jax.vmap(mapped)

    def run(*args: Any) -> Any:
        leaves = jax.tree.leaves(args)
        if not leaves or not on_cpu():
            return mapped(*args)
        batch = tuple(jax.typeof(leaves[0]).shape[:n_axes])
        size = math.prod(batch)
        if size <= 1:  # nothing to chunk: skip tracing fn once more
            return mapped(*args)
        per_call = _per_call(fn, args, n_axes)
        if per_call is None or size <= per_call:
            return mapped(*args)
        flat = jax.tree.map(lambda x: x.reshape(size, *x.shape[n_axes:]), args)
        out = chunked_call(jax.vmap(fn), flat, size, per_call)
        return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)

    return run
