"""`skew`: a square matrix constrained to be skew-symmetric, ``Xᵀ = −X``.

The original is a square matrix (or a stack of them along leading axes: a conv kernel
``(*spatial, n, n)`` is one skew matrix per spatial tap; a Flax Dense kernel ``(n, n)`` is one
matrix). ``forward`` reads the strict lower triangle ``L`` of the original (``lower=True``, the
default) or its strict upper triangle (``lower=False``) and returns ``L − Lᵀ``: only that
triangle is learned, the diagonal and the other triangle get no gradient. ``right_inverse``
maps any square value ``A`` to the triangle of its skew part ``(A − Aᵀ)/2``, the nearest
skew-symmetric matrix in the Frobenius norm: a skew value comes back exactly, any other value
is replaced by that projection (at registration and on assignment). Complex matrices are made
skew-symmetric (``Xᵀ = −X``), not skew-Hermitian (``Xᴴ = −X``): :class:`SkewHermitian` (below)
gives those.

`skew_hermitian`: the complex analogue, ``Xᴴ = −X`` (the Lie algebra u(n) of the unitary
group). ``forward`` reads the strict triangle ``L`` and the imaginary part of the diagonal
and returns ``L − Lᴴ + i·Im(diag)``; ``right_inverse`` keeps the triangle (diagonal included)
of the skew-Hermitian part ``(A − Aᴴ)/2``, the nearest skew-Hermitian matrix in the Frobenius
norm. On real dtypes it is :class:`Skew`, value for value. Its samples are ``i`` times the
Gaussian unitary ensemble.

Layout. The lower triangle of a Flax kernel (in, out) is the upper triangle of torch's weight
(out, in): paramx's ``Skew(lower=True)`` corresponds to geotorch's ``Skew(lower=False)``
(``X.triu(1) − X.triu(1).mT`` on the torch weight), and ``Skew(lower=False)`` to geotorch's
default ``Skew(lower=True)``. The original, written to a torch ``state_dict`` in the weight's
layout, is the original the corresponding torch parametrization expects, and the value is the
same matrix in both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.symmetric import standard_normal, with_diagonal

_OWNER = "Skew"


def _check_square(x: jax.Array, owner: str = _OWNER) -> None:
    numerics.check_dtype(x, owner)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{owner} needs a square matrix in the last two axes (or a stack of them); got "
            f"shape {list(x.shape)}. Register it on a square kernel, e.g. a Dense(n) kernel on "
            f"n features."
        )


def _mH(x: jax.Array) -> jax.Array:
    """The conjugate transpose of the last two axes (the transpose for real dtypes)."""
    return jnp.conj(jnp.matrix_transpose(x)) if jnp.iscomplexobj(x) else jnp.matrix_transpose(x)


@dataclasses.dataclass(frozen=True)
class Skew:
    """The skew-symmetric-matrix parametrization; register it with :func:`skew`.

    On a Flax Dense kernel ``(n, n)`` the kernel becomes one skew matrix; on a conv kernel
    ``(*spatial, n, n)`` each spatial tap is one; leading axes are a stack.

    Attributes:
      lower: Which strict triangle of the (Flax-layout) original holds the parameters: the
        lower one (default) or the upper one. paramx's ``lower=True`` is geotorch's
        ``lower=False`` on the transposed torch weight, and vice versa.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.skew import Skew
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[1.0, 0.0], [2.0, 3.0]])}, "kernel", Skew())
      >>> px.materialize(tree)["kernel"]
      Array([[ 0., -1.],
             [ 1.,  0.]], dtype=float32)
    """

    lower: bool = True
    name: str = "skew"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lower", numerics.option_bool(_OWNER, "lower", self.lower))
        numerics.option_name(_OWNER, self.name)

    def _triangle(self, x: jax.Array) -> jax.Array:
        return jnp.tril(x, -1) if self.lower else jnp.triu(x, 1)

    def forward(self, x: jax.Array) -> jax.Array:
        _check_square(x)
        t = self._triangle(x)
        return t - jnp.matrix_transpose(t)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        """The triangle of the skew part ``(A − Aᵀ)/2``: exact on skew matrices, and otherwise
        the nearest skew matrix in the Frobenius norm (the symmetric part is orthogonal to it).
        """
        _check_square(value)
        half = jnp.asarray(0.5, value.dtype)
        return self._triangle((value - jnp.matrix_transpose(value)) * half)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """``(G − Gᵀ)/2`` for a standard normal ``G``: the diagonal is 0 and each entry below
        it is N(0, 1/2), independently (the entries above are their negatives); leading axes
        of ``shape`` are a batch. For a complex dtype ``G`` is standard complex normal."""
        dtype = jnp.dtype(dtype)
        numerics.check_dtype(jnp.zeros((), dtype), _OWNER)
        g = jax.random.normal(key, tuple(shape), numerics.compute_dtype(dtype))
        _check_square(g)
        return ((g - jnp.matrix_transpose(g)) / 2).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest skew matrix, ``‖(X + Xᵀ)/2‖``, per matrix."""
        _check_square(x)
        d = (x + jnp.matrix_transpose(x)).astype(numerics.compute_dtype(x.dtype)) / 2
        return jnp.sqrt(jnp.sum(jnp.abs(d) ** 2, axis=(-2, -1)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix equals minus its transpose, entry by entry, to ``atol`` (default
        ``10·n·eps`` times the largest entry, at least 1)."""
        _check_square(x)
        if atol is None:
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=(-2, -1)), 1)
            atol = 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps) * scale
        gap = jnp.max(jnp.abs(x + jnp.matrix_transpose(x)), axis=(-2, -1))
        return gap <= atol

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "skew"
    torch_function_positional = ("lower",)
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a skew-symmetric matrix (``Xᵀ = −X``), in place.

    Registers ``Skew``: the original (an ``nnx.Param``) holds the strict lower triangle
    (``lower=True``) or upper triangle, and the value is ``L − Lᵀ``. Registration and
    assignment replace a value by its skew part ``(A − Aᵀ)/2``.

    Args:
      module: The module (``nnx.Linear(n, n)``, ...).
      name: The attribute to constrain.
      lower: Which triangle of the Flax-layout kernel is learned (geotorch's ``lower`` is the
        opposite one, on torch's transposed weight).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.skew(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> bool(jnp.array_equal(layer.kernel, -layer.kernel.T))
      True
    """


def skew(tree: Any, where: Any, lower: bool = True, *, batch_axes: int = 0) -> Any:
    """Registers :class:`Skew`: the selected square matrices become skew-symmetric.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      lower: Which strict triangle of each original holds the parameters (see :class:`Skew`).
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square in its last two axes.
      TypeError: If it is an integer or boolean tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.skew import skew
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3))
      >>> tree = skew({"kernel": kernel}, "kernel")
      >>> k = px.materialize(tree)["kernel"]
      >>> bool(jnp.array_equal(k, -k.T)), bool(jnp.allclose(k, (kernel - kernel.T) / 2))
      (True, True)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Skew(lower), batch_axes=batch_axes)


_SKEW_HERMITIAN = "SkewHermitian"


@dataclasses.dataclass(frozen=True)
class SkewHermitian:
    """The skew-Hermitian-matrix parametrization (``Xᴴ = −X``); register it with
    :func:`skew_hermitian`.

    The complex analogue of :class:`Skew` (the Lie algebra of the unitary group, as ``Skew``'s
    values are that of the orthogonal group), and the same parametrization on real dtypes. On a
    Flax Dense kernel ``(n, n)`` the kernel is one skew-Hermitian matrix (so is torch's weight,
    its transpose); on a conv kernel ``(*spatial, n, n)`` each spatial tap is one; leading axes
    are a stack. The original's strict triangle and the imaginary part of its diagonal are
    learned; the other triangle and the real part of the diagonal get no gradient.

    Attributes:
      lower: Which strict triangle of the (Flax-layout) original holds the parameters, as in
        :class:`Skew`.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.skew import SkewHermitian
      >>> a = jnp.array([[1 + 1j, 5j], [2 + 3j, 4]], jnp.complex64)
      >>> tree = px.register_parametrization({"kernel": a}, "kernel", SkewHermitian())
      >>> # registration keeps the skew-Hermitian part (a − aᴴ)/2 of the value
      >>> px.materialize(tree)["kernel"]
      Array([[ 0.+1.j, -1.+4.j],
             [ 1.+4.j,  0.+0.j]], dtype=complex64)
    """

    lower: bool = True
    name: str = "skew_hermitian"

    def __post_init__(self) -> None:
        lower = numerics.option_bool(_SKEW_HERMITIAN, "lower", self.lower)
        object.__setattr__(self, "lower", lower)
        numerics.option_name(_SKEW_HERMITIAN, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        _check_square(x, _SKEW_HERMITIAN)
        t = jnp.tril(x, -1) if self.lower else jnp.triu(x, 1)
        value = t - _mH(t)
        if not jnp.iscomplexobj(x):
            return value
        d = jnp.diagonal(x, axis1=-2, axis2=-1)
        return with_diagonal(value, jax.lax.complex(jnp.zeros_like(d.real), d.imag))

    def right_inverse(self, value: jax.Array) -> jax.Array:
        """The triangle (diagonal included) of the skew-Hermitian part ``(A − Aᴴ)/2``: exact on
        skew-Hermitian matrices, and otherwise the nearest one in the Frobenius norm (the
        Hermitian part is orthogonal to it for the real inner product ``Re tr(XᴴY)``)."""
        _check_square(value, _SKEW_HERMITIAN)
        half = jnp.asarray(0.5, value.dtype)
        b = (value - _mH(value)) * half
        return jnp.tril(b) if self.lower else jnp.triu(b)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """``(G − Gᴴ)/2`` with the real and imaginary parts of ``G`` standard normal: ``i``
        times the Gaussian unitary ensemble, so the diagonal is ``i`` times N(0, 1), each entry
        below it has independent N(0, 1/2) real and imaginary parts, and the law is invariant
        under ``X -> U X Uᴴ`` for every unitary ``U``. For real dtypes it is :class:`Skew`'s
        distribution. Leading axes of ``shape`` are a batch.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.skew import SkewHermitian
          >>> x = SkewHermitian().sample(jax.random.key(0), (2, 3, 3), jnp.complex64)
          >>> SkewHermitian().in_manifold(x)
          Array([ True,  True], dtype=bool)
        """
        dtype = jnp.dtype(dtype)
        numerics.check_dtype(jax.ShapeDtypeStruct((), dtype), _SKEW_HERMITIAN)
        g = standard_normal(key, tuple(shape), numerics.compute_dtype(dtype))
        _check_square(g, _SKEW_HERMITIAN)
        return ((g - _mH(g)) / 2).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest skew-Hermitian matrix, ``‖(X + Xᴴ)/2‖``."""
        _check_square(x, _SKEW_HERMITIAN)
        d = (x + _mH(x)).astype(numerics.compute_dtype(x.dtype)) / 2
        return jnp.sqrt(jnp.sum(jnp.abs(d) ** 2, axis=(-2, -1)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix equals minus its conjugate transpose, entry by entry, to
        ``atol`` (default ``10·n·eps`` times the largest entry, at least 1)."""
        _check_square(x, _SKEW_HERMITIAN)
        if atol is None:
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=(-2, -1)), 1)
            atol = 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps) * scale
        gap = jnp.max(jnp.abs(x + _mH(x)), axis=(-2, -1))
        return gap <= atol

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "skew_hermitian"
    torch_function_positional = ("lower",)
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a skew-Hermitian matrix (``Xᴴ = −X``), in place.

    Registers ``SkewHermitian``: the original (an ``nnx.Param``) holds the strict lower
    (``lower=True``) or upper triangle and the imaginary diagonal, and the value is
    ``L − Lᴴ + i·Im(diag)``. Registration and assignment replace a value by its skew-Hermitian
    part ``(A − Aᴴ)/2``. On a real kernel it is ``skew``.

    Args:
      module: The module (``nnx.Linear(n, n, param_dtype=jnp.complex64)``, ...).
      name: The attribute to constrain.
      lower: Which triangle of the Flax-layout kernel is learned.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from paramx._src.integrations.nnx.wrappers import torch_function
      >>> from paramx._src.parametrizations.skew import SkewHermitian
      >>> skew_hermitian = torch_function(SkewHermitian)  # paramx.nnx.skew_hermitian
      >>> layer = nnx.Linear(3, 3, param_dtype=jnp.complex64, rngs=nnx.Rngs(0))
      >>> layer = skew_hermitian(layer)
      >>> bool(jnp.array_equal(layer.kernel, -layer.kernel.conj().T))
      True
    """


def skew_hermitian(tree: Any, where: Any, lower: bool = True, *, batch_axes: int = 0) -> Any:
    """Registers :class:`SkewHermitian`: the selected square matrices become skew-Hermitian
    (``Xᴴ = −X``; skew-symmetric for real dtypes).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      lower: Which strict triangle of each original holds the parameters (see :class:`Skew`).
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square in its last two axes.
      TypeError: If it is an integer or boolean tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.skew import skew_hermitian
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3), jnp.complex64)
      >>> tree = skew_hermitian({"kernel": kernel}, "kernel")
      >>> k = px.materialize(tree)["kernel"]
      >>> bool(jnp.array_equal(k, -k.conj().T))
      True
      >>> bool(jnp.allclose(k, (kernel - kernel.conj().T) / 2))
      True
    """
    from paramx._src.core.register import register_parametrization

    p = SkewHermitian(lower)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)
