"""``cached()``: compute each parametrized tensor once inside a ``with`` block; torch's
``parametrize.cached``.

The cache is a dict created when the outermost ``with cached():`` opens and dropped when it
closes; nested blocks share it (torch's semantics). It is reached through a
:class:`contextvars.ContextVar`, so each thread (and each asyncio task) sees its own block,
and nothing outlives the block: there is no module-level dict. An entry records the JAX trace
that computed it: a value computed inside ``jax.lax.scan``'s body (or ``jax.jit``,
``jax.vmap``) is a tracer of that trace, which a read after it must not get, while a value
computed before the scan serves the reads in its body.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax

from paramx._src.core import checks

# The open block's entries: id(list) -> (list, the trace that computed the value, the arrays
# it read, the value). None outside a block.
_Entry = tuple[Any, Any, tuple[Any, ...], jax.Array]
_SCOPE: contextvars.ContextVar[dict[int, _Entry] | None] = contextvars.ContextVar(
    "paramx_nnx_cached", default=None
)


def lookup(plist: Any) -> jax.Array | None:
    """The value computed for ``plist`` in the open block, if its Variables still hold the
    arrays it was computed from and the value can be used in the current trace."""
    entries = _SCOPE.get()
    if entries is None:
        return None
    entry = entries.get(id(plist))
    if entry is None or entry[0] is not plist:
        return None
    _, trace, raw, value = entry
    if not checks.reusable(trace, value):
        return None
    now = plist._raw()
    if len(raw) == len(now) and all(a is b for a, b in zip(raw, now)):
        return value
    return None


def store(plist: Any, value: jax.Array) -> None:
    """Keeps ``value`` for ``plist`` until the open block closes (nothing outside a block)."""
    entries = _SCOPE.get()
    if entries is not None:
        entries[id(plist)] = (plist, checks.current_trace(), plist._raw(), value)


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Computes each parametrized tensor once while the context is open; torch's ``cached``.

    Inside the block, the first read of a parametrized tensor computes it (and, in training
    mode, updates its state once); later reads return the same array as long as its
    originals, params and state Variables still hold the arrays it was computed from, so an
    optimizer update or an assignment makes it compute again. Use it when a module reads a
    tensor several times per step (a layer applied in a loop, shared weights), inside the
    function you give ``nnx.jit``, or around an evaluation loop. Nested blocks share one
    cache, which is dropped when the outermost block closes; each thread has its own.

    Yields:
      Nothing.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
      >>> with pnx.cached():
      ...     a, b = layer.kernel, layer.kernel
      >>> a is b
      True
      >>> layer.kernel is a  # outside the block, each read computes again
      False
    """
    entries = _SCOPE.get()
    token = _SCOPE.set({} if entries is None else entries)
    try:
        yield
    finally:
        _SCOPE.reset(token)
