"""`ordered`: strictly increasing entries along an axis (cut points, sorted thresholds, knots).

The value along ``axis`` is ``y_1 = x_1`` and ``y_i = y_{i−1} + softplus(x_i)`` for ``i > 1``
(``map="exp"`` uses ``exp(x_i)``, Stan's ordered transform): the first entry is free and the
others are the first plus a cumulative sum of positive increments. On a Flax Dense kernel
(in, out) with the default ``axis=-1`` each row (one input feature's weights to the outputs) is
increasing; ``axis=-2`` orders each output's column of weights. On a conv kernel
(*spatial, in, out) the same holds at every spatial tap.

``right_inverse`` is exact on strictly increasing values: ``x_1 = y_1`` and ``x_i`` the inverse
softplus (or log) of ``y_i − y_{i−1}``. The nearest non-decreasing vector to another value is
its isotonic regression, which has ties and so is not strictly increasing: there is no nearest
point in the set, and a value that is not strictly increasing is refused with a ValueError
naming the path when it is concrete (``check_value``, which the core runs eagerly before it
traces anything: also for stacks and ``paramx.nnx``). Only inside a user's own ``jax.jit`` is
the value a tracer and the check cannot run: a tie gives an original of ``−inf`` and a
decrease NaN.

Membership and distance are taken per matrix in the last two axes (per vector for a 1-D
tensor): ``in_manifold`` gives one bool each and ``distance`` the Frobenius distance to the
closed set of non-decreasing vectors (the isotonic regression's residual).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.positive import softplus_inverse

_OWNER = "Ordered"
_MAPS = ("softplus", "exp")


def _concrete(x: Any) -> bool:
    return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


def _event_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(-min(x.ndim, 2), 0))


def _check(x: jax.Array | jax.ShapeDtypeStruct, axis: int) -> int:
    numerics.check_dtype(x, _OWNER, complex_ok=False)
    if x.ndim == 0:
        raise ValueError(
            f"{_OWNER} needs at least one axis to order along; got a scalar. Register it on a "
            f"vector or a kernel."
        )
    return numerics.normalize_axis(axis, x.ndim, hint=f"({_OWNER}: axis={axis})")


def _isotonic_vector(x: jax.Array) -> jax.Array:
    """The non-decreasing vector nearest to ``x`` (1-D), by the min-max formula
    ``y_i = max_{j<=i} min_{k>=i} mean(x_j..x_k)``: ``O(n²)`` work and memory, no loop."""
    n = x.shape[-1]
    s = jnp.concatenate([jnp.zeros((1,), x.dtype), jnp.cumsum(x)])
    j = jnp.arange(n)[:, None]
    k = jnp.arange(n)[None, :]
    count = (k - j + 1).astype(x.dtype)
    means = jnp.where(k >= j, (s[None, 1:] - s[:-1, None]) / jnp.maximum(count, 1), jnp.inf)
    # lowest[j, i] = min over k >= i of means[j, k]
    lowest = jnp.flip(jax.lax.cummin(jnp.flip(means, -1), axis=1), -1)
    return jnp.max(jnp.where(j <= k, lowest, -jnp.inf), axis=0)


def isotonic_regression(y: jax.Array, axis: int = -1) -> jax.Array:
    """The nearest (Euclidean) non-decreasing vector along ``axis``, for each vector of ``y``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from paramx._src.parametrizations.ordered import isotonic_regression
      >>> isotonic_regression(jnp.array([1.0, 3.0, 2.0, 4.0]))
      Array([1. , 2.5, 2.5, 4. ], dtype=float32)
    """
    moved = jnp.moveaxis(y, axis, -1)
    n = moved.shape[-1]
    flat = moved.reshape(-1, n)
    out = jax.lax.map(_isotonic_vector, flat, batch_size=max(1, 2**22 // (n * n)))
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)


@dataclasses.dataclass(frozen=True)
class Ordered:
    """Strictly increasing along ``axis``: a free first entry plus cumulative positive steps.

    ``right_inverse`` is exact on strictly increasing values and refuses any other value (see
    the module docstring; the nearest non-decreasing value has ties, outside the set).

    Attributes:
      axis: The axis along which entries increase (``-1``: each row of a Dense kernel).
      map: The increment map, ``"softplus"`` (default) or ``"exp"``.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.ordered import Ordered
      >>> tree = px.register_parametrization({"cuts": jnp.array([-1.0, 0.0, 2.5])}, "cuts",
      ...                                    Ordered())
      >>> px.materialize(tree)["cuts"]
      Array([-1. ,  0. ,  2.5], dtype=float32)
    """

    axis: int = -1
    map: str = "softplus"
    name: str = "ordered"

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", numerics.option_int(_OWNER, "axis", self.axis))
        if not isinstance(self.map, str) or self.map not in _MAPS:
            raise ValueError(
                f"{_OWNER}: map must be one of {list(_MAPS)}; got {self.map!r}. The default is "
                f"'softplus'."
            )
        numerics.option_name(_OWNER, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        axis = _check(x, self.axis)
        xc = jnp.moveaxis(x.astype(numerics.compute_dtype(x.dtype)), axis, -1)
        steps = jax.nn.softplus(xc[..., 1:]) if self.map == "softplus" else jnp.exp(xc[..., 1:])
        y = jnp.concatenate([xc[..., :1], xc[..., :1] + jnp.cumsum(steps, axis=-1)], axis=-1)
        return jnp.moveaxis(y, -1, axis).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        axis = _check(value, self.axis)
        y = jnp.moveaxis(value.astype(numerics.compute_dtype(value.dtype)), axis, -1)
        steps = jnp.diff(y, axis=-1)
        self.check_value(value)
        inv = softplus_inverse(steps) if self.map == "softplus" else jnp.log(steps)
        x = jnp.concatenate([y[..., :1], inv], axis=-1)
        return jnp.moveaxis(x, -1, axis).astype(value.dtype)

    def check_value(self, value: jax.Array, *, batch_axes: int = 0) -> None:
        """Raises a ValueError if a concrete ``value`` is not strictly increasing along
        ``axis``; does nothing for a traced one (under ``jit`` / ``vmap``), whose ties give
        originals of ``-inf`` and decreases NaN.

        ``batch_axes`` leading axes of ``value`` are a stack (the core passes the registered
        stack's), and ``axis`` counts the axes of each tensor without them, as in
        :func:`ordered`.
        """
        batch_axes = numerics.option_int(_OWNER, "batch_axes", batch_axes)
        if not 0 <= batch_axes <= value.ndim:
            raise ValueError(
                f"{_OWNER}: batch_axes={batch_axes} for an array of shape {list(value.shape)}; "
                f"it must be between 0 and {value.ndim}."
            )
        event = jax.ShapeDtypeStruct(value.shape[batch_axes:], value.dtype)
        axis = batch_axes + _check(event, self.axis)
        if not _concrete(value):
            return
        steps = jnp.diff(value.astype(numerics.compute_dtype(value.dtype)), axis=axis)
        if not bool(jnp.all(steps > 0)):
            raise ValueError(
                f"{_OWNER} needs values strictly increasing along axis {self.axis}, but the "
                f"value has a step of {float(jnp.min(steps)):g}. The nearest non-decreasing "
                f"value has ties, which the strictly increasing set excludes. Assign an "
                f"increasing value (e.g. `jnp.sort(x, axis)` with distinct entries)."
            )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """Sorted independent standard normals along ``axis`` (the order statistics of ``d``
        N(0, 1) draws); every other axis of ``shape`` is a batch. A tie after rounding (only
        plausible in bfloat16) is broken by moving the later entry up to the next number."""
        dtype = jnp.dtype(dtype)
        shape = tuple(shape)
        numerics.check_dtype(jnp.zeros((), dtype), _OWNER, complex_ok=False)
        axis = numerics.normalize_axis(self.axis, len(shape), hint=f"({_OWNER}: axis)")
        g = jax.random.normal(key, shape, numerics.compute_dtype(dtype))
        s = jnp.moveaxis(jnp.sort(g, axis=axis).astype(dtype), axis, 0)

        def step(prev: jax.Array, cur: jax.Array) -> tuple[jax.Array, jax.Array]:
            nxt = jnp.maximum(cur, jnp.nextafter(prev, jnp.asarray(jnp.inf, dtype)))
            return nxt, nxt

        _, rest = jax.lax.scan(step, s[0], s[1:])
        return jnp.moveaxis(jnp.concatenate([s[:1], rest], axis=0), 0, axis)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest value that is non-decreasing along ``axis``
        (the isotonic regression), per matrix in the last two axes; ``O(d²)`` work per vector of
        ``d`` entries."""
        axis = _check(x, self.axis)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        d = xc - isotonic_regression(xc, axis)
        return jnp.sqrt(jnp.sum(d**2, axis=_event_axes(x)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether every step along ``axis`` is ``>= -atol`` (the closed, non-decreasing set;
        default ``10·d·eps`` times the largest entry, at least 1), per matrix in the last two
        axes."""
        axis = _check(x, self.axis)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        if atol is None:
            scale = jnp.maximum(jnp.max(jnp.abs(xc)), 1)
            atol = 10 * x.shape[axis] * float(jnp.finfo(x.dtype).eps) * scale
        steps = jnp.diff(xc, axis=axis)
        return jnp.all(steps >= -atol, axis=_event_axes(x))

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "ordered"
    torch_function_positional = ()
    torch_function_keyword = ("axis", "map")
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` strictly increasing along an axis, in place.

    Registers :class:`paramx.constraints.Ordered`: the original (an ``nnx.Param``) holds a first
    entry and
    the increments before ``softplus`` (or ``exp``), and the value is their cumulative sum.
    Registration and assignment keep a strictly increasing value exactly. They run compiled, so
    they cannot refuse another value: a tie gives an original of ``-inf`` and a decrease NaN;
    check first with ``paramx.constraints.Ordered(axis).check_value(x)``.

    Args:
      module: The module.
      name: The attribute to constrain.
      axis: The axis along which entries increase.
      map: The increment map, ``"softplus"`` or ``"exp"``.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> layer.kernel = nnx.Param(jnp.array([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.7]]))
      >>> layer = pnx.ordered(layer)
      >>> bool(jnp.all(jnp.diff(layer.kernel, axis=-1) > 0))
      True
    """


def ordered(
    tree: Any, where: Any, *, axis: int = -1, map: str = "softplus", batch_axes: int = 0
) -> Any:
    """Registers :class:`paramx.constraints.Ordered`: the selected tensors increase strictly
    along ``axis``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      axis: The axis along which entries increase, counted without the ``batch_axes``.
      map: The increment map, ``"softplus"`` (default) or ``"exp"``.
      batch_axes: How many leading axes index a stack of independent tensors. See
        :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not strictly increasing along ``axis`` (concrete
        values only).
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.ordered import ordered
      >>> tree = ordered({"knots": jnp.array([[0.0, 0.5], [1.0, 3.0]])}, "knots", axis=0)
      >>> px.materialize(tree)["knots"]
      Array([[0. , 0.5],
             [1. , 3. ]], dtype=float32)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Ordered(axis, map), batch_axes=batch_axes)
