"""`simplex`: entries >= 0 summing to 1 along an axis (probability vectors, mixture weights).

The value is ``softmax(x, axis)`` of an unconstrained original ``x``. On a Flax Dense kernel
(in, out) with the default ``axis=-1`` each row (one input feature) is a distribution over the
outputs, so the kernel is row-stochastic; ``axis=-2`` makes each output's column of weights a
distribution over the inputs. On a conv kernel (*spatial, in, out) the same holds for every
spatial tap.

``right_inverse`` returns logs. The softmax forgets an additive constant along ``axis``; paramx
picks the original whose entries have zero mean along ``axis``. A value off the simplex is first
replaced by its nearest point on the simplex in the Euclidean norm (per vector along ``axis``),
by the sort-based projection: ``max(y − τ, 0)`` with the one threshold ``τ`` that makes the
entries sum to 1. A projected point may lie on the boundary, with exact zeros whose log is
``−inf``; paramx floors every entry at the dtype's machine epsilon (of float32 for narrower
floats) before the log, so the originals are always finite and gradients never NaN, and such an
entry comes back as about ``eps`` instead of 0 (within the dtype's tolerance; the softmax
gradient there is small, ``≈ eps``, as it must be near the boundary).

Membership and distance are taken per matrix in the last two axes (per vector for a 1-D
tensor): ``in_manifold`` gives one bool each and ``distance`` the Frobenius distance to the
nearest matrix of distributions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics

_OWNER = "Simplex"


def _event_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(-min(x.ndim, 2), 0))


def _check(x: jax.Array, axis: int) -> int:
    numerics.check_dtype(x, _OWNER, complex_ok=False)
    if x.ndim == 0:
        raise ValueError(
            f"{_OWNER} needs at least one axis to sum over; got a scalar. Register it on a "
            f"vector or a kernel."
        )
    return numerics.normalize_axis(axis, x.ndim, hint=f"({_OWNER}: axis={axis})")


def project_to_simplex(y: jax.Array, axis: int = -1) -> jax.Array:
    """The Euclidean projection of each vector along ``axis`` onto the probability simplex.

    Sorts each vector in decreasing order ``u``, finds the largest ``k`` with
    ``u_k > (u_1 + … + u_k − 1)/k``, sets ``τ = (u_1 + … + u_k − 1)/k`` and returns
    ``max(y − τ, 0)``: the unique point of the simplex nearest to ``y`` (its KKT conditions hold).
    Computed in ``y``'s dtype; no gradient flows through the sort's choice of ``k``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from paramx._src.parametrizations.simplex import project_to_simplex
      >>> project_to_simplex(jnp.array([0.5, 1.5, -1.0]))
      Array([0., 1., 0.], dtype=float32)
    """
    y = jnp.moveaxis(y, axis, -1)
    n = y.shape[-1]
    u = -jnp.sort(-y, axis=-1)
    css = jnp.cumsum(u, axis=-1) - 1
    k = jnp.arange(1, n + 1, dtype=y.dtype).reshape((1,) * (y.ndim - 1) + (n,))
    support = u - css / k > 0
    rho = jnp.sum(support, axis=-1, keepdims=True)  # >= 1 always: u_1 − (u_1 − 1) = 1 > 0
    tau = jnp.take_along_axis(css, rho - 1, axis=-1) / rho.astype(y.dtype)
    return jnp.moveaxis(jnp.maximum(y - tau, 0), -1, axis)


@dataclasses.dataclass(frozen=True)
class Simplex:
    """Entries ``>= 0`` summing to 1 along ``axis``: the value is ``softmax(x, axis)``.

    ``right_inverse`` gives the zero-mean logs of a value on the simplex (exact: the softmax of
    them is the value), and first projects a value off the simplex onto its nearest point
    (Euclidean, per vector). Zeros of a projected point are floored at ``eps`` (see the module
    docstring): the original stays finite.

    Attributes:
      axis: The axis whose entries sum to 1 (``-1``: each row of a Dense kernel (in, out)).
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.simplex import Simplex
      >>> tree = px.register_parametrization(
      ...     {"w": jnp.array([[0.2, 0.3, 0.5], [1.0, 1.0, 0.0]])}, "w", Simplex())
      >>> w = px.materialize(tree)["w"]
      >>> bool(jnp.allclose(w, jnp.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]]), atol=1e-6))
      True
    """

    axis: int = -1
    name: str = "simplex"

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", numerics.option_int(_OWNER, "axis", self.axis))
        numerics.option_name(_OWNER, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        axis = _check(x, self.axis)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        return jax.nn.softmax(xc, axis=axis).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        axis = _check(value, self.axis)
        cdt = numerics.compute_dtype(value.dtype)
        p = project_to_simplex(value.astype(cdt), axis)
        logs = jnp.log(jnp.maximum(p, jnp.finfo(cdt).eps))
        return (logs - jnp.mean(logs, axis=axis, keepdims=True)).astype(value.dtype)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """Uniform on the simplex along ``axis``, Dirichlet(1, …, 1): normalized independent
        Exponential(1) draws. Each entry is Beta(1, d − 1) for ``d`` entries along ``axis``
        (mean ``1/d``); every other axis of ``shape`` is a batch."""
        dtype = jnp.dtype(dtype)
        shape = tuple(shape)
        numerics.check_dtype(jnp.zeros((), dtype), _OWNER, complex_ok=False)
        axis = numerics.normalize_axis(self.axis, len(shape), hint=f"({_OWNER}: axis)")
        e = jax.random.exponential(key, shape, numerics.compute_dtype(dtype))
        return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest point whose vectors along ``axis`` are all on
        the simplex, per matrix in the last two axes."""
        axis = _check(x, self.axis)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        d = xc - project_to_simplex(xc, axis)
        return jnp.sqrt(jnp.sum(d**2, axis=_event_axes(x)))

    def in_manifold(self, x: jax.Array, atol: float | None = None) -> jax.Array:
        """Whether every entry is ``>= -atol`` and every sum along ``axis`` is within ``atol`` of
        1 (default ``10·d·eps`` for ``d`` entries along ``axis``), per matrix in the last two
        axes."""
        axis = _check(x, self.axis)
        if atol is None:
            atol = 10 * x.shape[axis] * float(jnp.finfo(x.dtype).eps)
        xc = x.astype(numerics.compute_dtype(x.dtype))
        sums_ok = jnp.abs(jnp.sum(xc, axis=axis, keepdims=True) - 1) <= atol
        ok = (xc >= -atol) & sums_ok
        return jnp.all(ok, axis=_event_axes(x))

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "simplex"
    torch_function_positional = ()
    torch_function_keyword = ("axis",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` sum to 1 along an axis with entries ``>= 0``, in place.

    Registers :class:`paramx.constraints.Simplex`: the original (an ``nnx.Param``) holds logits
    and the value
    is their softmax along ``axis``. Registration and assignment keep a value on the simplex
    exactly and replace any other value by its nearest point on the simplex.

    Args:
      module: The module (``nnx.Linear``, ...).
      name: The attribute to constrain.
      axis: The axis whose entries sum to 1 (``-1``: each row of the kernel).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.simplex(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
      >>> bool(jnp.allclose(layer.kernel.sum(-1), 1)), bool(jnp.all(layer.kernel >= 0))
      (True, True)
    """


def simplex(tree: Any, where: Any, *, axis: int = -1, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.Simplex`: the selected tensors sum to 1 along ``axis``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      axis: The axis whose entries sum to 1, counted without the ``batch_axes``.
      batch_axes: How many leading axes index a stack of independent tensors. See
        :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      IndexError: If ``axis`` is out of range for a selected tensor.
      TypeError: If a selected tensor is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.simplex import simplex
      >>> tree = simplex({"mix": jnp.array([0.5, 1.5, -1.0])}, "mix")
      >>> bool(jnp.allclose(px.materialize(tree)["mix"], jnp.array([0.0, 1.0, 0.0]), atol=1e-6))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Simplex(axis), batch_axes=batch_axes)
