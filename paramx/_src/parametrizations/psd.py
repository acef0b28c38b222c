"""`positive_definite` and `positive_semidefinite`: symmetric matrices with positive (or
non-negative) eigenvalues.

geotorch maps a symmetric matrix through an eigendecomposition and a function of the
eigenvalues; paramx uses maps with no eigendecomposition in ``forward``, which trace, batch and
differentiate cheaply and stably, and keep the eigendecomposition for ``right_inverse``:

* ``PositiveDefinite``: the original is a square matrix read as a Cholesky factor, as
  :class:`Cholesky` reads it (strict lower triangle, ``softplus`` of the diagonal), and the value
  is ``L Lᵀ``. ``right_inverse`` takes the factor ``jnp.linalg.cholesky`` of the value (exact on
  the set).
* ``PositiveSemidefinite``: the original ``A`` is a square matrix and the value is ``A Aᵀ``.
  ``right_inverse`` takes the symmetric square root ``V sqrt(Λ) Vᵀ`` of the value (``eigh``),
  exact on the set.

Every matrix product runs at full precision (``numerics.matmul``), and the value is symmetrized
(``(P + Pᵀ)/2``), so it is exactly symmetric on every backend. bfloat16 and float16 compute in
float32.

Off the set. A value is first replaced by its symmetric part ``(A + Aᵀ)/2``, the nearest
symmetric matrix in the Frobenius norm (the skew part is orthogonal to every symmetric matrix,
so this does not change which point of the set is nearest). For ``PositiveSemidefinite`` the
nearest point is then ``V max(Λ, 0) Vᵀ`` (Higham, 1988), and registration and assignment use it.
The positive definite cone is open: a value whose symmetric part has an eigenvalue ``<= 0`` has
no nearest positive definite matrix, and a concrete one is refused with a ValueError naming the
path (``check_value``, which the core runs eagerly before it traces anything: stacks registered
with ``batch_axes`` and ``paramx.nnx`` included). Only inside a user's own ``jax.jit`` is the
value a tracer and the check cannot run: such a value gives NaN originals.

* ``PositiveSemidefiniteLowRank``: rank at most ``r``, ``A Aᵀ`` with ``A`` of shape ``(n, r)``;
  the nearest point is ``V_r max(Λ_r, 0) V_rᵀ`` from the ``r`` largest eigenvalues.
* ``PositiveSemidefiniteFixedRank``: rank exactly ``r``, ``Q diag(f(s)) Qᵀ`` with ``Q`` of shape
  ``(n, r)`` with orthonormal columns, a dynamic trivialization as ``FixedRank``
  (``low_rank.py``): the original has the value's shape and holds ``Q``'s Householder
  coordinates below the diagonal of its first ``r`` columns and ``s`` on the diagonal, and the
  state an orthogonal base. The nearest point ``V_r Λ_r V_rᵀ`` exists when the ``r``-th
  largest eigenvalue of the symmetric part is positive; otherwise the value is refused
  (``check_value``).

Layout. On a Flax Dense kernel ``(in, out)`` with ``in == out`` the kernel is a symmetric
positive (semi)definite matrix, the same matrix as torch's ``(out, in)`` weight; on a conv
kernel ``(*spatial, in, out)`` with ``in == out`` each spatial tap is one such matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.cholesky import (
    bartlett,
    check_square,
    default_atol,
    factor,
    factor_inverse,
    is_concrete,
)
from paramx._src.parametrizations.low_rank import (
    complete,
    diagonal_original,
    option_f,
    option_rank,
    positive_map,
    positive_map_inverse,
    rank_floor,
    refuse_lost_rank,
    stiefel,
)


def _sym(x: jax.Array) -> jax.Array:
    return (x + jnp.matrix_transpose(x)) * jnp.asarray(0.5, x.dtype)


def _gram(a: jax.Array) -> jax.Array:
    """``A Aᵀ`` at full precision, exactly symmetric."""
    return _sym(numerics.matmul(a, jnp.matrix_transpose(a)))


def psd_projection(x: jax.Array) -> jax.Array:
    """The nearest positive semidefinite matrix in the Frobenius norm, ``V max(Λ, 0) Vᵀ`` of
    the symmetric part ``V Λ Vᵀ`` of ``x``."""
    lam, v = numerics.lapack(jnp.linalg.eigh, _sym(x))
    return _sym(numerics.matmul(v * jnp.maximum(lam, 0)[..., None, :], jnp.matrix_transpose(v)))


def _distance(x: jax.Array) -> jax.Array:
    x = x.astype(numerics.compute_dtype(x.dtype))
    return jnp.sqrt(jnp.sum((x - psd_projection(x)) ** 2, axis=(-2, -1)))


def _in_cone(x: jax.Array, atol: Any, strict: bool) -> jax.Array:
    if atol is None:
        atol = default_atol(x)
    work = x.astype(numerics.compute_dtype(x.dtype))
    atol = jnp.asarray(atol).astype(work.dtype)
    gap = jnp.max(jnp.abs(work - jnp.matrix_transpose(work)), axis=(-2, -1))
    low = jnp.min(numerics.lapack(jnp.linalg.eigvalsh, _sym(work)), axis=-1)
    return (gap <= atol) & ((low > 0) if strict else (low >= -atol))


def _wishart(key: jax.Array, shape: Any, dtype: Any) -> jax.Array:
    """A Wishart(I, n) draw, positive definite in ``dtype`` too.

    Narrow dtypes (bfloat16, float16) draw in float32 and round, and rounding (a relative error
    of up to ``u`` per entry) can leave an ill-conditioned draw indefinite. Such a draw, and only
    such a draw, is rounded again after adding ``t·I`` with ``t = 2u‖W‖_F / (1 − 2u√n)``: the
    rounding error ``E`` of ``W + t·I`` has ``‖E‖₂ <= u‖W + t·I‖_F < t``, so the result is
    positive definite (for ``2u√n < 1``: ``n < 16384`` in bfloat16).
    """
    dtype = jnp.dtype(dtype)
    work = numerics.compute_dtype(dtype)
    w = _gram(bartlett(key, shape, work))
    if work == dtype:
        return w
    out = w.astype(dtype)
    n = w.shape[-1]
    r = out.astype(work)
    low = jnp.min(numerics.lapack(jnp.linalg.eigvalsh, r), axis=-1)
    size = jnp.sqrt(jnp.sum(r**2, axis=(-2, -1)))
    ok = low > 10 * n * float(jnp.finfo(work).eps) * size  # PD, beyond float32's own rounding
    u = float(jnp.finfo(dtype).eps) / 2
    t = 2 * u * jnp.sqrt(jnp.sum(w**2, axis=(-2, -1))) / max(1 - 2 * u * n**0.5, 0.25)
    eye = jnp.broadcast_to(jnp.eye(n, dtype=work), w.shape)
    shifted = (w + t[..., None, None] * eye).astype(dtype)
    return jnp.where(ok[..., None, None], out, shifted)


_PD = "PositiveDefinite"


@dataclasses.dataclass(frozen=True)
class PositiveDefinite:
    """Symmetric positive definite matrices, ``L Lᵀ`` of a Cholesky factor; register it with
    :func:`positive_definite`.

    The original is read as a :class:`Cholesky` original (strict lower triangle, ``softplus``
    of the diagonal); ``right_inverse`` is the Cholesky factorization of the symmetric part of
    a value, exact on the set; a value whose symmetric part is not positive definite is refused
    (module docstring).

    Attributes:
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import PositiveDefinite
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[4.0, 2.0], [2.0, 5.0]])}, "kernel", PositiveDefinite())
      >>> px.materialize(tree)["kernel"]
      Array([[4., 2.],
             [2., 5.]], dtype=float32)
    """

    name: str = "positive_definite"

    def __post_init__(self) -> None:
        numerics.option_name(_PD, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        check_square(x, _PD)
        return _gram(factor(x.astype(numerics.compute_dtype(x.dtype)))).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        check_square(value, _PD)
        self.check_value(value)
        s = _sym(value.astype(numerics.compute_dtype(value.dtype)))
        # NaN where s is not positive definite (traced values)
        low = numerics.lapack(jnp.linalg.cholesky, s)
        return factor_inverse(low, _PD).astype(value.dtype)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if the symmetric part of a concrete ``value`` (any matrix of a
        stack) is not positive definite: the cone is open, so such a value has no nearest point
        in it. Does nothing for a traced value (under ``jit`` / ``vmap``), which gives NaN
        originals; the core runs it before it traces anything, so stacks registered with
        ``batch_axes`` and ``paramx.nnx`` are checked too."""
        check_square(value, _PD)
        if not is_concrete(value):
            return
        s = _sym(value.astype(numerics.compute_dtype(value.dtype)))
        bad = ~jnp.all(jnp.isfinite(numerics.lapack(jnp.linalg.cholesky, s)), axis=(-2, -1))
        if not bool(jnp.any(bad)):
            return
        eig = float(
            jnp.min(
                jnp.where(bad, jnp.min(numerics.lapack(jnp.linalg.eigvalsh, s), axis=-1), jnp.inf)
            )
        )
        where = ""
        if bad.ndim:
            idx = [tuple(int(i) for i in ix) for ix in jnp.argwhere(bad)[:4]]
            where = f" (matrix {idx[0] if len(idx) == 1 else idx} of the stack)"
        raise ValueError(
            f"{_PD}: the value's symmetric part is not positive definite{where} (smallest "
            f"eigenvalue {eig:.3g}); the positive definite cone is open, so such a value has "
            f"no nearest point in it. Assign a positive definite value (e.g. A Aᵀ + c·I), "
            f"use positive_semidefinite, or initialize with `.sample`."
        )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """A Wishart(I, n) matrix (``n`` degrees of freedom, the matrix size): ``L Lᵀ`` with
        ``L`` by Bartlett's decomposition (:meth:`Cholesky.sample`); mean ``n·I``, and each
        entry has variance ``n`` off the diagonal and ``2n`` on it. Leading axes of ``shape``
        are a batch. For bfloat16 and float16 the float32 draw is rounded; a draw that rounding
        would leave indefinite (an ill-conditioned one: smallest eigenvalue below about
        ``2⁻⁸·‖W‖`` in bfloat16) gets a small multiple of ``I`` added first, so every draw is
        positive definite in its dtype."""
        dtype = jnp.dtype(dtype)
        check_square(jax.ShapeDtypeStruct(tuple(shape), dtype), _PD)
        return _wishart(key, shape, dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the cone (to its closure, the positive semidefinite
        cone): ``‖X − P(X)‖`` with ``P`` the projection (module docstring); 0 on the set."""
        check_square(x, _PD)
        return _distance(x)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix is symmetric to ``atol`` (default ``10·n·eps`` times the largest
        entry, at least 1) and its symmetric part has positive eigenvalues."""
        check_square(x, _PD)
        return _in_cone(x, atol, strict=True)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "positive_definite"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` symmetric positive definite, in place.

    Registers :class:`paramx.constraints.PositiveDefinite`: the original (an ``nnx.Param``) holds a
    Cholesky factor ``L`` (its diagonal through softplus) and the value is ``L Lᵀ``.
    Registration and assignment keep the symmetric part of a value and refuse one that is not
    positive definite.

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
      >>> layer.kernel[...] = 2 * jnp.eye(3)
      >>> layer = pnx.positive_definite(layer)
      >>> bool(jnp.all(jnp.linalg.eigvalsh(layer.kernel) > 0))
      True
    """


def positive_definite(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`PositiveDefinite`: the selected square matrices become symmetric
    positive definite.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square in its last two axes, or (concrete
        values) its symmetric part is not positive definite.
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import positive_definite
      >>> tree = positive_definite({"kernel": jnp.array([[2.0, 1.0], [0.0, 2.0]])}, "kernel")
      >>> px.materialize(tree)["kernel"].round(4)
      Array([[2. , 0.5],
             [0.5, 2. ]], dtype=float32)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, PositiveDefinite(), batch_axes=batch_axes)


_PSD = "PositiveSemidefinite"


@dataclasses.dataclass(frozen=True)
class PositiveSemidefinite:
    """Symmetric positive semidefinite matrices, ``A Aᵀ`` of a square matrix; register it with
    :func:`positive_semidefinite`.

    ``right_inverse`` is the symmetric square root ``V sqrt(Λ) Vᵀ`` of the nearest positive
    semidefinite matrix ``V max(Λ, 0) Vᵀ`` (``V Λ Vᵀ`` the symmetric part of the value): exact on
    the set, the Frobenius projection off it (module docstring).

    Attributes:
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import PositiveSemidefinite
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[1.0, 0.0], [0.0, -1.0]])}, "kernel", PositiveSemidefinite())
      >>> px.materialize(tree)["kernel"]
      Array([[1., 0.],
             [0., 0.]], dtype=float32)
    """

    name: str = "positive_semidefinite"

    def __post_init__(self) -> None:
        numerics.option_name(_PSD, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        check_square(x, _PSD)
        return _gram(x.astype(numerics.compute_dtype(x.dtype))).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        check_square(value, _PSD)
        s = _sym(value.astype(numerics.compute_dtype(value.dtype)))
        lam, v = numerics.lapack(jnp.linalg.eigh, s)
        root = numerics.matmul(
            v * jnp.sqrt(jnp.maximum(lam, 0))[..., None, :], jnp.matrix_transpose(v)
        )
        return _sym(root).astype(value.dtype)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """A Wishart(I, n) matrix (``n`` degrees of freedom, the matrix size), as
        :meth:`PositiveDefinite.sample`: mean ``n·I``. Leading axes of ``shape`` are a
        batch."""
        dtype = jnp.dtype(dtype)
        check_square(jax.ShapeDtypeStruct(tuple(shape), dtype), _PSD)
        return _wishart(key, shape, dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the cone, ``‖X − V max(Λ, 0) Vᵀ‖``; 0 on the set."""
        check_square(x, _PSD)
        return _distance(x)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix is symmetric and its eigenvalues are ``>= −atol`` (default
        ``10·n·eps`` times the largest entry, at least 1)."""
        check_square(x, _PSD)
        return _in_cone(x, atol, strict=False)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "positive_semidefinite"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` symmetric positive semidefinite, in place.

    Registers :class:`paramx.constraints.PositiveSemidefinite`: the original (an ``nnx.Param``)
    is a square
    matrix ``A`` and the value is ``A Aᵀ``. Registration and assignment replace a value by the
    nearest positive semidefinite matrix (Frobenius norm).

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
      >>> layer = pnx.positive_semidefinite(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> bool(jnp.all(jnp.linalg.eigvalsh(layer.kernel) > -1e-5))
      True
    """


def positive_semidefinite(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`PositiveSemidefinite`: the selected square matrices become symmetric
    positive semidefinite.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square in its last two axes.
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import positive_semidefinite
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3))
      >>> k = px.materialize(positive_semidefinite({"kernel": kernel}, "kernel"))["kernel"]
      >>> bool(jnp.array_equal(k, k.T)), bool(jnp.all(jnp.linalg.eigvalsh(k) > -1e-5))
      (True, True)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, PositiveSemidefinite(), batch_axes=batch_axes)


_LOW = "PositiveSemidefiniteLowRank"


def _top(x: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The ``rank`` largest eigenvalues, clipped at 0, and their eigenvectors, of the symmetric
    part of ``x``."""
    lam, v = numerics.lapack(jnp.linalg.eigh, _sym(x))
    return jnp.maximum(lam[..., -rank:], 0), v[..., :, -rank:]


@dataclasses.dataclass(frozen=True)
class PositiveSemidefiniteLowRank:
    """Symmetric positive semidefinite ``n × n`` matrices of rank at most ``rank``, ``A Aᵀ``
    with ``A`` of shape ``(n, rank)``; register it with
    :func:`positive_semidefinite_low_rank`.

    The original has shape ``(..., n, rank)``, not the value's. ``right_inverse`` is
    ``V_r sqrt(Λ_r)`` from the ``rank`` largest eigenvalues (clipped at 0) of the symmetric
    part: exact on the set, and off it the nearest matrix of the set in the Frobenius norm,
    ``V_r max(Λ_r, 0) V_rᵀ`` (Eckart–Young on the positive part; with tied eigenvalues it is
    one of the nearest). On a Dense kernel ``(n, n)`` the kernel is such a matrix.

    Attributes:
      rank: The largest rank, ``1 <= rank <= n``.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import PositiveSemidefiniteLowRank
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.diag(jnp.array([3.0, 1.0, 2.0]))}, "kernel",
      ...     PositiveSemidefiniteLowRank(rank=2))
      >>> px.materialize(tree)["kernel"].round(4)
      Array([[3., 0., 0.],
             [0., 0., 0.],
             [0., 0., 2.]], dtype=float32)
    """

    rank: int
    name: str = "positive_semidefinite_low_rank"

    def __post_init__(self) -> None:
        rank = numerics.option_int(_LOW, "rank", self.rank)
        if rank < 1:
            raise ValueError(f"{_LOW}: rank must be at least 1; got rank={rank}.")
        object.__setattr__(self, "rank", rank)
        numerics.option_name(_LOW, self.name)

    def _check_shape(self, x: Any) -> None:
        check_square(x, _LOW)
        if self.rank > x.shape[-1]:
            raise ValueError(
                f"{_LOW}: rank={self.rank} exceeds the matrix size {x.shape[-1]} (shape "
                f"{list(x.shape)}). Use a rank of at most {x.shape[-1]}, or "
                f"positive_semidefinite for full rank."
            )

    def forward(self, x: jax.Array) -> jax.Array:
        numerics.check_dtype(x, _LOW, complex_ok=False)
        if len(x.shape) < 2 or x.shape[-1] != self.rank:
            raise ValueError(
                f"{_LOW}: the original must have shape (..., n, rank={self.rank}); got shape "
                f"{list(x.shape)}. Register it on an (n, n) value: right_inverse builds it."
            )
        return _gram(x.astype(numerics.compute_dtype(x.dtype))).astype(x.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        self._check_shape(value)
        lam, v = _top(value.astype(numerics.compute_dtype(value.dtype)), self.rank)
        return (v * jnp.sqrt(lam)[..., None, :]).astype(value.dtype)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """A singular Wishart(I, rank) matrix ``G Gᵀ``, ``G`` an ``(n, rank)`` standard normal
        matrix: mean ``rank·I``. Leading axes of ``shape`` are a batch."""
        dtype = jnp.dtype(dtype)
        shape = tuple(shape)
        self._check_shape(jax.ShapeDtypeStruct(shape, dtype))
        g = jax.random.normal(key, (*shape[:-1], self.rank), numerics.compute_dtype(dtype))
        return _gram(g).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the set, ``‖X − V_r max(Λ_r, 0) V_rᵀ‖``; 0 on it."""
        self._check_shape(x)
        x = x.astype(numerics.compute_dtype(x.dtype))
        lam, v = _top(x, self.rank)
        near = numerics.matmul(v * lam[..., None, :], jnp.matrix_transpose(v))
        return jnp.sqrt(jnp.sum((x - near) ** 2, axis=(-2, -1)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix is symmetric, its eigenvalues are ``>= −atol`` and at most
        ``rank`` of them exceed ``atol`` (default ``10·n·eps`` times the largest entry, at
        least 1)."""
        self._check_shape(x)
        if atol is None:
            atol = default_atol(x)
        work = x.astype(numerics.compute_dtype(x.dtype))
        atol = jnp.asarray(atol).astype(work.dtype)
        gap = jnp.max(jnp.abs(work - jnp.matrix_transpose(work)), axis=(-2, -1))
        lam = numerics.lapack(jnp.linalg.eigvalsh, _sym(work))
        n = x.shape[-1]
        rest = lam[..., n - self.rank - 1] if self.rank < n else jnp.zeros_like(lam[..., 0])
        return (gap <= atol) & (lam[..., 0] >= -atol) & (rest <= atol)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "positive_semidefinite_low_rank"
    torch_function_positional = ()
    torch_function_keyword = ("rank",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` positive semidefinite of rank at most ``rank``, in place.

    Registers :class:`paramx.constraints.PositiveSemidefiniteLowRank`: the original (an
    ``nnx.Param``) has
    shape ``(n, rank)`` and the value is ``A Aᵀ``. Registration and assignment replace a value
    by the nearest such matrix (Frobenius norm).

    Args:
      module: The module (``nnx.Linear(n, n)``, ...).
      name: The attribute to constrain.
      rank: The largest rank.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.positive_semidefinite_low_rank(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rank=2)
      >>> int(jnp.sum(jnp.linalg.eigvalsh(layer.kernel) > 1e-5)) <= 2
      True
    """


def positive_semidefinite_low_rank(tree: Any, where: Any, rank: int, *, batch_axes: int = 0) -> Any:
    """Registers :class:`PositiveSemidefiniteLowRank`: the selected square matrices become
    positive semidefinite of rank at most ``rank``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      rank: The largest rank, ``1 <= rank <= n``.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square, or ``rank`` exceeds its size.
      TypeError: If it is an integer, boolean or complex tensor, or ``rank`` is not an int.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import positive_semidefinite_low_rank
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 4))
      >>> tree = positive_semidefinite_low_rank({"kernel": kernel}, "kernel", 2)
      >>> tree["kernel"].originals[0].shape
      (4, 2)
      >>> k = px.materialize(tree)["kernel"]
      >>> int(jnp.sum(jnp.linalg.eigvalsh(k) > 1e-5))
      2
    """
    from paramx._src.core.register import register_parametrization

    p = PositiveSemidefiniteLowRank(rank)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)


_FIXED = "PositiveSemidefiniteFixedRank"


@dataclasses.dataclass(frozen=True)
class PositiveSemidefiniteFixedRank:
    """Symmetric positive semidefinite ``n × n`` matrices of rank exactly ``rank``,
    ``Q diag(f(s)) Qᵀ`` with ``Q`` of shape ``(n, rank)`` with orthonormal columns and
    ``f(s) > 0``; register it with :func:`positive_semidefinite_fixed_rank`. geotorch's
    ``PSSDFixedRank``.

    The original has the value's shape: its first ``rank`` columns hold ``Q``'s Householder
    coordinates below the diagonal and ``s`` on the diagonal; the state holds an orthogonal
    ``n × n`` base, and ``Q = base · H(coordinates)`` (a dynamic trivialization, as
    :class:`FixedRank`; :func:`paramx.update_base` re-centres it). ``right_inverse`` takes the
    ``rank`` largest eigenvalues ``Λ_r`` of the symmetric part of the value: exact on the set,
    and off it the nearest matrix of the set in the Frobenius norm, ``V_r Λ_r V_rᵀ``, when
    ``Λ_r > 0``. Otherwise (the ``rank``-th largest eigenvalue is ``<= n·eps`` times the
    largest) there is no nearest point and ``check_value`` refuses the value. On a Dense kernel
    ``(n, n)`` the kernel is such a matrix; on a conv kernel ``(*spatial, n, n)``, each tap.

    Attributes:
      rank: The rank, ``1 <= rank <= n`` (checked at registration).
      f: ``"softplus"`` (default) or ``"exp"``, the map from the original's diagonal to the
        eigenvalues.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import PositiveSemidefiniteFixedRank
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.diag(jnp.array([3.0, -1.0, 2.0]))}, "kernel",
      ...     PositiveSemidefiniteFixedRank(rank=2))
      >>> px.materialize(tree)["kernel"].round(4)
      Array([[3., 0., 0.],
             [0., 0., 0.],
             [0., 0., 2.]], dtype=float32)
    """

    rank: int
    f: str = "softplus"
    name: str = "positive_semidefinite_fixed_rank"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", option_rank(_FIXED, self.rank))
        option_f(_FIXED, self.f)
        numerics.option_name(_FIXED, self.name)

    def _check_shape(self, x: Any) -> None:
        check_square(x, _FIXED)
        if self.rank > x.shape[-1]:
            raise ValueError(
                f"{_FIXED}: rank={self.rank} exceeds the matrix size {x.shape[-1]} (shape "
                f"{list(x.shape)}). Use a rank between 1 and {x.shape[-1]}."
            )

    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        self._check_shape(value)
        n = value.shape[-1]
        eye = jnp.eye(n, dtype=numerics.compute_dtype(value.dtype))
        return None, {"q": jnp.broadcast_to(eye, value.shape)}

    def _value(self, w: jax.Array, base: jax.Array) -> jax.Array:
        r = self.rank
        q = stiefel(w[..., :, :r], base)
        lam = positive_map(self.f, jnp.diagonal(w, axis1=-2, axis2=-1)[..., :r])
        return _sym(numerics.matmul(q * lam[..., None, :], jnp.matrix_transpose(q)))

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        self._check_shape(x)
        if state is None:
            raise numerics.missing_state(_FIXED, "the base q")
        w = x.astype(numerics.compute_dtype(x.dtype))
        return self._value(w, state["q"]).astype(x.dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        self._check_shape(value)
        self.check_value(value)
        w = value.astype(numerics.compute_dtype(value.dtype))
        lam, v = _top(w, self.rank)
        d = positive_map_inverse(self.f, lam)
        return diagonal_original(d, w.shape).astype(value.dtype), {"q": complete(v)}

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if, for a concrete ``value`` (any matrix of a stack), the
        ``rank``-th largest eigenvalue of the symmetric part is ``<= n·eps`` times the largest
        (or the largest is ``<= 0``): the nearest positive semidefinite matrix of rank ``<=
        rank`` then has a lower rank, and none of rank exactly ``rank`` is nearest. Does nothing
        for a traced value (under ``jit`` / ``vmap``), where such an eigenvalue gives an
        original of ``−inf`` or NaN; the core runs it before it traces anything, so stacks and
        ``paramx.nnx`` are checked too."""
        self._check_shape(value)
        if not is_concrete(value) or isinstance(value, jax.ShapeDtypeStruct):
            return
        lam = numerics.lapack(
            jnp.linalg.eigvalsh, _sym(value.astype(numerics.compute_dtype(value.dtype)))
        )
        lr = lam[..., -self.rank]
        bad = ~(lr > rank_floor(value, jnp.maximum(lam[..., -1], 0)))
        refuse_lost_rank(
            _FIXED,
            bad,
            f"the symmetric part of the value has eigenvalue λ_{self.rank} = "
            f"{float(jnp.min(lr)):.3g} (its {self.rank}-th largest: zero, negative or rounding)",
            f"Assign a positive semidefinite value of rank at least {self.rank} (e.g. G Gᵀ "
            f"for G of shape (n, {self.rank})), use positive_semidefinite_low_rank (rank <= "
            f"{self.rank}), or initialize with `.sample`.",
        )

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization (:func:`paramx.update_base`): the base moves to the current
        ``Q`` and the original back to the chart's centre (its ``s`` is kept), so the value is
        unchanged to rounding."""
        self._check_shape(x)
        if state is None:
            raise numerics.missing_state(_FIXED, "the base q")
        w = x.astype(numerics.compute_dtype(x.dtype))
        q = stiefel(w[..., :, : self.rank], state["q"])
        d = jnp.diagonal(w, axis1=-2, axis2=-1)[..., : self.rank]
        return diagonal_original(d, w.shape).astype(x.dtype), {"q": complete(q)}

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """A singular Wishart(I, rank) matrix ``G Gᵀ``, ``G`` an ``(n, rank)`` standard normal
        matrix (rank exactly ``rank`` almost surely): mean ``rank·I``, and each entry has
        variance ``rank`` off the diagonal and ``2·rank`` on it. Leading axes of ``shape`` are a
        batch; bfloat16 and float16 draw in float32 and round."""
        dtype = jnp.dtype(dtype)
        shape = tuple(shape)
        self._check_shape(jax.ShapeDtypeStruct(shape, dtype))
        g = jax.random.normal(key, (*shape[:-1], self.rank), numerics.compute_dtype(dtype))
        return _gram(g).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the set (the infimum; the distance to its closure, the
        rank ``<= rank`` positive semidefinite matrices), ``‖X − V_r max(Λ_r, 0) V_rᵀ‖``; 0 on
        it."""
        self._check_shape(x)
        return PositiveSemidefiniteLowRank(self.rank).distance(x)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix is symmetric, its eigenvalues are ``>= −atol`` and exactly
        ``rank`` of them exceed ``atol`` (default ``10·n·eps`` times the largest entry, at
        least 1)."""
        self._check_shape(x)
        if atol is None:
            atol = default_atol(x)
        lam = numerics.lapack(jnp.linalg.eigvalsh, _sym(x.astype(numerics.compute_dtype(x.dtype))))
        atol = jnp.asarray(atol).astype(lam.dtype)
        low = PositiveSemidefiniteLowRank(self.rank).in_manifold(x, atol)
        return low & (lam[..., -self.rank] > atol)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "positive_semidefinite_fixed_rank"
    torch_function_positional = ()
    torch_function_keyword = ("rank", "f")
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` positive semidefinite of rank exactly ``rank``, in place.

    Registers :class:`paramx.constraints.PositiveSemidefiniteFixedRank`: the original (an
    ``nnx.Param`` of the kernel's shape) holds ``Q``'s coordinates and ``s`` of
    ``Q diag(f(s)) Qᵀ``, and an orthogonal base is :class:`ParametrizationState`. Registration
    and assignment replace a value by the nearest such matrix (Frobenius norm) and refuse one
    whose ``rank``-th largest eigenvalue is not positive.

    Args:
      module: The module (``nnx.Linear(n, n)``, ...).
      name: The attribute to constrain.
      rank: The rank.
      f: ``"softplus"`` (default) or ``"exp"``.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
      >>> layer.kernel[...] = jnp.eye(4)
      >>> layer = pnx.positive_semidefinite_fixed_rank(layer, rank=2)
      >>> int(jnp.sum(jnp.linalg.eigvalsh(layer.kernel) > 1e-5))
      2
    """


def positive_semidefinite_fixed_rank(
    tree: Any, where: Any, rank: int, *, f: str = "softplus", batch_axes: int = 0
) -> Any:
    """Registers :class:`PositiveSemidefiniteFixedRank`: the selected square matrices become
    positive semidefinite of rank exactly ``rank``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      rank: The rank, ``1 <= rank <= n``.
      f: ``"softplus"`` (default) or ``"exp"``, the map to the eigenvalues.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square, ``rank`` is out of range, or (concrete
        values) the ``rank``-th largest eigenvalue of its symmetric part is not positive.
      TypeError: If it is an integer, boolean or complex tensor, or ``rank`` is not an int.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.psd import positive_semidefinite_fixed_rank
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 4))
      >>> kernel = kernel @ kernel.T  # positive definite: its top-2 part is the nearest point
      >>> tree = positive_semidefinite_fixed_rank({"kernel": kernel}, "kernel", 2)
      >>> k = px.materialize(tree)["kernel"]
      >>> int(jnp.sum(jnp.linalg.eigvalsh(k) > 1e-4))
      2
    """
    from paramx._src.core.register import register_parametrization

    p = PositiveSemidefiniteFixedRank(rank, f)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)
