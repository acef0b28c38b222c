"""`grassmannian`: k-dimensional subspaces of Rⁿ, each held by an orthonormal frame.

geotorch's ``Grassmannian``. A point of the Grassmannian Gr(n, k) is a subspace; the value is an
``n x k`` frame ``Q`` with orthonormal columns that spans it (``QᵀQ = I``), read in
:class:`paramx.Orthogonal`'s orientation: a strictly tall matrix holds the frame in its columns,
a wide one in its rows (a Flax kernel ``(in, out)`` with ``in <= out`` is read transposed), and
leading axes are a batch. The subspace is what the parametrization learns: a loss should depend
on it only, e.g. through the projector ``Q Qᵀ``, since the map reaches every subspace but not
every frame of it.

Trivialization on the horizontal space. On the tall orientation ``X`` (``n x k``), the bottom
``(n - k) x k`` block ``B`` of the original gives the skew matrix ``A = [[0, -Bᵀ], [B, 0]]``, and
the value is ``base · exp(A)[:, :k]`` (``triv="cayley"``: the Cayley map), followed by one
Newton-Schulz step that removes rounding. ``base`` is an ``n x n`` orthogonal matrix kept as
state, whose first ``k`` columns are the frame at the chart's centre. ``A`` is orthogonal to the
skew matrices that rotate the frame within its own span (the vertical ones, ``[[C, 0], [0, D]]``),
so ``B`` moves the subspace along the Grassmannian's geodesics from ``base``'s: ``exp(A)[:, :k]``
is ``[[cos Θ], [sin Θ]]`` in the principal vectors of ``B`` (Θ its singular values, the principal
angles), and every subspace is reached, with ``n·k - k²`` coordinates, the Grassmannian's
dimension. The top ``k x k`` block of the original is not used (it gets no gradient). For
``k = n`` the Grassmannian is one point: the value stays the registered orthogonal matrix.

``right_inverse`` (registration and assignment) sets ``base`` and puts the original at 0. A frame
with orthonormal columns (every entry of ``|QᵀQ - I|`` at most ``10·n·eps``) is kept as it is, so
it comes back exactly; any other value is replaced by its nearest frame in the Frobenius norm,
the polar factor ``U Vᵀ`` of its SVD ``U Σ Vᵀ`` (:meth:`Grassmannian.nearest`), which spans the
same subspace (its column space). The nearest frame is unique when the matrix has full rank; a
concrete rank-deficient value (e.g. a zero matrix) spans no k-dimensional subspace and is refused
with a ValueError naming the path (:meth:`Grassmannian.check_value`, run eagerly by the core);
inside a user's own ``jit`` / ``vmap`` no check runs and one of the nearest frames is used.
:meth:`Grassmannian.update_base` re-centres the chart (dynamic trivialization).

Layouts. On a Flax Dense kernel ``(in, out)`` with ``in > out``, the kernel's columns are an
orthonormal basis of an ``out``-dimensional subspace of the input space; with ``in < out``, its
rows are one of an ``in``-dimensional subspace of the output space. On a conv kernel
``(*spatial, in, out)`` each spatial tap's ``(in, out)`` matrix is one such frame. bfloat16 and
float16 compute in float32; every matrix product runs at full precision.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import linalg, numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state
from paramx._src.parametrizations.orthogonal import (
    Orthogonal,
    _flip,
    _is_orthogonal,
)

_OWNER = "Grassmannian"
_TRIVS = ("expm", "cayley")


def _check(x: Any) -> None:
    numerics.check_dtype(x, _OWNER, complex_ok=False)
    if len(x.shape) < 2:
        raise ValueError(
            f"{_OWNER} needs a matrix (or a stack of matrices in the last two axes); got shape "
            f"{list(x.shape)}. Register it on a kernel, not on a bias or a scalar."
        )


def _tall(x: jax.Array) -> tuple[jax.Array, bool]:
    flip = _flip(x)
    return (jnp.matrix_transpose(x) if flip else x), flip


def _horizontal(t: jax.Array) -> jax.Array:
    """``[[0, -Bᵀ], [B, 0]]`` (``n x n``) from the bottom block ``B`` of the tall ``t``."""
    n, k = t.shape[-2:]
    b = t[..., k:, :]
    batch = t.shape[:-2]
    top = jnp.concatenate([jnp.zeros((*batch, k, k), t.dtype), -jnp.matrix_transpose(b)], axis=-1)
    bottom = jnp.concatenate([b, jnp.zeros((*batch, n - k, n - k), t.dtype)], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


def _frame_and_complement(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The polar factor of each tall ``t`` (or ``t`` itself where its columns are orthonormal)
    and the ``n x n`` orthogonal matrix whose first ``k`` columns are it."""
    k = t.shape[-1]
    u, _, vt = numerics.lapack(jnp.linalg.svd, t, full_matrices=True)
    polar = matmul(u[..., :k], vt)
    frame = jnp.where(_is_orthogonal_each(t)[..., None, None], t, polar)
    return frame, jnp.concatenate([frame, u[..., k:]], axis=-1)


def _is_orthogonal_each(t: jax.Array) -> jax.Array:
    """Orthogonal._is_orthogonal, one bool per matrix of a batch."""
    if t.ndim == 2:
        return _is_orthogonal(t)
    flat = t.reshape(-1, *t.shape[-2:])
    return jax.vmap(_is_orthogonal)(flat).reshape(t.shape[:-2])


@dataclasses.dataclass(frozen=True)
class Grassmannian:
    """The Grassmannian: k-dimensional subspaces of Rⁿ held by orthonormal frames; register it
    with :func:`paramx.constraints.grassmannian`.

    The value is ``base · exp([[0, -Bᵀ], [B, 0]])[:, :k]`` with ``B`` the bottom block of the
    (tall) original and the orthogonal ``base`` kept as state; see the module docstring for the
    chart, the projection and the layouts.

    Attributes:
      triv: The map from skew matrices to orthogonal ones: ``"expm"`` (the default, as geotorch)
        or ``"cayley"``.
      name: The display name.

    Raises:
      ValueError, TypeError: At construction, for an unknown ``triv``; at registration, for a
        tensor of fewer than 2 dimensions, an integer, boolean or complex tensor, or a
        rank-deficient value.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.grassmannian import Grassmannian
      >>> w = jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # spans the first two axes of R³
      >>> tree = px.register_parametrization({"w": w}, "w", Grassmannian())
      >>> px.materialize(tree)["w"]
      Array([[1., 0.],
             [0., 1.],
             [0., 0.]], dtype=float32)
    """

    triv: str = "expm"
    name: str = "grassmannian"

    def __post_init__(self) -> None:
        if not isinstance(self.triv, str) or self.triv not in _TRIVS:
            error = ValueError if isinstance(self.triv, str) else TypeError
            raise error(f'{_OWNER}: triv has to be "expm" or "cayley"; got {self.triv!r}.')
        numerics.option_name(_OWNER, self.name)

    def _map(self, a: jax.Array) -> jax.Array:
        return (linalg.expm_skew if self.triv == "expm" else linalg.cayley)(a)

    def _rotation(self, t: jax.Array, state: Any) -> jax.Array:
        """``base · map(A)`` (``n x n``) for the tall coordinates ``t``."""
        return matmul(state["base"].astype(t.dtype), self._map(_horizontal(t)))

    def _check_shape(self, value: Any, state: Any) -> None:
        base = None if state is None else state.get("base")
        if base is None:
            return
        if (
            tuple(value.shape[:-2]) != tuple(base.shape[:-2])
            or max(value.shape[-2:]) != (base.shape[-1])
        ):
            raise ValueError(
                f"{_OWNER}: expected a matrix or batch of matrices of the registered tensor's "
                f"shape (batch {tuple(base.shape[:-2])}, {base.shape[-1]} x k or k x "
                f"{base.shape[-1]}); got {tuple(value.shape)}. Assign a value of the tensor's "
                f"own shape."
            )

    # ----- the parametrization protocol ----------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        """An identity base of the right shape; ``right_inverse`` sets it from the value."""
        _check(value)
        n = max(value.shape[-2:])
        eye = jnp.eye(n, dtype=compute_dtype(value.dtype))
        return None, {"base": jnp.broadcast_to(eye, (*value.shape[:-2], n, n))}

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        _check(x)
        if state is None:
            raise missing_state("grassmannian", "the base")
        if x.size == 0:
            return x
        dtype = x.dtype
        t, flip = _tall(x.astype(compute_dtype(dtype)))
        q = numerics.polish(self._rotation(t, state)[..., : t.shape[-1]])
        return (jnp.matrix_transpose(q) if flip else q).astype(dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Base from ``value`` (kept if its columns are orthonormal, else its polar factor), the
        original 0."""
        _check(value)
        self._check_shape(value, state)
        if value.size == 0:
            return jnp.zeros_like(value), self.init(value, jax.random.key(0))[1]
        t, _ = _tall(value.astype(compute_dtype(value.dtype)))
        _, base = _frame_and_complement(t)
        return jnp.zeros_like(value), {"base": base}

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` (any matrix of a stack) is rank deficient:
        it spans no k-dimensional subspace and has no unique nearest frame. Does nothing for a
        traced value (under ``jit`` / ``vmap``), where one of the nearest frames is used."""
        _check(value)
        if isinstance(value, jax.core.Tracer | jax.ShapeDtypeStruct) or value.size == 0:
            return
        t = value.astype(compute_dtype(value.dtype))
        s = numerics.lapack(jnp.linalg.svd, t, compute_uv=False)
        tol = max(t.shape[-2:]) * float(jnp.finfo(t.dtype).eps) * s[..., 0]
        if bool(jnp.any(s[..., -1] <= tol)):
            raise ValueError(
                f"{_OWNER}: the value is rank deficient (e.g. a zero matrix), so it spans no "
                f"{min(t.shape[-2:])}-dimensional subspace and has no unique nearest orthonormal "
                f"frame. Initialize the kernel with a full-rank value, e.g. "
                f"paramx.sampler(Grassmannian()) or an orthogonal initializer."
            )

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization: the base becomes ``base · map(A)``, whose first ``k`` columns
        are the current value, and the original 0, so the value is unchanged (to rounding). No
        SVD runs."""
        _check(x)
        if x.size == 0:
            return x, state
        t, _ = _tall(x.astype(compute_dtype(x.dtype)))
        return jnp.zeros_like(x), {"base": numerics.polish(self._rotation(t, state))}

    # ----- projection ------------------------------------------------------------------------
    def nearest(self, x: jax.Array) -> jax.Array:
        """The nearest frame (orthonormal columns of the tall orientation) to each matrix of
        ``x`` in the Frobenius norm: the polar factor ``U Vᵀ`` of the SVD ``x = U Σ Vᵀ``, which
        spans the same subspace. Where it is not unique (a rank-deficient ``x``), one of the
        nearest. Computed in float32 for narrower dtypes; returns ``x``'s dtype.

        Examples:
          >>> import jax.numpy as jnp
          >>> from paramx._src.parametrizations.grassmannian import Grassmannian
          >>> Grassmannian().nearest(jnp.array([[3.0], [4.0]]))
          Array([[0.6],
                 [0.8]], dtype=float32)
        """
        _check(x)
        if x.size == 0:
            return x
        t, flip = _tall(x.astype(compute_dtype(x.dtype)))
        u, _, vt = numerics.lapack(jnp.linalg.svd, t, full_matrices=False)
        q = matmul(u, vt)
        return (jnp.matrix_transpose(q) if flip else q).astype(x.dtype)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(
        self,
        key: jax.Array,
        shape: Any,
        dtype: Any = jnp.float32,
        distribution: str = "uniform",
    ) -> jax.Array:
        """Frames of ``shape`` (leading axes a batch), in ``forward``'s orientation.

        ``"uniform"`` (the default): a Haar frame (:meth:`paramx.Orthogonal.sample`), whose span
        is uniform on the Grassmannian (the law invariant under rotations of Rⁿ): the projector
        ``P = QQᵀ`` has mean ``(k/n)·I``, and ``tr(P P₀)`` for a fixed rank-``l`` projector
        ``P₀`` has mean ``kl/n`` and variance ``2kl(n-k)(n-l) / (n²(n-1)(n+2))``. ``"torus"``:
        geotorch's second choice, the first ``k`` columns of a matrix of 2 x 2 rotation blocks
        with angles uniform on ``[-pi, pi)``.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.grassmannian import Grassmannian
          >>> q = Grassmannian().sample(jax.random.key(0), (2, 5, 3))
          >>> Grassmannian().in_manifold(q)
          Array([ True,  True], dtype=bool)
        """
        shape, dtype = tuple(shape), jnp.dtype(dtype)
        _check(jax.ShapeDtypeStruct(shape, dtype))
        if distribution not in ("uniform", "torus"):
            raise ValueError(
                f'{_OWNER}.sample: distribution must be "uniform" (Haar) or "torus"; got '
                f"{distribution!r}."
            )
        return Orthogonal().sample(key, shape, dtype, distribution)

    def in_manifold(self, x: jax.Array, atol: float | None = None) -> jax.Array:
        """Whether each matrix is a frame: orthonormal columns when it is strictly tall,
        orthonormal rows otherwise (every entry of ``|QᵀQ - I|`` at most ``atol``, default
        ``10·n·eps`` of ``x``'s dtype, n the larger dimension). One bool per matrix."""
        _check(x)
        return Orthogonal().in_manifold(x, atol)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest frame (:meth:`nearest`), ``‖Σ - I‖`` over the
        singular values of ``x``; 0 on the set."""
        _check(x)
        return Orthogonal().distance(x)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "grassmannian"
    torch_function_positional = ()
    torch_function_keyword = ("triv",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` an orthonormal frame of a learned subspace, in place.

    Registers :class:`paramx.constraints.Grassmannian` (geotorch's ``Grassmannian``): the
    original (an ``nnx.Param`` of the kernel's shape) holds the horizontal coordinates, the
    orthogonal ``base`` is state. A strictly tall kernel gets orthonormal columns, any other
    orthonormal rows. Registration and assignment keep a frame as it is and replace any other
    value by its polar factor, the nearest frame, which spans the same subspace; a
    rank-deficient value is refused.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      triv: ``"expm"`` (default) or ``"cayley"``.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.grassmannian(nnx.Linear(5, 2, rngs=nnx.Rngs(0)))
      >>> k = layer.kernel
      >>> bool(jnp.allclose(k.T @ k, jnp.eye(2), atol=1e-5))
      True
    """


def grassmannian(tree: Any, where: Any, *, triv: str = "expm", batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.Grassmannian`: each selected matrix becomes an
    orthonormal frame of a learned subspace; geotorch's ``Grassmannian``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      triv: ``"expm"`` (the default) or ``"cayley"``.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: For a tensor of fewer than 2 dimensions, an unknown ``triv`` or a
        rank-deficient value.
      TypeError: For an integer, boolean or complex tensor.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.grassmannian import grassmannian
      >>> kernel = jax.random.normal(jax.random.key(0), (5, 2))  # a Dense(2) kernel on 5 inputs
      >>> q = px.materialize(grassmannian({"kernel": kernel}, "kernel"))["kernel"]
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
      True
      >>> p, p0 = q @ q.T, kernel @ jnp.linalg.pinv(kernel)  # the same subspace
      >>> bool(jnp.allclose(p, p0, atol=1e-5))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Grassmannian(triv), batch_axes=batch_axes)
