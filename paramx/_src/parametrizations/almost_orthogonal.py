"""`almost_orthogonal`: matrices whose singular values lie in ``[1 - lam, 1 + lam]``.

geotorch's ``almost_orthogonal(lam, f="sin")``. The value of an ``(n, k)`` matrix (tall or wide;
leading axes are a batch) is ``U diag(1 + lam·f(s)) Vᵀ`` with ``U`` of orthonormal columns,
``V`` orthogonal and ``f`` a function onto ``[-1, 1]`` (``sin``) or ``(-1, 1)`` (``tanh``,
``scaled_sigmoid``), so every singular value ``1 + lam·f(s_i)`` lies in the interval: the
operator ``x ↦ x W`` stretches no direction by more than ``1 + lam`` nor shrinks one by more than
``1 - lam`` (``lam = 0`` is the orthogonal matrices, ``lam = 1`` every matrix of spectral norm
at most 2).

Coordinates. paramx works on the tall orientation ``X`` (``n >= k``) of the original, with
:class:`paramx.Orthogonal`'s rule: a Flax kernel ``(in, out)`` with ``in <= out`` is read
transposed. The original has the tensor's own shape and exactly as many entries as the set has
dimensions (``nk``), split three ways:

* the strict lower triangle of ``X``: ``U = base_u · exp(A)[:, :k]``, ``A`` the skew ``n x n``
  matrix of that triangle (Orthogonal's ``matrix_exp`` chart; ``triv="cayley"`` uses the Cayley
  map);
* the strict upper triangle of the top ``k x k`` block: ``V = base_v · exp(B)``, ``B`` its skew
  matrix;
* the diagonal: ``s``.

``base_u`` (``n x n``) and ``base_v`` (``k x k``) are orthogonal matrices kept as state (the
dynamic trivialization of :class:`paramx.Orthogonal`); ``U`` and ``V`` end with one Newton-Schulz
step, which removes rounding and is the identity on the orthogonal matrices.
:meth:`AlmostOrthogonal.update_base` folds the rotations into the bases and keeps ``s``: the
value is unchanged and the orthogonal charts are back at their centre. For a square matrix with
``lam < 1`` the set has two components (``det > 0`` and ``det < 0``); the value stays in its
base's.

``right_inverse`` (registration and assignment) takes the SVD ``X = U Σ Vᵀ``; the bases become
``U`` (completed to ``n x n``) and ``V``, and ``s = f⁻¹((Σ - 1) / lam)``. On the set this is
exact. Off the set it realises :meth:`AlmostOrthogonal.nearest`, the nearest point in the
Frobenius norm: ``U clip(Σ, 1 - lam, 1 + lam) Vᵀ`` (Mirsky's theorem: the singular values of the
difference are at least the differences of the singular values). That point is unique unless
``lam < 1`` and the matrix is rank deficient (a zero singular value has no singular vector to
scale up, e.g. a zero matrix); such concrete values are refused with a ValueError naming the path
(:meth:`AlmostOrthogonal.check_value`, run eagerly by the core); inside a user's own ``jit`` /
``vmap`` no check runs and one of the nearest points is used.

End points. ``tanh`` and ``scaled_sigmoid`` reach ``(-1, 1)`` only, so the end points
``1 ± lam`` have no preimage, and ``sin`` has a critical point there (its derivative vanishes,
so gradient descent could not move such a coordinate). ``right_inverse`` therefore moves
``(Σ - 1) / lam`` inside ``[-(1 - eps), 1 - eps]`` (``eps`` of the dtype it computes in): a
singular value at, or projected to, an end point comes back ``lam·eps`` inside it, below the
rounding of the SVD itself. Its coordinate is then finite (``atanh(1 - eps)`` is about 8.3 in
float32, 18.7 in float64) but ``tanh`` is saturated there, so it learns slowly: initialize inside
the set (:meth:`AlmostOrthogonal.sample`) to train from the interior.

``f`` may also be a callable onto ``[-1, 1]``, or a pair ``(f, f_inverse)`` as in geotorch. A
lone callable has no inverse, so registration and assignment raise a ValueError: pass the pair.

Layouts. On a Flax Dense kernel ``(in, out)`` the singular values of the kernel, i.e. the
factors by which the layer stretches its inputs, lie in ``[1 - lam, 1 + lam]``; on a conv kernel
``(*spatial, in, out)`` that holds for each spatial tap's ``(in, out)`` matrix (not for the
convolution operator). bfloat16 and float16 compute in float32; every matrix product runs at
full precision.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import linalg, numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state
from paramx._src.parametrizations.orthogonal import Orthogonal, _flip

_OWNER = "AlmostOrthogonal"
_TRIVS = ("expm", "cayley")


def _scaled_sigmoid(x: jax.Array) -> jax.Array:
    """``2·sigmoid(x) - 1``, computed as the equal ``tanh(x / 2)`` (exact near 0)."""
    return jnp.tanh(x / 2)


def _scaled_sigmoid_inverse(y: jax.Array) -> jax.Array:
    return 2 * jnp.arctanh(y)


_FS: dict[str, tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]] = {
    "sin": (jnp.sin, jnp.arcsin),
    "tanh": (jnp.tanh, jnp.arctanh),
    "scaled_sigmoid": (_scaled_sigmoid, _scaled_sigmoid_inverse),
}


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


def _diag_embed(d: jax.Array, n: int) -> jax.Array:
    """The ``(n, k)`` matrix with ``d`` (``(..., k)``) on its diagonal and zeros elsewhere."""
    k = d.shape[-1]
    idx = jnp.arange(k)
    return jnp.zeros((*d.shape[:-1], n, k), d.dtype).at[..., idx, idx].set(d)


def _rank_deficient(t: jax.Array) -> jax.Array:
    """Whether each matrix has a singular value below ``max(n, k)·eps·σ_max`` (numpy's rank
    tolerance); a zero matrix counts."""
    s = numerics.lapack(jnp.linalg.svd, t, compute_uv=False)
    tol = max(t.shape[-2:]) * float(jnp.finfo(t.dtype).eps) * s[..., 0]
    return s[..., -1] <= tol


@dataclasses.dataclass(frozen=True)
class AlmostOrthogonal:
    """Matrices with singular values in ``[1 - lam, 1 + lam]``; register it with
    :func:`paramx.constraints.almost_orthogonal`.

    The value is ``U diag(1 + lam·f(s)) Vᵀ``; see the module docstring for the coordinates,
    the bases kept as state, the projection and the end points.

    Attributes:
      lam: The radius, a real number in ``[0, 1]``.
      f: ``"sin"`` (the default, as geotorch), ``"tanh"``, ``"scaled_sigmoid"``
        (``2·sigmoid(x) - 1``), a callable onto ``[-1, 1]``, or a pair ``(f, f_inverse)``.
      triv: The map from skew matrices to the orthogonal factors: ``"expm"`` (the default) or
        ``"cayley"``.
      name: The display name.

    Raises:
      ValueError, TypeError: At construction, for ``lam`` outside ``[0, 1]`` or not a real
        number, an unknown ``f`` or ``triv``; at registration, for a tensor of fewer than 2
        dimensions, an integer, boolean or complex tensor, a rank-deficient value (when
        ``lam < 1``), or a lone callable ``f``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal
      >>> w = 3.0 * jnp.diag(jnp.array([1.0, 0.1, 1.0]))  # singular values 3, 3 and 0.3
      >>> tree = px.register_parametrization({"w": w}, "w", AlmostOrthogonal(0.5))
      >>> jnp.round(jnp.linalg.svd(px.materialize(tree)["w"], compute_uv=False), 4)
      Array([1.5, 1.5, 0.5], dtype=float32)
    """

    lam: float
    f: Any = "sin"
    triv: str = "expm"
    name: str = "almost_orthogonal"

    def __post_init__(self) -> None:
        lam = self.lam
        if not isinstance(lam, numbers.Real) or isinstance(lam, bool | jax.Array):
            raise TypeError(
                f"{_OWNER}: lam must be a real number in [0, 1]; got {lam!r} "
                f"({type(lam).__name__}). Pass a Python float such as lam=0.5."
            )
        lam = float(lam)
        if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
            raise ValueError(
                f"{_OWNER}: lam has to be between 0 and 1 (the singular values lie in "
                f"[1 - lam, 1 + lam]); got lam={lam}. Use paramx.orthogonal for lam = 0 exactly "
                f"if you need no slack at all."
            )
        object.__setattr__(self, "lam", lam)
        f = self.f
        if isinstance(f, str):
            if f not in _FS:
                raise ValueError(
                    f'{_OWNER}: f has to be one of "sin", "tanh", "scaled_sigmoid", a callable '
                    f"onto [-1, 1] or a pair (f, f_inverse); got {f!r}."
                )
        elif isinstance(f, tuple):
            if len(f) != 2 or not all(callable(g) for g in f):
                raise TypeError(
                    f"{_OWNER}: a tuple f must be a pair of callables (f, f_inverse); got {f!r}."
                )
        elif not callable(f):
            raise TypeError(
                f'{_OWNER}: f has to be one of "sin", "tanh", "scaled_sigmoid", a callable onto '
                f"[-1, 1] or a pair (f, f_inverse); got {f!r} ({type(f).__name__})."
            )
        if not isinstance(self.triv, str) or self.triv not in _TRIVS:
            error = ValueError if isinstance(self.triv, str) else TypeError
            raise error(f'{_OWNER}: triv has to be "expm" or "cayley"; got {self.triv!r}.')
        numerics.option_name(_OWNER, self.name)

    # ----- helpers -------------------------------------------------------------------------
    def _functions(self) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
        if isinstance(self.f, str):
            return _FS[self.f]
        if isinstance(self.f, tuple):
            return self.f[0], self.f[1]
        return self.f, None

    def _map(self, a: jax.Array) -> jax.Array:
        return (linalg.expm_skew if self.triv == "expm" else linalg.cayley)(a)

    def _rotations(self, t: jax.Array, state: Any) -> tuple[jax.Array, jax.Array]:
        """The full ``n x n`` rotation ``base_u · map(A)`` and ``V = base_v · map(B)`` of the
        tall coordinates ``t``, before their Newton-Schulz step."""
        n, k = t.shape[-2:]
        low = jnp.tril(t, -1)
        if n != k:
            low = jnp.concatenate([low, jnp.zeros((*t.shape[:-1], n - k), t.dtype)], axis=-1)
        up = jnp.triu(t[..., :k, :], 1)
        a, b = low - jnp.matrix_transpose(low), up - jnp.matrix_transpose(up)
        if n == k:  # one call on a stack of two: the same work, half the program to compile
            a, b = self._map(jnp.stack([a, b]))
        else:
            a, b = self._map(a), self._map(b)
        u = matmul(state["base_u"].astype(t.dtype), a)
        v = matmul(state["base_v"].astype(t.dtype), b)
        return u, v

    def _check_shape(self, value: Any, state: Any) -> None:
        base = None if state is None else state.get("base_u")
        if base is None:
            return
        n, k = max(value.shape[-2:]), min(value.shape[-2:])
        if (
            tuple(value.shape[:-2]) != tuple(base.shape[:-2])
            or n != base.shape[-1]
            or (k != state["base_v"].shape[-1])
        ):
            raise ValueError(
                f"{_OWNER}: expected a matrix or batch of matrices of the registered tensor's "
                f"shape (batch {tuple(base.shape[:-2])}, matrices {base.shape[-1]} x "
                f"{state['base_v'].shape[-1]} in either orientation); got "
                f"{tuple(value.shape)}. Assign a value of the tensor's own shape."
            )

    # ----- the parametrization protocol ----------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        """Identity bases of the right shapes; ``right_inverse`` sets them from the value."""
        _check(value)
        dtype = compute_dtype(value.dtype)
        batch, n, k = value.shape[:-2], max(value.shape[-2:]), min(value.shape[-2:])
        eye = lambda m: jnp.broadcast_to(jnp.eye(m, dtype=dtype), (*batch, m, m))
        return None, {"base_u": eye(n), "base_v": eye(k)}

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        _check(x)
        if state is None:
            raise missing_state("almost_orthogonal", "the bases of U and V")
        if x.size == 0:
            return x
        dtype = x.dtype
        t, flip = _tall(x.astype(compute_dtype(dtype)))
        k = t.shape[-1]
        u, v = self._rotations(t, state)
        u, v = numerics.polish(u[..., :k]), numerics.polish(v)
        f, _ = self._functions()
        s = jnp.diagonal(t, axis1=-2, axis2=-1)
        sigma = 1 + jnp.asarray(self.lam, t.dtype) * f(s).astype(t.dtype)
        w = matmul(u * sigma[..., None, :], jnp.matrix_transpose(v))
        return (jnp.matrix_transpose(w) if flip else w).astype(dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Bases from the SVD of ``value``, ``s = f⁻¹((Σ - 1) / lam)`` on the diagonal; off the
        set, the nearest point (singular values clipped to the interval)."""
        _check(value)
        self._check_shape(value, state)
        _, inverse = self._functions()
        if inverse is None:
            raise ValueError(
                f"{_OWNER}: f is a callable without an inverse, so a value cannot be mapped back "
                f"to originals (registration and assignment need it). Pass f=(f, f_inverse), "
                f'with f_inverse a right inverse of f on [-1, 1], or one of "sin", "tanh", '
                f'"scaled_sigmoid".'
            )
        dtype = value.dtype
        t, flip = _tall(value.astype(compute_dtype(dtype)))
        n, k = t.shape[-2:]
        if t.size == 0:
            _, state0 = self.init(value, jax.random.key(0))
            return jnp.zeros_like(value), state0
        u, sv, vt = numerics.lapack(jnp.linalg.svd, t, full_matrices=True)
        if self.lam == 0:
            s = jnp.zeros_like(sv)
        else:
            edge = 1 - float(jnp.finfo(t.dtype).eps)
            z = jnp.clip((sv - 1) / jnp.asarray(self.lam, t.dtype), -edge, edge)
            s = inverse(z).astype(t.dtype)
        orig = _diag_embed(s, n)
        orig = (jnp.matrix_transpose(orig) if flip else orig).astype(dtype)
        return orig, {"base_u": u, "base_v": jnp.matrix_transpose(vt[..., :k, :])}

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` (any matrix of a stack) is rank deficient
        while ``lam < 1``: its nearest point in the set is then not unique. Does nothing for a
        traced value (under ``jit`` / ``vmap``), where one of the nearest points is used."""
        _check(value)
        if isinstance(value, jax.core.Tracer | jax.ShapeDtypeStruct) or value.size == 0:
            return
        if self.lam >= 1:
            return
        t = value.astype(compute_dtype(value.dtype))
        if bool(jnp.any(_rank_deficient(t))):
            raise ValueError(
                f"{_OWNER}: the value is rank deficient (a zero singular value, e.g. a zero "
                f"matrix), so it has no unique nearest matrix with singular values in "
                f"[{1 - self.lam:g}, {1 + self.lam:g}] and right_inverse cannot project it. "
                f"Initialize the kernel with a full-rank value, e.g. "
                f"paramx.sampler(AlmostOrthogonal(lam)) or an orthogonal initializer."
            )

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization: the rotations move into the bases (``base_u ← base_u·map(A)``,
        ``base_v ← base_v·map(B)``) and the original keeps only its diagonal ``s``, so the value
        is unchanged (to rounding) and the orthogonal charts are back at their centre. No SVD
        runs, and ``s`` is kept exactly."""
        _check(x)
        if x.size == 0:
            return x, state
        dtype = x.dtype
        t, flip = _tall(x.astype(compute_dtype(dtype)))
        u, v = self._rotations(t, state)
        orig = _diag_embed(jnp.diagonal(t, axis1=-2, axis2=-1), t.shape[-2])
        orig = (jnp.matrix_transpose(orig) if flip else orig).astype(dtype)
        return orig, {"base_u": numerics.polish(u), "base_v": numerics.polish(v)}

    # ----- projection ------------------------------------------------------------------------
    def nearest(self, x: jax.Array) -> jax.Array:
        """The nearest matrix of the set to each matrix of ``x`` in the Frobenius norm:
        ``U clip(Σ, 1 - lam, 1 + lam) Vᵀ`` for the SVD ``x = U Σ Vᵀ``. Where it is not unique
        (a rank-deficient ``x`` with ``lam < 1``), one of the nearest. Computed in float32 for
        narrower dtypes; returns ``x``'s dtype.

        Examples:
          >>> import jax.numpy as jnp
          >>> from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal
          >>> AlmostOrthogonal(0.25).nearest(jnp.diag(jnp.array([2.0, 1.1])))
          Array([[1.25, 0.  ],
                 [0.  , 1.1 ]], dtype=float32)
        """
        _check(x)
        if x.size == 0:
            return x
        t = x.astype(compute_dtype(x.dtype))
        u, s, vt = numerics.lapack(jnp.linalg.svd, t, full_matrices=False)
        s = jnp.clip(s, 1 - self.lam, 1 + self.lam)
        return matmul(u * s[..., None, :], vt).astype(x.dtype)

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(
        self,
        key: jax.Array,
        shape: Any,
        dtype: Any = jnp.float32,
        distribution: str = "uniform",
    ) -> jax.Array:
        """Matrices of the set of ``shape`` (leading axes a batch).

        ``"uniform"`` (the default): ``U diag(σ) Vᵀ`` with ``U`` Haar on the Stiefel manifold
        (orthonormal columns, in the tall orientation), ``V`` Haar on O(k) and the singular
        values ``σ`` i.i.d. uniform on ``[1 - lam, 1 + lam]``, independent of ``U`` and ``V``
        (whatever ``f`` is: ``f`` is a chart, not a distribution). The law is invariant under
        rotations on either side, so ``E[X] = 0`` and ``E[XᵀX] = (1 + lam²/3)·I`` for a tall
        ``X``. ``"orthogonal"``: geotorch's ``sample``, a Haar orthogonal matrix
        (:meth:`paramx.Orthogonal.sample`), the centre of the set (every singular value 1).

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal
          >>> p = AlmostOrthogonal(0.5)
          >>> x = p.sample(jax.random.key(0), (2, 5, 3))
          >>> p.in_manifold(x)
          Array([ True,  True], dtype=bool)
        """
        shape, dtype = tuple(shape), jnp.dtype(dtype)
        _check(jax.ShapeDtypeStruct(shape, dtype))
        if distribution not in ("uniform", "orthogonal"):
            raise ValueError(
                f'{_OWNER}.sample: distribution must be "uniform" or "orthogonal"; got '
                f"{distribution!r}."
            )
        cdt = compute_dtype(dtype)
        if distribution == "orthogonal":
            return Orthogonal().sample(key, shape, cdt).astype(dtype)
        batch, n, k = shape[:-2], max(shape[-2:]), min(shape[-2:])
        ku, kv, ks = jax.random.split(key, 3)
        u = Orthogonal().sample(ku, (*batch, n, k), cdt)
        if n == k:
            # Orthogonal reads a square shape transposed; either way it is Haar.
            u = jnp.matrix_transpose(u)
        v = Orthogonal().sample(kv, (*batch, k, k), cdt)
        sigma = jax.random.uniform(ks, (*batch, k), cdt, 1 - self.lam, 1 + self.lam)
        x = matmul(u * sigma[..., None, :], jnp.matrix_transpose(v))
        flip = _flip(jax.ShapeDtypeStruct(shape, dtype))
        return (jnp.matrix_transpose(x) if flip else x).astype(dtype)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix's singular values lie in ``[1 - lam - atol, 1 + lam + atol]``
        (default ``atol``: ``10·n·eps`` of ``x``'s dtype, ``n`` the larger dimension). One bool
        per matrix."""
        _check(x)
        if atol is None:
            atol = 10 * max(x.shape[-2:]) * float(jnp.finfo(x.dtype).eps)
        s = numerics.lapack(jnp.linalg.svd, x.astype(compute_dtype(x.dtype)), compute_uv=False)
        lo, hi = jnp.min(s, axis=-1, initial=1.0), jnp.max(s, axis=-1, initial=1.0)
        return (lo >= 1 - self.lam - atol) & (hi <= 1 + self.lam + atol)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the set, ``‖Σ - clip(Σ, 1 - lam, 1 + lam)‖``: the norm of
        the singular values' excess outside the interval; 0 on the set."""
        _check(x)
        s = numerics.lapack(jnp.linalg.svd, x.astype(compute_dtype(x.dtype)), compute_uv=False)
        excess = s - jnp.clip(s, 1 - self.lam, 1 + self.lam)
        return jnp.sqrt(jnp.sum(jnp.square(excess), axis=-1))

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "almost_orthogonal"
    torch_function_positional = ()
    torch_function_keyword = ("lam", "f", "triv")
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` almost orthogonal, in place: its singular values lie in
    ``[1 - lam, 1 + lam]``.

    Registers :class:`paramx.constraints.AlmostOrthogonal` (geotorch's ``almost_orthogonal``):
    the original (an ``nnx.Param`` of the kernel's shape) holds the charts' coordinates, the
    orthogonal bases of ``U`` and ``V`` are state. Registration and assignment keep a value of the
    set and replace any other by its nearest point (singular values clipped to the interval); a
    rank-deficient value (``lam < 1``) is refused.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      lam: The radius, in ``[0, 1]``.
      f: ``"sin"`` (default), ``"tanh"``, ``"scaled_sigmoid"`` or a pair ``(f, f_inverse)``.
      triv: ``"expm"`` (default) or ``"cayley"``.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.almost_orthogonal(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), lam=0.1)
      >>> s = jnp.linalg.svd(layer.kernel, compute_uv=False)
      >>> bool(jnp.all((s >= 0.9 - 1e-5) & (s <= 1.1 + 1e-5)))
      True
    """


def almost_orthogonal(
    tree: Any,
    where: Any,
    lam: float,
    *,
    f: Any = "sin",
    triv: str = "expm",
    batch_axes: int = 0,
) -> Any:
    """Registers :class:`paramx.constraints.AlmostOrthogonal`: the selected matrices get their
    singular values in ``[1 - lam, 1 + lam]``; geotorch's ``almost_orthogonal``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      lam: The radius, a real number in ``[0, 1]``.
      f: ``"sin"`` (the default), ``"tanh"``, ``"scaled_sigmoid"``, or a pair
        ``(f, f_inverse)`` of callables (``f`` onto ``[-1, 1]``).
      triv: ``"expm"`` (the default) or ``"cayley"``: the map onto the orthogonal factors.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: For a tensor of fewer than 2 dimensions, ``lam`` outside ``[0, 1]``, an
        unknown ``f`` or ``triv``, a rank-deficient value (``lam < 1``) or a lone callable ``f``.
      TypeError: For an integer, boolean or complex tensor, or an option of the wrong type.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.almost_orthogonal import almost_orthogonal
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 2))  # a Dense(2) kernel on 4 inputs
      >>> w = px.materialize(almost_orthogonal({"kernel": kernel}, "kernel", 0.2))["kernel"]
      >>> s = jnp.linalg.svd(w, compute_uv=False)
      >>> bool(jnp.all((s >= 0.8 - 1e-5) & (s <= 1.2 + 1e-5)))
      True
    """
    from paramx._src.core.register import register_parametrization

    p = AlmostOrthogonal(lam, f, triv)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)
