"""`low_rank` and `fixed_rank`: matrices of rank at most ``r``, or exactly ``r``.

The value of an ``(m, n)`` matrix (leading axes a batch) is ``U diag(s) Vᵀ`` with ``U`` of
shape ``(m, r)`` and ``V`` of shape ``(n, r)`` with orthonormal columns: ``s`` real for
``LowRank`` (rank ``<= r``) and ``f(s) > 0`` for ``FixedRank`` (rank exactly ``r``; ``f`` is
``softplus`` or ``exp``), as geotorch's ``LowRank`` and ``FixedRank``.

The factors are a dynamic trivialization (Casado, 2019), as ``Orthogonal`` with
``use_trivialization=True``. The state holds two orthogonal bases, ``u`` (``m × m``) and ``v``
(``n × n``); the one original has the value's shape and packs, like geotorch, the three factors
into one matrix ``X``: ``U = base_u · H(tril(X, −1)[:, :r])``, ``s = diag(X)[:r]`` and
``V = base_v · H(triu(X, 1)[:r, :]ᵀ)``, where ``H`` is the (sign-corrected) Householder map of
:class:`Orthogonal` (``householder``: ``O(m r²)`` work, smooth everywhere, ``H(0) = I``). The
other entries of ``X`` are unused (no gradient). ``right_inverse`` takes the SVD of the value:
the bases become the completed singular vectors and ``X`` holds only ``s`` on its diagonal
(``f⁻¹(σ)`` for ``FixedRank``), the chart's centre. :func:`paramx.update_base` re-centres the
chart at the current value without changing it (``s`` and its optimizer moments are kept).

Off the set. ``LowRank``'s set is closed: ``right_inverse`` maps any value to a nearest point,
its truncated SVD ``U_r diag(σ_1..σ_r) V_rᵀ`` (Eckart–Young; unique when ``σ_r > σ_{r+1}``).
``FixedRank``'s set is not closed: the truncated SVD is the nearest point when ``σ_r > 0``, and
a value whose truncation loses rank (``σ_r`` zero, or at rounding level: ``σ_r <=
max(m, n)·eps·σ_1``) has no nearest point and is refused by ``check_value`` with a ValueError
naming the path. The core runs ``check_value`` eagerly on concrete values (stacks registered
with ``batch_axes`` and ``paramx.nnx`` included); inside a user's own ``jax.jit`` it cannot run,
and ``σ_r = 0`` gives originals of ``−inf`` (a value of lower rank).

Layout. The rank of a matrix is the rank of its transpose: on a Flax Dense kernel ``(in, out)``
the constraint is torch's on the ``(out, in)`` weight (the factors swap roles). On a conv
kernel ``(*spatial, in, out)`` each spatial tap is one ``(in, out)`` matrix of rank ``<= r``
(resp. ``= r``). bfloat16 and float16 compute in float32 (the bases are kept in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.cholesky import inv_softplus, softplus
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state
from paramx._src.parametrizations.orthogonal import _complete_base, _householder_q

_LR = "LowRank"
_FR = "FixedRank"
_FS = ("softplus", "exp")


# ----- shared machinery (also used by psd.PositiveSemidefiniteFixedRank) ------------------------


def option_rank(owner: str, rank: Any) -> int:
    """``rank`` as an int ``>= 1`` (TypeError for a non-int, ValueError below 1)."""
    rank = numerics.option_int(owner, "rank", rank)
    if rank < 1:
        raise ValueError(f"{owner}: rank must be at least 1; got rank={rank}.")
    return rank


def option_f(owner: str, f: Any) -> str:
    """The positive map of the singular values (eigenvalues): ``"softplus"`` or ``"exp"``."""
    if not isinstance(f, str) or f not in _FS:
        raise ValueError(
            f"{owner}: f must be one of {list(_FS)}; got {f!r}. It maps the original's diagonal "
            f"to the positive singular values (geotorch's default is 'softplus')."
        )
    return f


def positive_map(f: str, x: jax.Array) -> jax.Array:
    return softplus(x) if f == "softplus" else jnp.exp(x)


def positive_map_inverse(f: str, y: jax.Array) -> jax.Array:
    """``f⁻¹(y)`` for ``y > 0``; ``−inf`` at 0 and NaN below."""
    if f == "exp":
        return jnp.log(y)
    return jnp.where(y == 0, jnp.full((), -jnp.inf, y.dtype), inv_softplus(y))


def stiefel(a: jax.Array, base: jax.Array) -> jax.Array:
    """``base · H(a)``: the ``(p, r)`` matrix with orthonormal columns of the chart at ``base``
    (``p × p`` orthogonal) and the strictly lower triangular ``(p, r)`` coordinates ``a``.

    ``H`` is :class:`Orthogonal`'s Householder map with its column signs fixed to ``−1``, so
    ``H(0)`` is the identity's first ``r`` columns and the chart's centre is ``base[:, :r]``.
    """
    q = -_householder_q(jnp.tril(a, -1))
    return matmul(base.astype(q.dtype), q)


def complete(u: jax.Array) -> jax.Array:
    """A ``p × p`` orthogonal matrix whose first ``r`` columns are ``u`` (``(p, r)``,
    orthonormal columns): the chart at ``u``."""
    return _complete_base(u)


def check_matrix(x: Any, owner: str, rank: int) -> None:
    """Refuses a non-float tensor, one of fewer than 2 axes, or a rank it cannot have."""
    numerics.check_dtype(x, owner, complex_ok=False, hint="Register it on a real-valued kernel.")
    if len(x.shape) < 2:
        raise ValueError(
            f"{owner} needs a matrix (or a stack of them in the leading axes); got a tensor of "
            f"shape {list(x.shape)}. Register it on a kernel, not on a bias or a scalar."
        )
    m, n = x.shape[-2:]
    if rank > min(m, n):
        raise ValueError(
            f"{owner}: rank={rank} exceeds min(m, n) = {min(m, n)} of the matrices of shape "
            f"{list(x.shape)} (the last two axes). Use a rank between 1 and {min(m, n)}."
        )


def tolerance(x: jax.Array) -> jax.Array:
    """The default membership tolerance of ``(m, n)`` matrices: ``10·max(m, n)·eps`` times the
    largest entry of each (at least 1)."""
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=(-2, -1)), 1)
    return 10 * max(x.shape[-2:]) * float(jnp.finfo(x.dtype).eps) * scale


def rank_floor(x: Any, top: jax.Array) -> jax.Array:
    """Below this, a singular value (eigenvalue) is rounding: ``max(m, n)·eps`` of ``x``'s
    dtype times the largest one, ``top``."""
    return max(x.shape[-2:]) * float(jnp.finfo(x.dtype).eps) * top


def refuse_lost_rank(owner: str, bad: jax.Array, what: str, hint: str) -> None:
    """A ValueError naming the matrices of a stack (``bad``: a bool per matrix) whose
    truncation has lost rank."""
    if not bool(jnp.any(bad)):
        return
    where = ""
    if bad.ndim:
        idx = [tuple(int(i) for i in ix) for ix in jnp.argwhere(bad)[:4]]
        where = f" (matrix {idx[0] if len(idx) == 1 else idx} of the stack)"
    raise ValueError(
        f"{owner}: {what}{where}, so it has no nearest point in the set, which excludes lower "
        f"ranks (it is not closed). {hint}"
    )


def _split(x: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The original's three parts: ``U``'s coordinates ``(m, r)``, ``s`` ``(r,)`` and ``V``'s
    coordinates ``(n, r)``."""
    a_u = x[..., :, :r]
    s = jnp.diagonal(x, axis1=-2, axis2=-1)[..., :r]
    a_v = jnp.matrix_transpose(x[..., :r, :])
    return a_u, s, a_v


def diagonal_original(d: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The chart's centre: a zero matrix of ``shape`` with ``d`` (``(..., r)``) on the first
    ``r`` diagonal entries."""
    r = d.shape[-1]
    idx = jnp.arange(r)
    return jnp.zeros(shape, d.dtype).at[..., idx, idx].set(d)


def _truncated_svd(w: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    u, s, vt = numerics.lapack(jnp.linalg.svd, w, full_matrices=False)
    return u[..., :, :r], s, jnp.matrix_transpose(vt)[..., :, :r]


def _near(w: jax.Array, r: int) -> jax.Array:
    u, s, v = _truncated_svd(w, r)
    return matmul(u * s[..., None, :r], jnp.matrix_transpose(v))


def _identity_bases(x: jax.Array) -> dict[str, jax.Array]:
    cdt = compute_dtype(x.dtype)
    m, n = x.shape[-2:]
    batch = x.shape[:-2]
    return {
        "u": jnp.broadcast_to(jnp.eye(m, dtype=cdt), (*batch, m, m)),
        "v": jnp.broadcast_to(jnp.eye(n, dtype=cdt), (*batch, n, n)),
    }


def _gaussian_truncation(key: jax.Array, shape: Any, dtype: Any, r: int) -> jax.Array:
    g = jax.random.normal(key, tuple(shape), compute_dtype(dtype))
    return _near(g, r).astype(dtype)


class _Factored:
    """What LowRank and FixedRank share: the factored forward, the SVD right_inverse, the base
    update and the protocol. ``_owner``, ``_positive`` and ``_diag`` / ``_diag_inverse`` are set
    by each class."""

    rank: int
    _owner = ""

    def _diag(self, d: jax.Array) -> jax.Array:
        return d

    def _diag_inverse(self, s: jax.Array) -> jax.Array:
        return s

    def _check(self, x: Any) -> None:
        check_matrix(x, self._owner, self.rank)

    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        self._check(value)
        return None, _identity_bases(value)

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        self._check(x)
        if state is None:
            raise missing_state(self._owner, "the bases u and v")
        dtype = x.dtype
        w = x.astype(compute_dtype(dtype))
        a_u, d, a_v = _split(w, self.rank)
        u = stiefel(a_u, state["u"])
        v = stiefel(a_v, state["v"])
        return matmul(u * self._diag(d)[..., None, :], jnp.matrix_transpose(v)).astype(dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        self._check(value)
        self.check_value(value)
        w = value.astype(compute_dtype(value.dtype))
        u, s, v = _truncated_svd(w, self.rank)
        d = self._diag_inverse(s[..., : self.rank])
        x = diagonal_original(d, w.shape).astype(value.dtype)
        return x, {"u": complete(u), "v": complete(v)}

    def check_value(self, value: jax.Array) -> None:
        self._check(value)

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization (:func:`paramx.update_base`): the bases move to the current
        ``U`` and ``V`` and the original back to the chart's centre (its ``s`` is kept), so the
        value is unchanged to rounding."""
        self._check(x)
        if state is None:
            raise missing_state(self._owner, "the bases u and v")
        w = x.astype(compute_dtype(x.dtype))
        a_u, d, a_v = _split(w, self.rank)
        u = stiefel(a_u, state["u"])
        v = stiefel(a_v, state["v"])
        centre = diagonal_original(d, w.shape).astype(x.dtype)
        return centre, {"u": complete(u), "v": complete(v)}

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """The best rank-``r`` approximation (truncated SVD) of an ``(m, n)`` standard normal
        matrix ``G``, as geotorch samples (it truncates a ``xavier_normal`` draw): ``U`` and
        ``V`` are then Haar distributed on their Stiefel manifolds, independently of the
        singular values, which are the ``r`` largest of ``G`` (all positive: the draw has rank
        exactly ``r``). ``E[X Xᵀ]`` is a multiple of ``I``; for ``r = min(m, n)`` the draw is
        ``G`` itself. Leading axes of ``shape`` are a batch; bfloat16 and float16 draw in
        float32 and round."""
        dtype = jnp.dtype(dtype)
        shape = tuple(shape)
        self._check(jax.ShapeDtypeStruct(shape, dtype))
        return _gaussian_truncation(key, shape, dtype, self.rank)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the matrices of rank ``<= r``, ``sqrt(Σ_{i>r} σ_i²)`` (for
        ``FixedRank``: to its closure, the infimum); 0 on the set."""
        self._check(x)
        s = numerics.lapack(jnp.linalg.svd, x.astype(compute_dtype(x.dtype)), compute_uv=False)
        return jnp.sqrt(jnp.sum(s[..., self.rank :] ** 2, axis=-1))

    def _singular(self, x: jax.Array, atol: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        self._check(x)
        if atol is None:
            atol = tolerance(x)
        s = numerics.lapack(jnp.linalg.svd, x.astype(compute_dtype(x.dtype)), compute_uv=False)
        atol = jnp.asarray(atol).astype(s.dtype)
        rest = s[..., self.rank] if self.rank < s.shape[-1] else jnp.zeros_like(s[..., 0])
        return s, rest <= atol, atol


@dataclasses.dataclass(frozen=True)
class LowRank(_Factored):
    """Matrices of rank at most ``rank``, ``U diag(s) Vᵀ``; register it with :func:`low_rank`.

    The original has the value's shape and the state two orthogonal bases (module docstring).
    ``right_inverse`` is the truncated SVD: exact on the set, and the nearest point in the
    Frobenius norm off it (Eckart–Young). geotorch's ``LowRank``.

    Attributes:
      rank: The largest rank ``r``, ``1 <= r <= min(m, n)`` (checked at registration).
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.low_rank import LowRank
      >>> w = jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
      >>> tree = px.register_parametrization({"kernel": w}, "kernel", LowRank(2))
      >>> px.materialize(tree)["kernel"].round(5)  # the nearest matrix of rank <= 2
      Array([[3., 0., 0.],
             [0., 2., 0.],
             [0., 0., 0.]], dtype=float32)
    """

    rank: int
    name: str = "low_rank"
    _owner = _LR

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", option_rank(_LR, self.rank))
        numerics.option_name(_LR, self.name)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix has at most ``rank`` singular values above ``atol`` (default
        ``10·max(m, n)·eps`` times the largest entry, at least 1)."""
        return self._singular(x, atol)[1]

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "low_rank"
    torch_function_positional = ()
    torch_function_keyword = ("rank",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a matrix of rank at most ``rank``, in place.

    Registers :class:`paramx.constraints.LowRank`: the original (an ``nnx.Param`` of the
    kernel's shape) packs ``U``, ``s`` and ``V`` of ``U diag(s) Vᵀ``, and two orthogonal bases
    are :class:`ParametrizationState`. Registration and assignment replace a value by its
    truncated SVD, the nearest matrix of rank ``<= rank`` (Frobenius norm). A conv kernel gets
    one such ``(in, out)`` matrix per spatial tap.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      rank: The largest rank.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.low_rank(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), rank=2)
      >>> int(jnp.sum(jnp.linalg.svd(layer.kernel, compute_uv=False) > 1e-5))
      2
    """


def low_rank(tree: Any, where: Any, rank: int, *, batch_axes: int = 0) -> Any:
    """Registers :class:`LowRank`: the selected matrices get rank at most ``rank``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      rank: The largest rank, ``1 <= rank <= min(m, n)``.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor has fewer than 2 axes or ``rank`` exceeds
        ``min(m, n)``, or ``rank < 1``.
      TypeError: If it is an integer, boolean or complex tensor, or ``rank`` is not an int.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.low_rank import low_rank
      >>> kernel = jax.random.normal(jax.random.key(0), (5, 4))  # a Flax Dense kernel
      >>> tree = low_rank({"kernel": kernel}, "kernel", 2)
      >>> k = px.materialize(tree)["kernel"]
      >>> int(jnp.sum(jnp.linalg.svd(k, compute_uv=False) > 1e-5))
      2
      >>> s = jnp.linalg.svd(kernel, compute_uv=False)  # Eckart–Young: the error is σ₃, σ₄
      >>> bool(jnp.isclose(jnp.linalg.norm(kernel - k), jnp.sqrt(s[2]**2 + s[3]**2), rtol=1e-5))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, LowRank(rank), batch_axes=batch_axes)


@dataclasses.dataclass(frozen=True)
class FixedRank(_Factored):
    """Matrices of rank exactly ``rank``, ``U diag(f(s)) Vᵀ`` with ``f(s) > 0``; register it
    with :func:`fixed_rank`.

    As :class:`LowRank`, with the singular values ``f(s)`` (geotorch's ``FixedRank``, whose
    ``softplus`` adds ``1e-6``; paramx does not, so ``right_inverse`` is exact for every
    positive singular value). ``right_inverse`` is the truncated SVD (exact on the set, the
    nearest point off it); a value whose truncation has lost rank has no nearest point and is
    refused (``check_value``, module docstring).

    Attributes:
      rank: The rank ``r``, ``1 <= r <= min(m, n)`` (checked at registration).
      f: ``"softplus"`` (default) or ``"exp"``: the map from the original's diagonal to the
        singular values.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.low_rank import FixedRank
      >>> w = jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
      >>> tree = px.register_parametrization({"kernel": w}, "kernel", FixedRank(2))
      >>> px.materialize(tree)["kernel"].round(5)
      Array([[3., 0., 0.],
             [0., 2., 0.],
             [0., 0., 0.]], dtype=float32)
      >>> FixedRank(2).check_value(jnp.diag(jnp.array([1.0, 0.0, 0.0])))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
        ...
      ValueError: FixedRank: the value's truncation to rank 2 has singular value ...
    """

    rank: int
    f: str = "softplus"
    name: str = "fixed_rank"
    _owner = _FR

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", option_rank(_FR, self.rank))
        option_f(_FR, self.f)
        numerics.option_name(_FR, self.name)

    def _diag(self, d: jax.Array) -> jax.Array:
        return positive_map(self.f, d)

    def _diag_inverse(self, s: jax.Array) -> jax.Array:
        return positive_map_inverse(self.f, s)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` (any matrix of a stack) has ``σ_r <=
        max(m, n)·eps·σ_1``: its truncation to rank ``r`` loses rank, so no matrix of rank
        exactly ``r`` is nearest. Does nothing for a traced value (under ``jit`` / ``vmap``);
        the core runs it before it traces, so stacks and ``paramx.nnx`` are checked too."""
        self._check(value)
        if isinstance(value, (jax.core.Tracer, jax.ShapeDtypeStruct)):
            return
        s = numerics.lapack(
            jnp.linalg.svd, value.astype(compute_dtype(value.dtype)), compute_uv=False
        )
        sr = s[..., self.rank - 1]
        bad = ~(sr > rank_floor(value, s[..., 0]))
        refuse_lost_rank(
            _FR,
            bad,
            f"the value's truncation to rank {self.rank} has singular value "
            f"σ_{self.rank} = {float(jnp.min(sr)):.3g} (zero or rounding)",
            "Assign a value of rank at least "
            f"{self.rank} (e.g. add a little noise), use low_rank (rank <= {self.rank}), or "
            "initialize with `.sample`.",
        )

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix has exactly ``rank`` singular values above ``atol`` (default
        ``10·max(m, n)·eps`` times the largest entry, at least 1)."""
        s, low, atol = self._singular(x, atol)
        return low & (s[..., self.rank - 1] > atol)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "fixed_rank"
    torch_function_positional = ()
    torch_function_keyword = ("rank", "f")
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a matrix of rank exactly ``rank``, in place.

    Registers :class:`paramx.constraints.FixedRank`: as ``low_rank``, with singular values
    ``f(s) > 0``. Registration and assignment replace a value by its truncated SVD, the
    nearest matrix of rank ``rank``; a value whose truncation loses rank is refused.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
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
      >>> layer = pnx.fixed_rank(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), rank=2)
      >>> int(jnp.sum(jnp.linalg.svd(layer.kernel, compute_uv=False) > 1e-5))
      2
    """


def fixed_rank(
    tree: Any, where: Any, rank: int, *, f: str = "softplus", batch_axes: int = 0
) -> Any:
    """Registers :class:`FixedRank`: the selected matrices get rank exactly ``rank``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      rank: The rank, ``1 <= rank <= min(m, n)``.
      f: ``"softplus"`` (default) or ``"exp"``, the map to the singular values.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor has fewer than 2 axes, ``rank`` is out of range, or
        (concrete values) a value's truncation to rank ``rank`` loses rank.
      TypeError: If it is an integer, boolean or complex tensor, or ``rank`` is not an int.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.low_rank import fixed_rank
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))  # a conv kernel
      >>> k = px.materialize(fixed_rank({"kernel": kernel}, "kernel", 3))["kernel"]
      >>> s = jnp.linalg.svd(k, compute_uv=False)  # one (in, out) matrix per tap
      >>> bool(jnp.all(s[..., 2] > 1e-3)), bool(jnp.all(s[..., 3] < 1e-5))
      (True, True)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, FixedRank(rank, f), batch_axes=batch_axes)
