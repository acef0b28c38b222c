"""`sphere`: tensors (or slices of them) of Euclidean norm ``radius``.

``forward(x) = radius · x / ‖x‖``, where the norm is taken over the whole tensor
(``axis=None``, the default) or, for each slice, over the axes ``axis`` names (an int or a
tuple of ints): the latter is "unit-norm rows / columns along any axis". On a Flax Dense kernel
``(in, out)``, ``axis=None`` makes the whole kernel one vector of norm ``radius``; ``axis=0``
gives each output unit's weight vector (a column) norm ``radius`` (what geotorch's ``sphere``
does to the rows of a torch ``Linear`` weight ``(out, in)``, whose last axis is ``in``);
``axis=-1`` normalizes each input's fan-out (a row). On a conv kernel ``(*spatial, in, out)``,
``axis=(0, ..., ndim - 2)`` (all but the last) gives each output channel's filter norm
``radius``. geotorch's ``Sphere`` normalizes the last axis of a ``(*, n)`` tensor; paramx's
``axis=-1`` is that convention on the Flax-layout tensor.

At ``x = 0`` the direction is undefined and no choice has a finite, continuous gradient:
``forward`` returns the fallback point ``radius · e₁`` (the first entry of the slice equal to
``radius``, the rest zero) with a zero gradient, never NaN. The norm is computed after dividing
by the largest magnitude of the slice, so slices whose squares would underflow or overflow
keep their direction. ``right_inverse`` is the nearest point ``radius · x / ‖x‖`` (exact on
the sphere); at ``x = 0`` every point of the sphere is equally near, so a zero slice is refused
with a ValueError naming the path when the value is concrete (``check_value``, which the core
runs eagerly before it traces anything, passing a stack's ``batch_axes``: also for a stack
registered with ``batch_axes`` and for ``paramx.nnx``'s compiled registration). Inside a user's
own ``jax.jit`` / ``vmap`` a zero slice maps to the fallback point.
bfloat16 and float16 tensors are normalized in float32 and rounded back.

Batches in ``sample`` / ``in_manifold`` / ``distance``. These see a tensor with leading batch
axes but not how many; ``batch_axes=k`` says so. By default, with ``axis=None`` all axes but the
last two are a batch (geotorch's ``(*, n, k)`` convention: a Dense kernel is one vector, a conv
kernel one vector per spatial tap; pass ``batch_axes=0`` for a whole conv kernel), and with an
explicit ``axis`` none is (negative axes then work with any leading batch).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics

_OWNER = "Sphere"


def _option_radius(value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool | jax.Array):
        raise TypeError(
            f"{_OWNER}: radius must be a positive real number; got {value!r} "
            f"({type(value).__name__}). Pass a Python float such as radius=1.0."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{_OWNER}: radius must be positive and finite; got radius={value}. It is the norm "
            f"every vector takes; the default is 1.0."
        )
    return value


def _option_axis(value: Any) -> int | tuple[int, ...] | None:
    if value is None:
        return None

    def is_int(a: Any) -> bool:
        return isinstance(a, numbers.Integral) and not isinstance(a, bool | jax.Array)

    if is_int(value):
        return int(value)
    if isinstance(value, tuple | list) and all(is_int(a) for a in value):
        if not value:
            raise ValueError(
                f"{_OWNER}: axis=() normalizes over no axis (each entry would become ±radius). "
                f"Pass axis=None for the whole tensor, or the axes of each vector."
            )
        return tuple(int(a) for a in value)
    raise TypeError(
        f"{_OWNER}: axis must be None (the whole tensor is one vector), an int, or a tuple of "
        f"ints (the axes of each vector); got {value!r} ({type(value).__name__})."
    )


def _real_sq(x: jax.Array) -> jax.Array:
    return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x


@dataclasses.dataclass(frozen=True)
class Sphere:
    """Vectors of norm ``radius``; register it with :func:`sphere`.

    Attributes:
      radius: The norm of every vector (a positive, finite float; default 1.0).
      axis: ``None`` (default): the whole tensor is one vector. An int or a tuple of ints: the
        axes of each vector; every slice along the other axes is normalized on its own
        (``axis=0`` on a Dense kernel ``(in, out)``: each output unit's weights).
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.sphere import Sphere
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])}, "kernel", Sphere(axis=0))
      >>> px.materialize(tree)["kernel"]
      Array([[0.6, 0. ],
             [0.8, 1. ]], dtype=float32)
    """

    radius: float = 1.0
    axis: int | tuple[int, ...] | None = None
    name: str = "sphere"

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", _option_radius(self.radius))
        object.__setattr__(self, "axis", _option_axis(self.axis))
        numerics.option_name(_OWNER, self.name)

    # ----- helpers ------------------------------------------------------------------------
    def _axes(self, ndim: int, batch_axes: int = 0) -> tuple[int, ...]:
        """The normalized axes of each vector, in an array of ``ndim`` axes whose first
        ``batch_axes`` are a batch."""
        event = ndim - batch_axes
        if self.axis is None:
            return tuple(range(batch_axes, ndim))
        raw = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        hint = f"{_OWNER}(axis={self.axis!r}) on a tensor of {event} axes."
        axes = tuple(batch_axes + numerics.normalize_axis(a, event, hint) for a in raw)
        if len(set(axes)) != len(axes):
            raise ValueError(
                f"{_OWNER}: axis={self.axis!r} names an axis twice for a tensor of {event} axes. "
                f"Name each axis once."
            )
        return axes

    def _event_axes(self, x: jax.Array, batch_axes: int | None) -> tuple[int, ...]:
        if batch_axes is None:
            batch_axes = max(x.ndim - 2, 0) if self.axis is None else 0
        batch_axes = numerics.option_int(_OWNER, "batch_axes", batch_axes)
        if not 0 <= batch_axes <= x.ndim:
            raise ValueError(
                f"{_OWNER}: batch_axes={batch_axes} for an array of shape {list(x.shape)}; it "
                f"must be between 0 and {x.ndim}."
            )
        return self._axes(x.ndim, batch_axes)

    def _norm(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        """The norm of each slice (kept dims), in the compute dtype, robust to tiny entries."""
        xc = x.astype(numerics.compute_dtype(x.dtype))
        m = jnp.max(jnp.abs(xc), axis=axes, keepdims=True)
        safe_m = jnp.where(m > 0, m, 1)
        u = xc / safe_m.astype(xc.dtype)
        return m * jnp.sqrt(jnp.sum(_real_sq(u), axis=axes, keepdims=True))

    def _project(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        xc = x.astype(numerics.compute_dtype(x.dtype))
        # Dividing by the (constant) largest magnitude does not change the direction, and keeps
        # the sum of squares in range; at a zero slice both `where`s keep gradients finite.
        m = jax.lax.stop_gradient(jnp.max(jnp.abs(xc), axis=axes, keepdims=True))
        nonzero = m > 0
        u = xc / jnp.where(nonzero, m, 1).astype(xc.dtype)
        sq = jnp.sum(_real_sq(u), axis=axes, keepdims=True)
        n = jnp.sqrt(jnp.where(nonzero, sq, 1))
        first = jnp.ones(x.shape, bool)
        for a in axes:
            first = first & (jax.lax.broadcasted_iota(jnp.int32, x.shape, a) == 0)
        fallback = first.astype(xc.dtype)
        radius = jnp.asarray(self.radius, n.dtype)
        y = jnp.where(
            nonzero, u * (radius / n).astype(xc.dtype), fallback * radius.astype(xc.dtype)
        )
        return y.astype(x.dtype)

    # ----- the parametrization ------------------------------------------------------------
    def forward(self, x: jax.Array) -> jax.Array:
        numerics.check_dtype(x, _OWNER)
        return self._project(x, self._axes(x.ndim))

    def right_inverse(self, value: jax.Array) -> jax.Array:
        """The nearest point ``radius · x / ‖x‖`` of each slice (exact on the sphere).

        Raises:
          ValueError: If a slice is zero (every point is equally near) and the value is
            concrete. Under ``jit`` / ``vmap`` a zero slice maps to ``radius · e₁``.
        """
        numerics.check_dtype(value, _OWNER)
        axes = self._axes(value.ndim)
        self.check_value(value, batch_axes=0)  # one tensor here: its slices are known exactly
        return self._project(value, axes)

    def check_value(self, value: jax.Array, *, batch_axes: int | None = None) -> None:
        """Raises a ValueError if a concrete ``value`` has a zero vector (every point of the
        sphere is equally near it); does nothing for a traced one (under ``jit`` / ``vmap``),
        where a zero vector maps to ``radius · e₁``.

        The core runs it before it traces anything (also for stacks and ``paramx.nnx``) with
        the stack's ``batch_axes``, so every slice of every tensor is checked.
        ``batch_axes=None`` (a value whose stack axes are unknown) checks what holds whatever the
        stack: each slice when every axis of ``axis`` is negative, and otherwise (``axis=None``,
        or non-negative axes) only that the value is not zero as a whole.
        """
        numerics.check_dtype(value, _OWNER)
        if isinstance(value, jax.core.Tracer | jax.ShapeDtypeStruct):
            return
        if batch_axes is not None:
            axes = self._axes(value.ndim, batch_axes)
        elif isinstance(self.axis, int | tuple) and all(
            a < 0 for a in (self.axis if isinstance(self.axis, tuple) else (self.axis,))
        ):
            axes = self._axes(value.ndim)
        else:
            axes = tuple(range(value.ndim))
        zero = jnp.max(jnp.abs(value), axis=axes, initial=0) == 0
        if bool(jnp.any(zero)):
            what = (
                "the whole tensor is zero"
                if self.axis is None
                else f"{int(jnp.sum(zero))} slice(s) along axis={self.axis!r} are zero"
            )
            raise ValueError(
                f"{_OWNER} cannot project a zero vector onto the sphere: every point of it is "
                f"equally near ({what}; shape {list(value.shape)}). Assign a non-zero value, "
                f"or initialize with `paramx.sampler({_OWNER}(...))`."
            )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(
        self,
        key: jax.Array,
        shape: Any,
        dtype: Any = jnp.float32,
        *,
        batch_axes: int | None = None,
    ) -> jax.Array:
        """Uniform on the sphere: a standard normal tensor (complex normal for complex dtypes)
        normalized per vector, which is rotation invariant.

        ``batch_axes`` leading axes of ``shape`` are a batch. By default (``None``), with
        ``axis=None`` every axis but the last two is a batch (geotorch's ``(*, n, k)``
        convention; a 1-D shape is one vector), and with an explicit ``axis`` none is (use
        negative axes so that a leading batch does not shift them); pass ``batch_axes=0``
        to draw one conv kernel with ``axis=None``. The same rule holds for
        :meth:`in_manifold` and :meth:`distance`.
        """
        dtype = jnp.dtype(dtype)
        numerics.check_dtype(jnp.zeros((), dtype), _OWNER)
        g = jax.random.normal(key, tuple(shape), numerics.compute_dtype(dtype))
        return self._project(g, self._event_axes(g, batch_axes)).astype(dtype)

    def distance(self, x: jax.Array, *, batch_axes: int | None = None) -> jax.Array:
        """``|‖x‖ − radius|`` per vector: the Euclidean distance to the sphere (``radius`` at
        0). Batch axes as in :meth:`sample`."""
        numerics.check_dtype(x, _OWNER)
        return self._distance(x, self._event_axes(x, batch_axes))

    def _distance(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        return jnp.abs(jnp.squeeze(self._norm(x, axes), axis=axes) - self.radius)

    def in_manifold(
        self, x: jax.Array, atol: float | None = None, *, batch_axes: int | None = None
    ) -> jax.Array:
        """Whether each vector's norm is ``radius`` to ``atol`` (default ``10·√d·eps·radius``
        for vectors of ``d`` entries); one bool per vector. Batch axes as in :meth:`sample`."""
        numerics.check_dtype(x, _OWNER)
        axes = self._event_axes(x, batch_axes)
        if atol is None:
            d = math.prod(x.shape[a] for a in axes)
            atol = 10 * math.sqrt(max(d, 1)) * float(jnp.finfo(x.dtype).eps) * self.radius
        return self._distance(x, axes) <= atol

    def health(
        self, value: jax.Array, inputs: Any, *, params: Any, state: Any
    ) -> dict[str, jax.Array]:
        """Health figure for :func:`paramx.table`: ``distance``, the largest ``|‖x‖ − radius|``
        over the vectors of the one tensor ``forward`` returned (a stack's tensors are passed
        one at a time), with ``axis`` read as ``forward`` reads it: no batch axes, so a conv
        kernel with ``axis=None`` is one vector, not one per spatial tap."""
        return {"distance": jnp.max(self.distance(value, batch_axes=0), initial=0.0)}

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "sphere"
    torch_function_positional = ("radius",)
    torch_function_keyword = ("axis",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a vector of norm ``radius`` (or each slice), in place.

    Registers ``Sphere``: the value is ``radius · x / ‖x‖`` of the original, over the whole
    tensor (``axis=None``) or over ``axis`` for each slice (``axis=0`` on an ``nnx.Linear``
    kernel ``(in, out)``: each output unit's weights). Registration and assignment replace a
    value by its nearest point on the sphere; a zero value is refused.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      radius: The norm (default 1.0).
      axis: ``None`` (the whole tensor), an int, or a tuple of ints.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.sphere(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), axis=0)
      >>> bool(jnp.allclose(jnp.linalg.norm(layer.kernel, axis=0), 1.0))
      True
    """


def sphere(
    tree: Any,
    where: Any,
    radius: float = 1.0,
    *,
    axis: int | tuple[int, ...] | None = None,
    batch_axes: int = 0,
) -> Any:
    """Registers :class:`Sphere`: the selected tensors (or their slices) get norm ``radius``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      radius: The norm (a positive, finite float; default 1.0).
      axis: ``None`` (default): the whole tensor is one vector. An int or a tuple of ints: the
        axes of each vector, counted in the tensor without its ``batch_axes``.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor (or slice) is zero, or ``axis`` repeats an axis.
      IndexError: If ``axis`` is out of range for a selected tensor.
      TypeError: If it is an integer or boolean tensor, or an option has the wrong type.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.sphere import sphere
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 3))
      >>> k = px.materialize(sphere({"kernel": kernel}, "kernel", 2.0))["kernel"]
      >>> round(float(jnp.linalg.norm(k)), 5)
      2.0
      >>> cols = px.materialize(sphere({"kernel": kernel}, "kernel", axis=0))["kernel"]
      >>> bool(jnp.allclose(jnp.linalg.norm(cols, axis=0), 1.0))
      True
    """
    from paramx._src.core.register import register_parametrization

    p = Sphere(radius, axis)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)
