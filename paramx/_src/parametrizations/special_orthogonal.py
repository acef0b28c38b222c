"""`special_orthogonal`: square real matrices Q with QᵀQ = I and det Q = +1, the group SO(n).

geotorch's ``SO``. A trivialization with its base kept as state, as :class:`paramx.Orthogonal`:
the value is ``base @ expm(A)`` with ``A = L - Lᵀ`` for the strictly lower triangle ``L`` of the
original (only that triangle is learned), followed by one Newton-Schulz step that removes
rounding (the identity on SO(n)). ``expm`` of a skew matrix lies in SO(n), so the value stays
in the connected component of its base: a rotation never becomes a reflection.

``right_inverse`` (registration and assignment) sets the base and puts the original at the
chart's centre, 0:

* a value already in SO(n) (every entry of ``|QᵀQ - I|`` at most ``10·n·eps`` and ``det > 0``)
  becomes the base as it is, so it comes back to rounding (the final Newton-Schulz step
  changes it by at most a few ``eps``);
* any other value is replaced by its nearest point of SO(n) in the Frobenius norm (see
  :meth:`SpecialOrthogonal.nearest`): with the SVD ``X = U Σ Vᵀ``, it is
  ``U diag(1, ..., 1, det(U Vᵀ)) Vᵀ``, the orthogonal polar factor ``U Vᵀ`` when ``det X > 0``.
  That point is unique unless ``det(U Vᵀ) = -1`` and the two smallest singular values are equal,
  or two singular values are 0 (e.g. a reflection, or the zero matrix: every rotation is then
  equally far). On concrete values such a tie raises a ValueError naming the path
  (``check_value``, which the core runs eagerly before it traces anything: also for a stack
  registered with ``batch_axes`` and for ``paramx.nnx``'s compiled registration and
  assignment); only inside a user's own ``jax.jit`` / ``jax.vmap`` the check cannot run, and the
  formula's point, one of the nearest, is used.

:meth:`SpecialOrthogonal.update_base` re-centres the chart (dynamic trivialization).

Layouts. On a Flax Dense kernel (in, out) with in = out, the kernel is a rotation of feature
space (x ↦ x K, K ∈ SO(n)); on a conv kernel (*spatial, in, out) with in = out, each spatial
tap is a rotation of channel space. Non-square kernels are refused: use
:class:`paramx.Orthogonal` (the Stiefel manifold; its components are not separated, as there is
no determinant).

Complex dtypes are refused: the unitary group U(n) is :class:`paramx.Orthogonal` on a complex
tensor (its value satisfies QᴴQ = I and its ``sample`` is Haar on U(n)); SU(n) is not offered.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import linalg, numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state
from paramx._src.parametrizations.orthogonal import Orthogonal

_OWNER = "SpecialOrthogonal"


def _check(x: Any) -> None:
    numerics.check_dtype(
        x,
        _OWNER,
        complex_ok=False,
        hint="For unitary matrices register paramx.Orthogonal() on the complex tensor.",
    )
    if len(x.shape) < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{_OWNER} needs a square matrix in the last two axes (or a stack of them); got "
            f"shape {list(x.shape)}. Register it on a square kernel (a Dense(n) kernel on n "
            f"features, a conv kernel with as many input as output channels), or use "
            f"paramx.orthogonal for a rectangular one."
        )


def _eye(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    return jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), x.shape)


def _nearest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The nearest point of SO(n) to each (square, real) ``x``, and whether it is unique."""
    u, s, vt = numerics.lapack(jnp.linalg.svd, x)
    # ±1: U, V are orthogonal
    sign = jnp.sign(numerics.lapack(jnp.linalg.det, u) * numerics.lapack(jnp.linalg.det, vt))
    sign = jnp.where(sign == 0, jnp.ones_like(sign), sign)
    ones = jnp.ones(s.shape, s.dtype)
    d = ones.at[..., -1].set(sign)
    q = matmul(u * d[..., None, :], vt)
    n = x.shape[-1]
    if n < 2:
        return q, jnp.ones(x.shape[:-2], bool)
    tol = 10 * n * float(jnp.finfo(x.dtype).eps) * jnp.maximum(s[..., 0], 1)
    gap = s[..., -2] + sign * s[..., -1]  # σ₂ + σ₁ when det(UVᵀ) = 1, σ₂ - σ₁ otherwise
    return q, gap > tol


@dataclasses.dataclass(frozen=True)
class SpecialOrthogonal:
    """The special orthogonal group SO(n); register it with
    :func:`paramx.constraints.special_orthogonal`.

    The value is ``base @ expm(L - Lᵀ)`` (``L`` the strictly lower triangle of the original)
    with the rotation ``base`` kept as state; see the module docstring for registration,
    projection and layouts.

    Attributes:
      name: The display name.

    Raises:
      ValueError, TypeError: At registration, for a tensor that is not square in its last two
        axes, an integer, boolean or complex tensor, or a value with no unique nearest
        rotation (e.g. a reflection).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal
      >>> w = jax.random.normal(jax.random.key(0), (3, 3))
      >>> tree = px.register_parametrization({"w": w}, "w", SpecialOrthogonal())
      >>> q = px.materialize(tree)["w"]
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5)), round(float(jnp.linalg.det(q)), 4)
      (True, 1.0)
    """

    name: str = "special_orthogonal"

    def __post_init__(self) -> None:
        numerics.option_name(_OWNER, self.name)

    # ----- the parametrization protocol ----------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        _check(value)
        return None, {"base": self._base(value)}

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        _check(x)
        if state is None:
            raise missing_state("special_orthogonal", "the base")
        if x.size == 0:
            return x
        dtype = x.dtype
        x = x.astype(compute_dtype(dtype))
        low = jnp.tril(x, -1)
        q = matmul(state["base"].astype(x.dtype), linalg.expm_skew(low - jnp.matrix_transpose(low)))
        return numerics.polish(q).astype(dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Base = ``value`` if it is in SO(n), else its nearest rotation; the original = 0."""
        _check(value)
        base = None if state is None else state.get("base")
        if base is not None and (
            value.shape[:-2] != base.shape[:-2] or value.shape[-1] != base.shape[-1]
        ):
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape "
                f"{tuple(base.shape)}, the registered tensor's shape; got "
                f"{tuple(value.shape)}. Assign a value of the tensor's own shape."
            )
        self.check_value(value)
        return jnp.zeros_like(value), {"base": self._base(value)}

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` (any matrix of a stack) has no unique
        nearest rotation and is not one already; does nothing for a traced one (under ``jit`` /
        ``vmap``), where one of the nearest rotations is used. The core runs it before it traces
        anything, so stacks registered with ``batch_axes`` and ``paramx.nnx`` are checked too."""
        _check(value)
        if isinstance(value, jax.core.Tracer | jax.ShapeDtypeStruct) or value.size == 0:
            return
        q = value.astype(compute_dtype(value.dtype))
        _, unique = _nearest(q)
        if not bool(jnp.all(unique | self._member(q))):
            raise ValueError(
                f"{_OWNER}: the value has no unique nearest rotation (it is a reflection, or "
                f"its two smallest singular values tie with det(UVᵀ) = -1, or it has two zero "
                f"singular values), so right_inverse cannot project it onto SO(n). Flip the "
                f"sign of one column to make det > 0, or initialize with "
                f"SpecialOrthogonal().sample (paramx.sampler)."
            )

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization: the base becomes the current value (a rotation, projected
        back onto SO(n) if rounding moved it) and the original 0, so the value is kept."""
        value = self.forward(x, params=params, state=state)
        return self.right_inverse(value, params=params, state=state)

    # ----- projection ------------------------------------------------------------------------
    def nearest(self, x: jax.Array) -> jax.Array:
        """The nearest rotation to each matrix of ``x`` in the Frobenius norm:
        ``U diag(1, ..., 1, det(UVᵀ)) Vᵀ`` for the SVD ``x = U Σ Vᵀ`` (the polar factor
        ``UVᵀ`` when ``det x > 0``). Where it is not unique (see the module docstring), one of
        the nearest. Computed in float32 for narrower dtypes; returns ``x``'s dtype.

        Examples:
          >>> import jax.numpy as jnp
          >>> from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal
          >>> SpecialOrthogonal().nearest(jnp.diag(jnp.array([2.0, -0.5])))
          Array([[1., 0.],
                 [0., 1.]], dtype=float32)
        """
        _check(x)
        if x.size == 0:
            return x
        return _nearest(x.astype(compute_dtype(x.dtype)))[0].astype(x.dtype)

    def _base(self, value: jax.Array) -> jax.Array:
        dtype = compute_dtype(value.dtype)
        q = value.astype(dtype)
        if q.size == 0:
            return q
        near, _ = _nearest(q)
        keep = self._member(q)[..., None, None]
        return jnp.where(keep, q, near)

    @staticmethod
    def _member(q: jax.Array, atol: Any = None) -> jax.Array:
        n = q.shape[-1]
        if atol is None:
            atol = 10 * n * float(jnp.finfo(q.dtype).eps)
        gram = matmul(jnp.matrix_transpose(q), q) - _eye(q)
        ok = jnp.max(jnp.abs(gram), axis=(-2, -1), initial=0.0) <= atol
        return ok & (numerics.lapack(jnp.linalg.det, q) > 0)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(
        self,
        key: jax.Array,
        shape: Any,
        dtype: Any = jnp.float32,
        distribution: str = "uniform",
    ) -> jax.Array:
        """Rotations of ``shape`` (leading axes a batch). ``"uniform"``: the Haar measure on
        SO(n), a Haar matrix of O(n) (:meth:`paramx.Orthogonal.sample`) with its first column
        negated where its determinant is -1 (the map commutes with rotating on the left, so it
        carries Haar to Haar). ``"torus"``: 2 x 2 rotation blocks with angles uniform on
        [-pi, pi) down the diagonal (geotorch's "torus"), already in SO(n).

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal
          >>> q = SpecialOrthogonal().sample(jax.random.key(0), (5, 3, 3))
          >>> SpecialOrthogonal().in_manifold(q)
          Array([ True,  True,  True,  True,  True], dtype=bool)
          >>> bool(jnp.all(jnp.linalg.det(q) > 0))
          True
        """
        shape, dtype = tuple(shape), jnp.dtype(dtype)
        _check(jax.ShapeDtypeStruct(shape, dtype))
        q = Orthogonal().sample(key, shape, compute_dtype(dtype), distribution)
        if distribution == "uniform" and shape[-1] > 0:
            det = numerics.lapack(jnp.linalg.det, q)
            first = jnp.where(det < 0, -1.0, 1.0).astype(q.dtype)
            q = q.at[..., :, 0].multiply(first[..., None])
        return q.astype(dtype)

    def in_manifold(self, x: jax.Array, atol: float | None = None) -> jax.Array:
        """Whether each matrix is a rotation: every entry of ``|XᵀX - I|`` at most ``atol``
        (default ``10·n·eps`` of ``x``'s dtype) and ``det X > 0``. One bool per matrix."""
        _check(x)
        if atol is None:
            atol = 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps)
        return self._member(x.astype(compute_dtype(x.dtype)), atol)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest rotation, ``‖Σ - diag(1, ..., 1, det(UVᵀ))‖``
        for the SVD ``x = U Σ Vᵀ``; 0 on SO(n)."""
        _check(x)
        if x.shape[-1] == 0:  # SO(0) is one point, the empty matrix
            return jnp.zeros(x.shape[:-2], compute_dtype(x.dtype))
        u, s, vt = numerics.lapack(jnp.linalg.svd, x.astype(compute_dtype(x.dtype)))
        sign = jnp.sign(numerics.lapack(jnp.linalg.det, u) * numerics.lapack(jnp.linalg.det, vt))
        target = jnp.ones(s.shape, s.dtype).at[..., -1].set(jnp.where(sign == 0, 1, sign))
        return jnp.sqrt(jnp.sum(jnp.square(s - target), axis=-1))

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "special_orthogonal"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a rotation (a matrix of SO(n)), in place.

    Registers :class:`paramx.constraints.SpecialOrthogonal` (geotorch's ``SO``): the original (an
    ``nnx.Param``) is the skew chart's coordinates, the rotation ``base`` is state.
    Registration and assignment keep a rotation as it is and replace any other value by its
    nearest rotation (a reflection, with no unique nearest rotation, is refused).

    Args:
      module: The module (``nnx.Linear(n, n)``, a conv with as many input as output channels).
      name: The attribute to constrain.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.special_orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> k = layer.kernel
      >>> bool(jnp.allclose(k.T @ k, jnp.eye(3), atol=1e-5)), bool(jnp.linalg.det(k) > 0)
      (True, True)
    """


def special_orthogonal(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.SpecialOrthogonal`: the selected square matrices become
    rotations (orthogonal, determinant +1).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square, or has no unique nearest rotation.
      TypeError: If it is an integer, boolean or complex tensor.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.special_orthogonal import special_orthogonal
      >>> kernel = jax.random.normal(jax.random.key(1), (3, 3))
      >>> q = px.materialize(special_orthogonal({"kernel": kernel}, "kernel"))["kernel"]
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5)), bool(jnp.linalg.det(q) > 0)
      (True, True)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, SpecialOrthogonal(), batch_axes=batch_axes)
