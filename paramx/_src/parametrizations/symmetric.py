"""`symmetric`: a square matrix constrained to equal its transpose.

The original is a square matrix (or a stack of them along leading axes, e.g. one per spatial
tap of a conv kernel whose last two axes are square); ``forward`` reads its lower triangle
and mirrors it, so only that triangle is learned and the other gets no gradient.
``right_inverse`` maps any square value to the lower triangle of its symmetric part
``(A + Aᵀ)/2``: a symmetric value comes back exactly, and any other value is replaced by the
nearest symmetric matrix in the Frobenius norm (at registration and on assignment), as
``orthogonal`` replaces a value by the Q factor of its QR decomposition. Complex matrices are
made symmetric (``A = Aᵀ``), not Hermitian: :class:`Hermitian` (below) gives ``A = Aᴴ``.

`hermitian`: the complex analogue, ``A = Aᴴ``. ``forward`` reads the strict lower triangle and
the real part of the diagonal, and returns ``L + Lᴴ + Re(diag)``; ``right_inverse`` keeps the
lower triangle of the Hermitian part ``(A + Aᴴ)/2``, the nearest Hermitian matrix in the
Frobenius norm (the Hermitian matrices are a real subspace, and ``(A − Aᴴ)/2`` is orthogonal to
it for the real inner product ``Re tr(XᴴY)``). On real dtypes it is :class:`Symmetric`, value
for value. Its samples are the Gaussian unitary ensemble.

Layout. The lower triangle of a Flax kernel (in, out) is the upper triangle of torch's weight
(out, in), the triangle torch's usual ``Symmetric`` (``X.triu() + X.triu(1).mT``) reads; so
the original, written to a torch ``state_dict`` in the weight's layout, is the original that
parametrization expects, and the value is the same matrix in both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics

_OWNER = "Symmetric"


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
    x = jnp.swapaxes(x, -1, -2)
    return jnp.conj(x) if jnp.iscomplexobj(x) else x


def with_diagonal(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x`` with its diagonal (last two axes) replaced by ``d`` of shape ``(..., n)``."""
    n = x.shape[-1]
    on = jnp.broadcast_to(jnp.eye(n, dtype=bool), x.shape)
    return jnp.where(on, d.astype(x.dtype)[..., None, :], x)


def standard_normal(key: jax.Array, shape: Any, dtype: Any) -> jax.Array:
    """Standard normal entries; for a complex dtype the real and imaginary parts are each
    N(0, 1), independently (``jax.random.normal`` gives them variance 1/2 each)."""
    if not jnp.issubdtype(dtype, jnp.complexfloating):
        return jax.random.normal(key, tuple(shape), dtype)
    real = jnp.finfo(dtype).dtype
    kr, ki = jax.random.split(key)
    re = jax.random.normal(kr, tuple(shape), real)
    return jax.lax.complex(re, jax.random.normal(ki, tuple(shape), real)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Symmetric:
    """The symmetric-matrix parametrization; register it with :func:`paramx.constraints.symmetric`.

    Attributes:
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[1.0, 0.0], [2.0, 3.0]])}, "kernel", px.constraints.Symmetric())
      >>> px.materialize(tree)["kernel"]
      Array([[1., 1.],
             [1., 3.]], dtype=float32)
    """

    name: str = "symmetric"

    def __post_init__(self) -> None:
        numerics.option_name(_OWNER, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        _check_square(x)
        return jnp.tril(x) + jnp.swapaxes(jnp.tril(x, -1), -1, -2)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        _check_square(value)
        half = jnp.asarray(0.5, value.dtype)
        return jnp.tril((value + jnp.swapaxes(value, -1, -2)) * half)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """The Gaussian orthogonal ensemble: ``(G + Gᵀ)/2`` for a standard normal ``G``, so the
        diagonal is N(0, 1) and each entry above it N(0, 1/2); leading axes of ``shape`` are a
        batch."""
        dtype = jnp.dtype(dtype)
        g = jax.random.normal(key, tuple(shape), numerics.compute_dtype(dtype))
        _check_square(g)
        return ((g + jnp.swapaxes(g, -1, -2)) / 2).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest symmetric matrix, ``‖(X − Xᵀ)/2‖``."""
        _check_square(x)
        d = (x - jnp.swapaxes(x, -1, -2)).astype(numerics.compute_dtype(x.dtype)) / 2
        return jnp.sqrt(jnp.sum(jnp.abs(d) ** 2, axis=(-2, -1)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix equals its transpose, entry by entry, to ``atol`` (default
        ``10·n·eps`` times the largest entry, at least 1)."""
        _check_square(x)
        if atol is None:
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=(-2, -1)), 1)
            atol = 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps) * scale
        gap = jnp.max(jnp.abs(x - jnp.swapaxes(x, -1, -2)), axis=(-2, -1))
        return gap <= atol

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "symmetric"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a symmetric matrix, in place.

    Registers :class:`paramx.constraints.Symmetric`: the original (an ``nnx.Param``) holds the lower
    triangle, and the value is its mirror image. Registration and assignment replace a value
    by its symmetric part ``(A + Aᵀ)/2``.

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
      >>> layer = pnx.symmetric(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> bool(jnp.allclose(layer.kernel, layer.kernel.T))
      True
    """


def symmetric(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.Symmetric`: the selected square matrices become
    symmetric.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
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
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3))
      >>> tree = px.constraints.symmetric({"kernel": kernel}, "kernel")
      >>> k = px.materialize(tree)["kernel"]
      >>> bool(jnp.array_equal(k, k.T)), bool(jnp.allclose(k, (kernel + kernel.T) / 2))
      (True, True)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Symmetric(), batch_axes=batch_axes)


_HERMITIAN = "Hermitian"


@dataclasses.dataclass(frozen=True)
class Hermitian:
    """The Hermitian-matrix parametrization (``A = Aᴴ``); register it with :func:`hermitian`.

    The complex analogue of :class:`Symmetric`, and the same parametrization on real dtypes.
    On a Flax Dense kernel ``(n, n)`` the kernel is one Hermitian matrix (so is torch's weight,
    its transpose); on a conv kernel ``(*spatial, n, n)`` each spatial tap is one; leading axes
    are a stack. The original's strict lower triangle and the real part of its diagonal are
    learned; the upper triangle and the imaginary part of the diagonal get no gradient.

    Attributes:
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.symmetric import Hermitian
      >>> a = jnp.array([[1 + 1j, 5j], [2 + 3j, 4]], jnp.complex64)
      >>> tree = px.register_parametrization({"kernel": a}, "kernel", Hermitian())
      >>> # registration keeps the Hermitian part (a + aᴴ)/2 of the value
      >>> px.materialize(tree)["kernel"]
      Array([[1.+0.j, 1.+1.j],
             [1.-1.j, 4.+0.j]], dtype=complex64)
    """

    name: str = "hermitian"

    def __post_init__(self) -> None:
        numerics.option_name(_HERMITIAN, self.name)

    def forward(self, x: jax.Array) -> jax.Array:
        _check_square(x, _HERMITIAN)
        low = jnp.tril(x, -1)
        return with_diagonal(low + _mH(low), jnp.real(jnp.diagonal(x, axis1=-2, axis2=-1)))

    def right_inverse(self, value: jax.Array) -> jax.Array:
        """The lower triangle of the Hermitian part ``(A + Aᴴ)/2``: exact on Hermitian
        matrices, and otherwise the nearest Hermitian matrix in the Frobenius norm."""
        _check_square(value, _HERMITIAN)
        half = jnp.asarray(0.5, value.dtype)
        return jnp.tril((value + _mH(value)) * half)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """The Gaussian unitary ensemble (complex dtypes): ``(G + Gᴴ)/2`` with the real and
        imaginary parts of ``G`` standard normal, so the density is proportional to
        ``exp(−tr(H²)/2)``: the diagonal is N(0, 1) and real, each entry above it has
        independent N(0, 1/2) real and imaginary parts, and the law is invariant under
        ``H -> U H Uᴴ`` for every unitary ``U``. For real dtypes it is :class:`Symmetric`'s
        Gaussian orthogonal ensemble. Leading axes of ``shape`` are a batch.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.symmetric import Hermitian
          >>> h = Hermitian().sample(jax.random.key(0), (2, 3, 3), jnp.complex64)
          >>> Hermitian().in_manifold(h)
          Array([ True,  True], dtype=bool)
        """
        dtype = jnp.dtype(dtype)
        numerics.check_dtype(jax.ShapeDtypeStruct((), dtype), _HERMITIAN)
        g = standard_normal(key, tuple(shape), numerics.compute_dtype(dtype))
        _check_square(g, _HERMITIAN)
        return ((g + _mH(g)) / 2).astype(dtype)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest Hermitian matrix, ``‖(X − Xᴴ)/2‖``."""
        _check_square(x, _HERMITIAN)
        d = (x - _mH(x)).astype(numerics.compute_dtype(x.dtype)) / 2
        return jnp.sqrt(jnp.sum(jnp.abs(d) ** 2, axis=(-2, -1)))

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix equals its conjugate transpose, entry by entry, to ``atol``
        (default ``10·n·eps`` times the largest entry, at least 1)."""
        _check_square(x, _HERMITIAN)
        if atol is None:
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=(-2, -1)), 1)
            atol = 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps) * scale
        gap = jnp.max(jnp.abs(x - _mH(x)), axis=(-2, -1))
        return gap <= atol

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "hermitian"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a Hermitian matrix (``Xᴴ = X``), in place.

    Registers ``Hermitian``: the original (an ``nnx.Param``) holds the strict lower triangle
    and the real diagonal, and the value is ``L + Lᴴ + diag``. Registration and assignment
    replace a value by its Hermitian part ``(A + Aᴴ)/2``. On a real kernel it is ``symmetric``.

    Args:
      module: The module (``nnx.Linear(n, n, param_dtype=jnp.complex64)``, ...).
      name: The attribute to constrain.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from paramx._src.integrations.nnx.wrappers import torch_function
      >>> from paramx._src.parametrizations.symmetric import Hermitian
      >>> hermitian = torch_function(Hermitian)  # paramx.nnx.hermitian
      >>> layer = nnx.Linear(3, 3, param_dtype=jnp.complex64, rngs=nnx.Rngs(0))
      >>> layer = hermitian(layer)
      >>> bool(jnp.allclose(layer.kernel, layer.kernel.conj().T))
      True
    """


def hermitian(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`Hermitian`: the selected square matrices become Hermitian (``A = Aᴴ``;
    symmetric for real dtypes).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
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
      >>> from paramx._src.parametrizations.symmetric import hermitian
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3), jnp.complex64)
      >>> tree = hermitian({"kernel": kernel}, "kernel")
      >>> k = px.materialize(tree)["kernel"]
      >>> bool(jnp.array_equal(k, k.conj().T))
      True
      >>> bool(jnp.allclose(k, (kernel + kernel.conj().T) / 2))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Hermitian(), batch_axes=batch_axes)
