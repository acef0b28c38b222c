"""`positive` and `interval`: elementwise bounds, for scales, rates and probabilities.

``Positive`` makes every entry strictly positive: the value is ``softplus(x)`` (the default) or
``exp(x)`` of an unconstrained original ``x``. ``Interval(low, high)`` puts every entry strictly
between two finite bounds: the value is ``low + (high - low) * sigmoid(x)``. Both act entry by
entry, so on a Flax Dense kernel (in, out) every weight is bounded, and on a conv kernel
(*spatial, in, out) every tap of every channel pair is; a bias or a scale vector works the same.

``right_inverse`` is the exact inverse of the map (a numerically stable inverse softplus, the
log, the logit). A value outside the open set has no nearest point inside it (the boundary is
not in the set), so registration and assignment refuse it with a ValueError naming the path when
the value is concrete (``check_value``, which the core runs eagerly before it traces anything:
also for a stack registered with ``batch_axes > 0`` and for ``paramx.nnx``'s compiled
registration and assignment). Only inside a user's own ``jax.jit`` is the value a tracer and the
check cannot run: an entry on or outside the boundary then gives a non-finite original (``-inf``,
``+inf`` or NaN) instead of an error.

Membership and distance are taken per matrix in the last two axes (per vector for a 1-D tensor,
the whole tensor for a scalar): ``in_manifold`` gives one bool each and ``distance`` the
Euclidean distance to the closed set (``‖max(0, −x)‖`` for ``positive``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics

_MAPS = ("softplus", "exp")
_INTERVAL_MAPS = ("sigmoid",)


def _concrete(x: Any) -> bool:
    return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


def _event_axes(x: jax.Array) -> tuple[int, ...]:
    """The axes one membership / distance result covers: the last two (a matrix), or fewer."""
    return tuple(range(-min(x.ndim, 2), 0))


def softplus_inverse(y: jax.Array) -> jax.Array:
    """``log(exp(y) - 1)`` for ``y > 0``, written ``y + log(-expm1(-y))``.

    The form never overflows (``exp(-y) <= 1``), is ``y`` to rounding for large ``y``, and is
    ``log(y)`` to relative accuracy near 0 (``expm1`` keeps the small difference exact).
    """
    return y + jnp.log(-jnp.expm1(-y))


def _check_option(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{owner}: {name} must be one of {list(allowed)}; got {value!r}. "
            f"The default is {allowed[0]!r}."
        )
    return value


def _finite_float(owner: str, name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool | jax.Array):
        raise TypeError(
            f"{owner}: {name} must be a real number (a Python float or int); got {value!r} "
            f"({type(value).__name__})."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"{owner}: {name} must be finite; got {name}={value}. For a one-sided bound use "
            f"Positive (x > 0), shifted or negated by the model."
        )
    return value


def _default_atol(x: jax.Array) -> jax.Array:
    scale = jnp.maximum(jnp.max(jnp.abs(x.astype(numerics.compute_dtype(x.dtype)))), 1)
    return 10 * float(jnp.finfo(x.dtype).eps) * scale


@dataclasses.dataclass(frozen=True)
class Positive:
    """Every entry strictly positive: the value is ``softplus(x)`` or ``exp(x)``.

    On a Dense kernel (in, out), a conv kernel (*spatial, in, out) or a bias, each entry is
    positive. ``right_inverse`` is the exact inverse (``log(expm1(y))`` in a stable form, or
    ``log(y)``); a value with an entry ``<= 0`` is refused (see the module docstring for what
    happens under ``jit``). ``softplus`` grows linearly, so gradients stay of order one for large
    values; ``exp`` makes the original a log-scale.

    Attributes:
      map: ``"softplus"`` (default) or ``"exp"``.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.positive import Positive
      >>> tree = px.register_parametrization({"scale": jnp.array([0.5, 2.0])}, "scale", Positive())
      >>> px.materialize(tree)["scale"].round(5)
      Array([0.5, 2. ], dtype=float32)
      >>> tree["scale"].originals[0].round(4)  # log(expm1(y))
      Array([-0.4328,  1.8546], dtype=float32)
    """

    map: str = "softplus"
    name: str = "positive"

    def __post_init__(self) -> None:
        _check_option("Positive", "map", self.map, _MAPS)
        numerics.option_name("Positive", self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        numerics.check_dtype(x, "Positive", complex_ok=False)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        y = jax.nn.softplus(xc) if self.map == "softplus" else jnp.exp(xc)
        return y.astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        numerics.check_dtype(value, "Positive", complex_ok=False)
        self.check_value(value)
        y = value.astype(numerics.compute_dtype(value.dtype))
        x = softplus_inverse(y) if self.map == "softplus" else jnp.log(y)
        return x.astype(value.dtype)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` has an entry ``<= 0``; does nothing for
        a traced one (under ``jit`` / ``vmap``), whose bad entries give non-finite originals."""
        if _concrete(value) and not bool(jnp.all(value > 0)):
            bad = float(jnp.min(value))
            raise ValueError(
                f"Positive needs every entry > 0, but the value has an entry {bad:g}; a value "
                f"outside the open set has no nearest point inside it. Assign a positive value "
                f"(e.g. `jnp.maximum(x, 1e-3)` or `jnp.abs(x) + 1e-3`)."
            )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """Independent Exponential(1) entries (mean 1, variance 1), floored at the dtype's
        smallest normal number so that no entry is 0; every axis of ``shape`` is a batch."""
        dtype = jnp.dtype(dtype)
        numerics.check_dtype(jnp.zeros((), dtype), "Positive", complex_ok=False)
        e = jax.random.exponential(key, tuple(shape), numerics.compute_dtype(dtype)).astype(dtype)
        return jnp.maximum(e, jnp.asarray(jnp.finfo(dtype).tiny, dtype))

    def distance(self, x: jax.Array) -> jax.Array:
        """The Euclidean distance to the closed set ``x >= 0``, ``‖max(0, −x)‖``, per matrix in
        the last two axes."""
        xc = x.astype(numerics.compute_dtype(x.dtype))
        return jnp.sqrt(jnp.sum(jnp.maximum(-xc, 0) ** 2, axis=_event_axes(x)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether every entry is ``>= -atol`` (default ``10·eps`` times the largest entry, at
        least ``10·eps``), per matrix in the last two axes. A softplus or exp that underflows
        gives exactly 0, which counts as in the set."""
        if atol is None:
            atol = _default_atol(x)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        return jnp.all(xc >= -atol, axis=_event_axes(x))

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "positive"
    torch_function_positional = ("map",)
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes every entry of ``module.<name>`` positive, in place.

    Registers :class:`paramx.constraints.Positive`: the original (an ``nnx.Param``) is
    unconstrained and the
    value is ``softplus`` (default) or ``exp`` of it. Registration and assignment keep a
    positive value exactly. They run compiled, so they cannot refuse an entry ``<= 0``: such an
    entry gives an original of ``-inf`` (value 0) or NaN; check first with
    ``paramx.constraints.Positive().check_value(x)``.

    Args:
      module: The module (``nnx.Linear``, ``nnx.LayerNorm``, ...).
      name: The attribute to constrain.
      map: ``"softplus"`` or ``"exp"``.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.positive(nnx.LayerNorm(3, rngs=nnx.Rngs(0)), "scale")
      >>> bool(jnp.all(layer.scale > 0))
      True
    """


def positive(tree: Any, where: Any, map: str = "softplus", *, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.Positive`: every entry of the selected tensors
    becomes positive.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      map: ``"softplus"`` (default) or ``"exp"``.
      batch_axes: How many leading axes index a stack of independent tensors. See
        :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor has an entry ``<= 0`` (concrete values only).
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.positive import positive
      >>> tree = positive({"fc": {"kernel": jnp.full((2, 3), 0.1)}}, "fc/kernel", "exp")
      >>> bool(jnp.allclose(px.materialize(tree)["fc"]["kernel"], 0.1))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Positive(map), batch_axes=batch_axes)


@dataclasses.dataclass(frozen=True)
class Interval:
    """Every entry strictly between ``low`` and ``high``: ``low + (high − low)·sigmoid(x)``.

    On a Dense kernel (in, out), a conv kernel (*spatial, in, out) or a bias, each entry lies in
    ``(low, high)``. ``right_inverse`` is the exact inverse, the logit of ``(y − low)/(high −
    low)``; a value with an entry on or outside a bound is refused (see the module docstring for
    what happens under ``jit``).

    Attributes:
      low: The lower bound, a finite real number.
      high: The upper bound, finite and greater than ``low``.
      map: ``"sigmoid"`` (the only map).
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.positive import Interval
      >>> p = Interval(-1.0, 1.0)
      >>> tree = px.register_parametrization({"w": jnp.array([-0.5, 0.0, 0.9])}, "w", p)
      >>> px.materialize(tree)["w"].round(5)
      Array([-0.5,  0. ,  0.9], dtype=float32)
    """

    low: float
    high: float
    map: str = "sigmoid"
    name: str = "interval"

    def __post_init__(self) -> None:
        low = _finite_float("Interval", "low", self.low)
        high = _finite_float("Interval", "high", self.high)
        if not low < high:
            raise ValueError(
                f"Interval needs low < high; got low={low}, high={high}. Swap them or widen the "
                f"interval."
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        _check_option("Interval", "map", self.map, _INTERVAL_MAPS)
        numerics.option_name("Interval", self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        numerics.check_dtype(x, "Interval", complex_ok=False)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        # Measured from the nearer bound: low + w sigmoid(x) rounds to within an ulp of |low|
        # near high (a narrow interval far from 0 would lose every digit there).
        width = self.high - self.low
        y = jnp.where(
            xc < 0, self.low + width * jax.nn.sigmoid(xc), self.high - width * jax.nn.sigmoid(-xc)
        )
        return y.astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        numerics.check_dtype(value, "Interval", complex_ok=False)
        self.check_value(value)
        y = value.astype(numerics.compute_dtype(value.dtype))
        # logit((y - low) / (high - low)) from the distances to both bounds: the ratio itself
        # rounds to exactly 1 near high in a narrow interval (an infinite original).
        return (jnp.log(y - self.low) - jnp.log(self.high - y)).astype(value.dtype)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` has an entry on or outside a bound; does
        nothing for a traced one (under ``jit`` / ``vmap``), whose bad entries give non-finite
        originals."""
        if _concrete(value) and not bool(jnp.all((value > self.low) & (value < self.high))):
            lo, hi = float(jnp.min(value)), float(jnp.max(value))
            raise ValueError(
                f"Interval needs every entry strictly inside ({self.low:g}, {self.high:g}), but "
                f"the value ranges over [{lo:g}, {hi:g}]; a value outside the open interval has "
                f"no nearest point inside it. Assign a value inside the bounds (e.g. "
                f"`jnp.clip(x, low + margin, high - margin)`)."
            )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """Independent entries uniform on ``(low, high)`` (mean ``(low + high)/2``, variance
        ``(high − low)²/12``); a draw that rounds onto a bound is moved to the nearest number
        inside. Every axis of ``shape`` is a batch."""
        dtype = jnp.dtype(dtype)
        numerics.check_dtype(jnp.zeros((), dtype), "Interval", complex_ok=False)
        cdt = numerics.compute_dtype(dtype)
        u = jax.random.uniform(key, tuple(shape), cdt, minval=self.low, maxval=self.high)
        u = u.astype(dtype)
        low, high = jnp.asarray(self.low, dtype), jnp.asarray(self.high, dtype)
        return jnp.clip(u, jnp.nextafter(low, high), jnp.nextafter(high, low))

    def distance(self, x: jax.Array) -> jax.Array:
        """The Euclidean distance to the closed box ``[low, high]``, per matrix in the last two
        axes."""
        xc = x.astype(numerics.compute_dtype(x.dtype))
        gap = jnp.maximum(self.low - xc, 0) + jnp.maximum(xc - self.high, 0)
        return jnp.sqrt(jnp.sum(gap**2, axis=_event_axes(x)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether every entry lies in ``[low − atol, high + atol]`` (default ``10·eps`` times
        the largest magnitude among the entries and bounds, at least ``10·eps``), per matrix in
        the last two axes."""
        if atol is None:
            bound = max(abs(self.low), abs(self.high), 1.0)
            atol = jnp.maximum(_default_atol(x), 10 * float(jnp.finfo(x.dtype).eps) * bound)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        inside = (xc >= self.low - atol) & (xc <= self.high + atol)
        return jnp.all(inside, axis=_event_axes(x))

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "interval"
    torch_function_positional = ()
    torch_function_keyword = ("low", "high")  # keyword-only: ``name`` before them has a default
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Keeps every entry of ``module.<name>`` strictly between two bounds, in place.

    Registers :class:`paramx.constraints.Interval`: the original (an ``nnx.Param``) is
    unconstrained and the
    value is ``low + (high − low)·sigmoid(original)``. Registration and assignment keep a
    value inside the bounds exactly. They run compiled, so they cannot refuse an entry on or
    outside a bound: such an entry gives a non-finite original; check first with
    ``paramx.constraints.Interval(low, high).check_value(x)``.

    Args:
      module: The module (``nnx.Linear``, ...).
      name: The attribute to constrain.
      low: The lower bound (keyword-only).
      high: The upper bound (keyword-only).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> layer = pnx.interval(layer, "kernel", low=-2.0, high=2.0)
      >>> bool(jnp.all(jnp.abs(layer.kernel) < 2))
      True
    """


def interval(tree: Any, where: Any, low: float, high: float, *, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.Interval`: every selected entry lies strictly in
    ``(low, high)``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      low: The lower bound, a finite real number.
      high: The upper bound, finite and greater than ``low``.
      batch_axes: How many leading axes index a stack of independent tensors. See
        :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If ``low >= high``, a bound is not finite, or a selected tensor has an entry
        on or outside a bound (concrete values only).
      TypeError: If a selected tensor is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.positive import interval
      >>> tree = interval({"p": jnp.array([0.25, 0.75])}, "p", 0.0, 1.0)
      >>> px.materialize(tree)["p"].round(5)
      Array([0.25, 0.75], dtype=float32)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Interval(low, high), batch_axes=batch_axes)
