"""`cholesky` and `correlation_cholesky`: lower-triangular factors with a positive diagonal.

``Cholesky`` constrains a square matrix (or a stack of them along leading axes) to be lower
triangular with a positive diagonal, the set of Cholesky factors of positive definite matrices.
The original is a square matrix; ``forward`` keeps its strict lower triangle and puts
``softplus`` of its diagonal on the diagonal, so the entries above the diagonal get no gradient.
``right_inverse`` keeps the strict lower triangle and puts the inverse softplus of the diagonal
on the diagonal: a factor comes back exactly.

``CorrelationCholesky`` constrains a square matrix to be the Cholesky factor of a correlation
matrix: lower triangular, positive diagonal, every row of unit Euclidean norm (so ``L Lᵀ`` has
a unit diagonal). ``forward`` builds the ``Cholesky`` factor of the original and divides each
row by its norm.

Off the set. Both sets are open in the space of lower-triangular matrices, and both are
products of one set per row, so the nearest point in the Frobenius norm is found row by row:
drop the part above the diagonal (the nearest lower-triangular matrix) and, for
``CorrelationCholesky``, divide each row by its norm (the nearest unit vector). That point is
the projection when every diagonal entry is positive; registration and assignment replace a
value by it. When a diagonal entry is zero or negative, no nearest point exists (the infimum
of the distance is reached only on the boundary, outside the set), and a concrete value is
refused with a ValueError naming the path (``check_value``, which the core runs eagerly before
it traces anything: also for a stack registered with ``batch_axes > 0`` and for
``paramx.nnx``'s compiled registration and assignment). Only inside a user's own ``jax.jit`` is
the value a tracer and the check cannot run: there such an entry gives NaN originals.

Layout. On a Flax Dense kernel ``(in, out)`` the constraint reads the lower triangle of the
kernel (torch's ``(out, in)`` weight would hold the upper triangle); on a conv kernel
``(*spatial, in, out)`` with ``in == out`` each spatial tap is one such matrix.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics


def check_square(x: Any, owner: str) -> None:
    """Refuses a non-float tensor, or one that is not square in its last two axes."""
    numerics.check_dtype(
        x, owner, complex_ok=False, hint="Register it on a real-valued kernel instead."
    )
    if len(x.shape) < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{owner} needs a square matrix in the last two axes (or a stack of them); got "
            f"shape {list(x.shape)}. Register it on a square kernel, e.g. a Dense(n) kernel on "
            f"n features."
        )


def is_concrete(x: Any) -> bool:
    """Whether ``x`` holds a value (not a tracer), so a Python check can run on it."""
    return not isinstance(x, jax.core.Tracer)


def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x))``, without overflow."""
    return jnp.logaddexp(x, jnp.zeros((), x.dtype))


def inv_softplus(y: jax.Array) -> jax.Array:
    """The inverse of :func:`softplus` for ``y > 0``, ``y + log(1 − exp(−y))``: no overflow
    for large ``y`` and full relative precision for small ``y``; NaN for ``y <= 0``."""
    safe = jnp.where(y > 0, y, jnp.ones((), y.dtype))
    out = safe + jnp.log(-jnp.expm1(-safe))
    return jnp.where(y > 0, out, jnp.full((), jnp.nan, y.dtype))


def diagonal(x: jax.Array) -> jax.Array:
    return jnp.diagonal(x, axis1=-2, axis2=-1)


def with_diagonal(x: jax.Array, d: jax.Array) -> jax.Array:
    """The strict lower triangle of ``x`` with ``d`` on the diagonal."""
    return jnp.tril(x, -1) + d[..., :, None] * eye_like(x)


def eye_like(x: jax.Array) -> jax.Array:
    """The identity, broadcast to ``x``'s shape (no implicit rank promotion)."""
    return jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)


default_atol = numerics.default_atol
"""``10·n·eps`` times the largest entry of each matrix (at least 1): numerics.default_atol."""


def factor(x: jax.Array) -> jax.Array:
    """The strict lower triangle of ``x`` with ``softplus`` of its diagonal on the diagonal."""
    return with_diagonal(x, softplus(diagonal(x)))


def check_diagonal(value: jax.Array, owner: str) -> None:
    """A ValueError for a concrete ``value`` (matrices in the last two axes, a stack's leading
    axes included) with a diagonal entry ``<= 0`` or NaN; nothing for a traced one."""
    if not is_concrete(value):
        return
    d = diagonal(value)
    if not bool(jnp.all(d > 0)):
        bad = [int(i) for i in jnp.argwhere(~(d > 0).reshape(-1, d.shape[-1]))[:, 1][:4]]
        raise ValueError(
            f"{owner}: the value has a diagonal entry <= 0 (or NaN), at diagonal index "
            f"{sorted(set(bad))}; the set of lower-triangular matrices with a positive diagonal "
            f"is open, so such a value has no nearest point in it. Assign a value with a "
            f"positive diagonal (e.g. the factor times the sign of its diagonal, per column), "
            f"or initialize with `.sample`."
        )


def factor_inverse(value: jax.Array, owner: str) -> jax.Array:
    """The original ``factor`` maps to the lower triangle of ``value``; a ValueError for a
    concrete value with a diagonal entry ``<= 0`` (:func:`check_diagonal`)."""
    check_diagonal(value, owner)
    return with_diagonal(value, inv_softplus(diagonal(value)))


def bartlett(key: jax.Array, shape: Any, dtype: Any) -> jax.Array:
    """The Cholesky factor of a Wishart(I, n) matrix by Bartlett's decomposition: standard
    normal entries below the diagonal and ``sqrt(chi²(n − i))`` at diagonal index ``i``."""
    return _bartlett(key, tuple(shape), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))  # one program when called eagerly (sample)
def _bartlett(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    work = numerics.compute_dtype(dtype)
    n = shape[-1]
    kn, kc = jax.random.split(key)
    g = jax.random.normal(kn, shape, work)
    dof = jnp.arange(n, 0, -1).astype(work)
    chi2 = 2 * jax.random.gamma(kc, dof / 2, shape[:-1], work)
    return with_diagonal(g, jnp.sqrt(chi2)).astype(dtype)


_CHOLESKY = "Cholesky"


@dataclasses.dataclass(frozen=True)
class Cholesky:
    """Lower-triangular square matrices with a positive diagonal; register it with
    :func:`cholesky`.

    ``forward`` keeps the strict lower triangle of the original and puts ``softplus`` of its
    diagonal on the diagonal. ``right_inverse`` is exact on the set; any other value is
    replaced by its lower triangle (the nearest lower-triangular matrix in the Frobenius norm)
    when its diagonal is positive, and refused with a ValueError otherwise (module docstring).
    On a Dense kernel ``(in, out)`` the kernel is lower triangular.

    Attributes:
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.cholesky import Cholesky
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[2.0, 5.0], [1.0, 3.0]])}, "kernel", Cholesky())
      >>> px.materialize(tree)["kernel"]
      Array([[2., 0.],
             [1., 3.]], dtype=float32)
    """

    name: str = "cholesky"

    def __post_init__(self) -> None:
        numerics.option_name(_CHOLESKY, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        check_square(x, _CHOLESKY)
        return factor(x.astype(numerics.compute_dtype(x.dtype))).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        check_square(value, _CHOLESKY)
        work = value.astype(numerics.compute_dtype(value.dtype))
        return factor_inverse(work, _CHOLESKY).astype(value.dtype)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` has a diagonal entry ``<= 0`` (or NaN),
        in any matrix of a stack; does nothing for a traced one (under ``jit`` / ``vmap``),
        where such an entry gives a NaN original. The core runs it before it traces anything,
        so stacks registered with ``batch_axes`` and ``paramx.nnx`` are checked too."""
        check_square(value, _CHOLESKY)
        check_diagonal(value.astype(numerics.compute_dtype(value.dtype)), _CHOLESKY)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """The Cholesky factor of a Wishart(I, n) draw (``n`` degrees of freedom), by
        Bartlett's decomposition: entries below the diagonal are N(0, 1) and the square of
        diagonal entry ``i`` (from 0) is chi²(n − i); leading axes of ``shape`` are a batch."""
        dtype = jnp.dtype(dtype)
        check_square(jax.ShapeDtypeStruct(tuple(shape), dtype), _CHOLESKY)
        return bartlett(key, shape, dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the set: the norm of the part above the diagonal and of
        the non-positive diagonal entries (0 on the set; the infimum, as the set is open)."""
        check_square(x, _CHOLESKY)
        x = x.astype(numerics.compute_dtype(x.dtype))
        upper = jnp.sum(jnp.triu(x, 1) ** 2, axis=(-2, -1))
        low = jnp.sum(jnp.minimum(diagonal(x), 0) ** 2, axis=-1)
        return jnp.sqrt(upper + low)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix is lower triangular to ``atol`` (default ``10·n·eps`` times the
        largest entry, at least 1) with a positive diagonal."""
        check_square(x, _CHOLESKY)
        if atol is None:
            atol = default_atol(x)
        gap = jnp.max(jnp.abs(jnp.triu(x, 1)), axis=(-2, -1))
        return (gap <= atol) & jnp.all(diagonal(x) > 0, axis=-1)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "cholesky"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` lower triangular with a positive diagonal, in place.

    Registers :class:`paramx.constraints.Cholesky`: the original (an ``nnx.Param``) holds the
    strict lower
    triangle and, on its diagonal, the inverse softplus of the value's diagonal. Registration
    and assignment keep the lower triangle of a value; a diagonal entry ``<= 0`` is refused.

    Args:
      module: The module (``nnx.Linear(n, n)``, ...).
      name: The attribute to constrain.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      >>> layer.kernel[...] = jnp.eye(3) + jnp.tril(jnp.ones((3, 3)), -1)
      >>> layer = pnx.cholesky(layer)
      >>> bool(jnp.all(jnp.triu(layer.kernel, 1) == 0))
      True
    """


def cholesky(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`Cholesky`: the selected square matrices become lower triangular with a
    positive diagonal.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square in its last two axes, or (concrete
        values) has a diagonal entry ``<= 0``.
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.cholesky import cholesky
      >>> tree = cholesky({"kernel": jnp.array([[1.0, 7.0], [2.0, 3.0]])}, "kernel")
      >>> px.materialize(tree)["kernel"]
      Array([[1., 0.],
             [2., 3.]], dtype=float32)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Cholesky(), batch_axes=batch_axes)


_CORR = "CorrelationCholesky"


def _normalize_rows(m: jax.Array) -> jax.Array:
    return m / jnp.sqrt(jnp.sum(m * m, axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class CorrelationCholesky:
    """Cholesky factors of correlation matrices: lower triangular, positive diagonal, rows of
    unit norm; register it with :func:`correlation_cholesky`.

    ``forward`` builds the :class:`Cholesky` factor of the original and divides each row by its
    norm, so ``L Lᵀ`` is a correlation matrix. ``right_inverse`` is exact on the set; any other
    value is replaced by the nearest point in the Frobenius norm, found row by row (drop the
    part above the diagonal, divide each row by its norm) when every diagonal entry is
    positive, and refused with a ValueError otherwise (module docstring). On a Dense kernel
    ``(in, out)`` the kernel is lower triangular with unit rows.

    Attributes:
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.cholesky import CorrelationCholesky
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[2.0, 1.0], [3.0, 4.0]])}, "kernel", CorrelationCholesky())
      >>> px.materialize(tree)["kernel"]
      Array([[1. , 0. ],
             [0.6, 0.8]], dtype=float32)
    """

    name: str = "correlation_cholesky"

    def __post_init__(self) -> None:
        numerics.option_name(_CORR, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        check_square(x, _CORR)
        work = x.astype(numerics.compute_dtype(x.dtype))
        return _normalize_rows(factor(work)).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        check_square(value, _CORR)
        work = value.astype(numerics.compute_dtype(value.dtype))
        self.check_value(work)
        # Rows of the nearest point; NaN under tracing for a diagonal entry <= 0.
        nearest = _normalize_rows(jnp.tril(work))
        return factor_inverse(nearest, _CORR).astype(value.dtype)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` has a diagonal entry ``<= 0`` (or NaN),
        in any matrix of a stack; does nothing for a traced one (under ``jit`` / ``vmap``),
        where such an entry gives a NaN original. The core runs it before it traces anything,
        so stacks registered with ``batch_axes`` and ``paramx.nnx`` are checked too."""
        check_square(value, _CORR)
        if not is_concrete(value):
            return
        d = diagonal(value.astype(numerics.compute_dtype(value.dtype)))
        if not bool(jnp.all(d > 0)):
            raise ValueError(
                f"{_CORR}: the value has a diagonal entry <= 0 (or NaN); the set of Cholesky "
                f"factors of correlation matrices has a positive diagonal and is open, so such "
                f"a value has no nearest point in it. Assign a value with a positive diagonal, "
                f"or initialize with `.sample`."
            )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """The LKJ(η = 1) distribution, uniform over ``n × n`` correlation matrices, by the
        onion method (Lewandowski, Kurowicka and Joe, 2009): row ``k`` (from 0) of the factor is
        ``(sqrt(y)·u, sqrt(1 − y))`` with ``y ~ Beta(k/2, (n − k + 1)/2)`` and ``u`` uniform on the
        unit sphere of dimension ``k − 1``; leading axes of ``shape`` are a batch. Each
        correlation off the diagonal is then ``2·Beta(n/2, n/2) − 1``: mean 0, variance
        ``1/(n + 1)``."""
        dtype = jnp.dtype(dtype)
        shape = tuple(shape)
        check_square(jax.ShapeDtypeStruct(shape, dtype), _CORR)
        work = numerics.compute_dtype(dtype)
        n = shape[-1]
        ku, ky = jax.random.split(key)
        g = jnp.tril(jax.random.normal(ku, shape, work), -1)
        norms = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
        u = g / jnp.where(norms > 0, norms, 1)  # row 0 has no entries below the diagonal
        k = jnp.broadcast_to(jnp.arange(n).astype(work), shape[:-1])
        a = jnp.maximum(k / 2, 0.5)  # row 0 is (1): its y is replaced by 0 below
        b = (n - k + 1) / 2
        g2 = jax.random.gamma(ky, jnp.stack([a, b]), (2, *shape[:-1]), work)  # one gamma draw
        y = g2[0] / (g2[0] + g2[1])  # Beta(a, b)
        y = jnp.where(k > 0, y, 0)
        out = jnp.sqrt(y)[..., None] * u + jnp.sqrt(1 - y)[..., None] * eye_like(u)
        return out.astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the set (its closure, as it is open): the part above the
        diagonal, and per row ``v`` with diagonal entry ``v_k`` the distance to the closed
        half-sphere ``{‖u‖ = 1, u_k >= 0}``; 0 on the set."""
        check_square(x, _CORR)
        x = x.astype(numerics.compute_dtype(x.dtype))
        row = jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape[:-1])
        low = jnp.tril(x)
        d = diagonal(x)
        norm = jnp.sqrt(jnp.sum(low * low, axis=-1))
        rest = jnp.sqrt(jnp.sum(jnp.tril(x, -1) ** 2, axis=-1))
        # max over the closed half-sphere of <v, u>: ‖v‖ if v_k > 0; else ‖v without v_k‖
        # (the equator), except in row 0 whose half-sphere is the single point 1.
        best = jnp.where(d > 0, norm, jnp.where(row > 0, rest, d))
        # (‖v‖ − 1)² where v_k > 0, without the cancellation of ‖v‖² + 1 − 2‖v‖ near the set.
        rows = jnp.where(d > 0, (norm - 1) ** 2, jnp.maximum(norm**2 + 1 - 2 * best, 0))
        return jnp.sqrt(jnp.sum(jnp.triu(x, 1) ** 2, axis=(-2, -1)) + jnp.sum(rows, axis=-1))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix is lower triangular with rows of unit norm, to ``atol`` (default
        ``10·n·eps`` times the largest entry, at least 1), and a positive diagonal."""
        check_square(x, _CORR)
        if atol is None:
            atol = default_atol(x)
        work = x.astype(numerics.compute_dtype(x.dtype))
        upper = jnp.max(jnp.abs(jnp.triu(work, 1)), axis=(-2, -1))
        norms = jnp.sqrt(jnp.sum(jnp.tril(work) ** 2, axis=-1))
        unit = jnp.max(jnp.abs(norms - 1), axis=-1)
        return (upper <= atol) & (unit <= atol) & jnp.all(diagonal(x) > 0, axis=-1)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "correlation_cholesky"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` the Cholesky factor of a correlation matrix, in place.

    Registers :class:`paramx.constraints.CorrelationCholesky`: lower triangular, positive
    diagonal, rows of
    unit norm. Registration and assignment replace a value by the nearest such matrix (its
    lower triangle with each row normalized); a diagonal entry ``<= 0`` is refused.

    Args:
      module: The module (``nnx.Linear(n, n)``, ...).
      name: The attribute to constrain.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      >>> layer.kernel[...] = jnp.eye(3) + jnp.tril(jnp.ones((3, 3)), -1)
      >>> layer = pnx.correlation_cholesky(layer)
      >>> bool(jnp.allclose(jnp.sum(layer.kernel**2, axis=-1), 1.0))
      True
    """


def correlation_cholesky(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`CorrelationCholesky`: the selected square matrices become Cholesky
    factors of correlation matrices.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square in its last two axes, or (concrete
        values) has a diagonal entry ``<= 0``.
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.cholesky import correlation_cholesky
      >>> tree = correlation_cholesky({"k": jnp.array([[3.0, 1.0], [1.0, 1.0]])}, "k")
      >>> l = px.materialize(tree)["k"]
      >>> bool(jnp.allclose(l @ l.T, jnp.array([[1.0, 0.5**0.5], [0.5**0.5, 1.0]])))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, CorrelationCholesky(), batch_axes=batch_axes)
