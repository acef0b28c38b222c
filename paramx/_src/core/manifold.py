"""The constraint protocol beyond forward / right_inverse: sampling, membership, distance, and
re-centring a trivialization.

A parametrization that constrains to a set (a manifold, a cone, a simplex) may declare, as
methods (all optional; the conformance suite checks whichever a parametrization has):

* ``sample(key, shape, dtype) -> array``: a point of the set, from the distribution its
  docstring names (Haar for the orthogonal family, uniform where one exists). ``shape`` may have
  leading batch axes.
* ``in_manifold(x, atol=None) -> bool array``: whether ``x`` (with leading batch axes) lies in
  the set, to ``atol`` (default: a dtype-aware tolerance); one bool per matrix / vector.
* ``distance(x) -> array``: how far ``x`` is from the set (a norm of a defect, 0 on the set),
  for tests and training logs.
* ``update_base(*originals, params=, state=) -> (originals, state)``: for a trivialization
  keeping a base as state, re-centre it at the current point: the new state's base is the
  current value and the originals become the trivialization's origin (zero), so the value is
  unchanged. :func:`update_base` runs it on a tree, a stack of layers included.

:func:`sampler` turns ``sample`` into an ``nn.initializers``-style function, so a layer can be
initialized on the set (``nn.Dense(n, kernel_init=paramx.sampler(paramx.Orthogonal()))``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.core import chain as ch
from paramx._src.core import checks, paths
from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized
from paramx._src.core.state import merge_state, split_state


def _method(p: Any, name: str) -> Callable[..., Any] | None:
    fn = getattr(p, name, None)
    return fn if callable(fn) and callable(getattr(p, "forward", None)) else None


def sample_fn(p: Any) -> Callable[..., jax.Array] | None:
    return _method(p, "sample")


def in_manifold_fn(p: Any) -> Callable[..., jax.Array] | None:
    return _method(p, "in_manifold")


def distance_fn(p: Any) -> Callable[..., jax.Array] | None:
    return _method(p, "distance")


def update_base_fn(p: Any) -> Callable[..., tuple[Any, Any]] | None:
    return _method(p, "update_base")


def sampler(parametrization: Any) -> Callable[..., jax.Array]:
    """An ``nn.initializers``-style ``init(key, shape, dtype=float32)`` drawing from
    ``parametrization.sample``.

    Args:
      parametrization: A parametrization with a ``sample`` method.

    Returns:
      The initializer.

    Raises:
      TypeError: If the parametrization has no ``sample``.

    Examples:
      >>> import flax.linen as nn
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> init = px.sampler(px.constraints.Symmetric())
      >>> w = init(jax.random.key(0), (3, 3))
      >>> bool(jnp.array_equal(w, w.T))
      True
      >>> layer = nn.Dense(3, kernel_init=init)
    """
    fn = sample_fn(parametrization)
    if fn is None:
        raise TypeError(
            f"Parametrization {pz.display_name(parametrization)} has no `sample(key, shape, "
            f"dtype)` method, so it cannot serve as an initializer. Give it one, or initialize "
            f"with a Flax initializer and let registration's right_inverse map the value."
        )

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return fn(key, tuple(shape), jnp.dtype(dtype))

    return init


def update_base(tree: Any, where: paths.Where | None = None, *, state: Any = None) -> Any:
    """Re-centres each selected trivialization at its current point (dynamic trivialization).

    For every selected parametrized tensor whose first link declares ``update_base`` (a
    trivialization keeping its base as state), the base becomes the current value and the
    originals the trivialization's origin: the value is unchanged, and the optimizer starts
    again from the centre of the chart, where the map is best conditioned (expRNN, geotorch).
    Pure: call it every K steps of a training loop. Tensors whose first link has no
    ``update_base`` are left as they are.

    Args:
      tree: A registered tree, or the trainable half when ``state`` is given.
      where: A path, a tuple of keys or a predicate; ``None`` (the default) selects every
        parametrized tensor.
      state: The state half, when the tree was split.

    Returns:
      The new tree; with ``state``, the pair ``(params, state)`` (reset the optimizer's
      moments for the originals if they should not carry over).

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.orthogonal({"w": jnp.eye(3)}, "w")
      >>> node = tree["w"]  # pretend training moved the original away from the centre
      >>> tree = {"w": node.replace(originals=(node.original + 0.3 * jnp.tri(3, k=-1),))}
      >>> before = px.materialize(tree)["w"]
      >>> recentred = px.update_base(tree)
      >>> bool(jnp.allclose(px.materialize(recentred)["w"], before, atol=1e-6))
      True
      >>> bool(jnp.allclose(recentred["w"].state["0"]["base"], before, atol=1e-6))
      True
    """
    merged = merge_state(tree, state) if state is not None else tree
    replacements = {}
    for i, where_s, node in paths.select_parametrized(
        merged, where, doing="there is no base to update"
    ):
        fn = update_base_fn(node.chain[0])
        if fn is None:
            continue
        with checks.at_path(where_s):
            replacements[i] = _update_node(node, fn, where_s)
    out = paths.replace_leaves(merged, replacements)
    return split_state(out) if state is not None else out


def _update_node(node: Parametrized, fn: Callable[..., Any], where: str) -> Parametrized:
    n_stack = ch.stack_axes(node, where)
    p = node.chain[0]

    def one(originals: Any, params: dict[str, Any], state: dict[str, Any]) -> Any:
        kw = ch.link_kwargs(params, state, 0, p)
        new, new_state_0 = fn(*originals, **kw) if kw else (fn(*originals), None)
        new = tuple(new) if isinstance(new, (tuple, list)) else (new,)
        out_state = dict(state)
        if new_state_0 is not None:
            out_state["0"] = new_state_0
        return new, out_state

    originals, state = ch.per_tensor(one, n_stack)(node.originals, node.params, node.state)
    for new, old in zip(originals, node.originals):
        checks.check_same(
            new,
            old,
            producer="update_base",
            what="update_base",
            where=where,
            hint="update_base must return originals of the same shapes and dtypes.",
        )
    return node.replace(originals=tuple(originals), state=state)
