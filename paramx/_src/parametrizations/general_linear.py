"""`invertible` and `sln`: square real matrices with det > 0 (GL⁺(n)) or det = 1 (SL(n)).

geotorch's ``GLp`` (``invertible``) and ``SL`` (``sln``). Both are trivializations with a base
kept as state, as :class:`paramx.Orthogonal` and :class:`~paramx.constraints.SpecialOrthogonal`:
the value is

    ``base @ expm(A) @ expm(S)``

where the original ``X`` (n x n, as the tensor) is split into a skew part ``A = L − Lᵀ`` (``L``
its strictly lower triangle) and a symmetric part ``S = U + Uᵀ − diag(X)`` (``U`` its upper
triangle, diagonal included); for ``sln``, ``S`` is made traceless, ``S − tr(S)/n · I``. Every
entry of ``X`` moves the value in its own direction (at ``X = 0`` the derivative is
``dX ↦ base (dA + dS)``, onto all n x n matrices), and the map is **onto** the set for every base:
``expm(A)`` covers SO(n) (the exponential of a compact connected group is onto), ``expm(S)``
covers the symmetric positive definite matrices (of determinant 1 for ``sln``), and every
matrix of GL⁺(n) (of SL(n)) is ``Q P`` for such ``Q``, ``P`` (its polar decomposition); left
multiplication by the base is a bijection of the set. So Adam on the original reaches any point
of the set from any starting value, without re-centring. A plain ``base @ expm(X)`` for a
general ``X`` would not: ``expm`` of a real matrix misses e.g. every matrix with two distinct
negative eigenvalues, so a target ``T`` with ``base⁻¹ T`` of that kind is out of reach until
the base is moved (geotorch instead parametrizes the SVD, ``U diag(f(σ)) Vᵀ``, with ``U``, ``V``
orthogonal through ``expm`` or ``cayley`` and ``f = softplus``). Both factors are computed by
:func:`~paramx._src.parametrizations.linalg.expm_skew`'s scaling and squaring, whose choice of
degree relies only on the matrix being normal (symmetric matrices are), and which multiplies at
full precision with its own VJP; both go through it as one batch of two, so forward and backward
trace one scaling-and-squaring loop.

``right_inverse`` (registration and assignment) is exact: the base becomes the value (kept in
float32 for bfloat16 / float16 tensors) and the original 0, so the value right after
registration is the registered matrix. :meth:`~Invertible.update_base` re-centres the chart
(dynamic trivialization): the value is kept and the original goes back to 0 (``sln`` rescales
the new base by ``det^{-1/n}``, a rounding-level change, so the determinant does not drift).

Off the set. GL⁺(n) is open: a matrix with ``det ≤ 0`` has no nearest point in it (points
of GL⁺ come arbitrarily close to the boundary ``det = 0``, none attains it), and no value is
invented. SL(n) is closed, but its nearest point has no closed form (it needs a secular
equation on the singular values, which has several solutions when ``det > 1``), and rescaling
by ``det^{-1/n}`` is not the nearest point. So both refuse a value off the set: ``check_value``
raises a ValueError naming the fix, and the core runs it eagerly on concrete values before
anything is traced (registration, assignment, ``paramx.nnx``, stacks). Inside a user's own
``jax.jit`` the value is a tracer and the check cannot run: such a value gives a base of NaN,
so the value reads NaN instead of a silently different matrix.

Membership. ``in_manifold`` for ``invertible``: ``det > 0`` and the smallest singular value
above ``atol`` (default ``10·n·eps`` times the largest, ``eps`` of the dtype computed in, so a
numerically singular matrix is out); for ``sln``: ``|det − 1| ≤ atol`` (default ``10·n·eps·κ``,
``eps`` of the tensor's dtype and ``κ`` the condition number: the determinant's own rounding error
grows with it). ``check_value`` refuses exactly what the default ``in_manifold`` says no to.
``distance``: see each class.

Layouts. A Flax Dense kernel is (in, out), the transpose of torch's weight (out, in); GL⁺(n)
and SL(n) are closed under transposition (``det Kᵀ = det K``), so the constraint means the same
on both: a Dense(n) kernel on n features is an orientation-preserving (volume-preserving for
``sln``) invertible map of feature space. On a conv kernel (*spatial, in, out) with in = out,
each spatial tap is such a matrix of channel space. Non-square kernels are refused.

Dtypes: float32 and float64 are computed as they are; bfloat16 and float16 in float32 (the base
is float32 state). Complex, integer and boolean tensors are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import linalg, numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state


def _eye(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    return jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), x.shape)


def _check(x: Any, owner: str) -> None:
    numerics.check_dtype(
        x,
        owner,
        complex_ok=False,
        hint="Only real matrices are supported; register on a real (float) tensor.",
    )
    if len(x.shape) < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{owner} needs a square matrix in the last two axes (or a stack of them); got shape "
            f"{list(x.shape)}. Register it on a square kernel: a Dense(n) kernel on n features "
            f"(in == out), or a conv kernel (*spatial, in, out) with as many input as output "
            f"channels."
        )


def _concrete(x: Any) -> bool:
    return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


def _factors(x: jax.Array, traceless: bool) -> jax.Array:
    """``expm(A) @ expm(S)`` for the skew part ``A`` (strict lower triangle) and the symmetric
    part ``S`` (upper triangle with the diagonal) of ``x``; ``S`` made traceless if asked."""
    low = jnp.tril(x, -1)
    up = jnp.triu(x, 1)
    s = up + jnp.matrix_transpose(up) + jnp.tril(jnp.triu(x))  # the last term: diag(x) as a matrix
    if traceless:
        n = x.shape[-1]
        tr = jnp.trace(s, axis1=-2, axis2=-1) / jnp.asarray(n, x.dtype)
        s = s - tr[..., None, None] * _eye(x)
    # One call for both factors (a batch of two): one scaling-and-squaring loop to trace and
    # compile, with the number of squarings chosen per matrix.
    e = linalg.expm_skew(jnp.stack([low - jnp.matrix_transpose(low), s]))
    return matmul(e[0], e[1])


def _singular_values(x: jax.Array) -> jax.Array:
    return numerics.lapack(jnp.linalg.svd, x, compute_uv=False)


def _default_tol(x: Any) -> float:
    return 10 * x.shape[-1] * float(jnp.finfo(x.dtype).eps)


def _first_bad(ok: jax.Array) -> str:
    """`` (matrix (i, j))`` naming the first failing matrix of a batch, or ``""``."""
    if ok.ndim == 0:
        return ""
    index = tuple(int(i) for i in jnp.argwhere(~ok)[0])
    return f" (matrix {index} of the batch)"


class _Group:
    """What GL⁺(n) and SL(n) share: the trivialization, its state and the base's update."""

    _owner: str
    _traceless: bool

    # ----- subclass hooks --------------------------------------------------------------------
    def in_manifold(self, x: jax.Array, atol: Any = None) -> jax.Array:  # pragma: no cover
        raise NotImplementedError

    def check_value(self, value: jax.Array) -> None:  # pragma: no cover
        raise NotImplementedError

    # ----- the parametrization protocol ----------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        _check(value, self._owner)
        return None, {"base": self._base(value)}

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        _check(x, self._owner)
        if state is None:
            raise missing_state(self._owner, "the base")
        if x.size == 0:
            return x
        dtype = x.dtype
        xc = x.astype(compute_dtype(dtype))
        value = matmul(state["base"].astype(xc.dtype), _factors(xc, self._traceless))
        return value.astype(dtype)

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Base = ``value`` (exact), original = 0; a value off the set is refused (module
        docstring)."""
        _check(value, self._owner)
        base = None if state is None else state.get("base")
        if base is not None and value.shape != base.shape:
            raise ValueError(
                f"{self._owner}: expected a matrix or batch of matrices of shape "
                f"{tuple(base.shape)}, the registered tensor's shape; got {tuple(value.shape)}. "
                f"Assign a value of the tensor's own shape."
            )
        return jnp.zeros_like(value), {"base": self._base(value)}

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization (``paramx.update_base``): the base becomes the current value
        and the original 0, so the value is kept (to rounding)."""
        _check(x, self._owner)
        if state is None:
            raise missing_state(self._owner, "the base")
        if x.size == 0:
            return x, state
        xc = x.astype(compute_dtype(x.dtype))
        base = state["base"]
        value = matmul(base.astype(xc.dtype), _factors(xc, self._traceless)).astype(base.dtype)
        if self._traceless:  # det(value) = 1 to rounding: remove it, so it cannot accumulate
            sign, logdet = numerics.lapack(jnp.linalg.slogdet, value)
            scale = jnp.exp(-logdet / jnp.asarray(value.shape[-1], logdet.dtype))
            value = jnp.where((sign > 0)[..., None, None], value * scale[..., None, None], value)
        return jnp.zeros_like(x), {"base": value}

    def _base(self, value: jax.Array) -> jax.Array:
        base = value.astype(compute_dtype(value.dtype))
        if base.size == 0:
            return base
        if _concrete(value):
            self.check_value(value)
            return base
        # Traced (a user's own jit): no error can be raised; poison values off the set.
        ok = self.in_manifold(value)
        return jnp.where(ok[..., None, None], base, jnp.full_like(base, jnp.nan))

    def _sample_gl(self, key: jax.Array, shape: Any, dtype: Any) -> jax.Array:
        """Gaussian N(0, 1/n) matrices rounded to ``dtype``, then the first row negated where
        the (rounded) determinant is negative: the rounded Gaussian restricted to GL⁺(n)."""
        shape, dtype = tuple(shape), jnp.dtype(dtype)
        _check(jax.ShapeDtypeStruct(shape, dtype), self._owner)
        cdt = compute_dtype(dtype)
        n = shape[-1]
        g = jax.random.normal(key, shape, cdt) / jnp.sqrt(jnp.asarray(max(n, 1), cdt))
        g = g.astype(dtype)
        if n == 0:
            return g
        det = numerics.lapack(jnp.linalg.det, g.astype(cdt))
        sign = jnp.where(det < 0, -1.0, 1.0).astype(dtype)
        return g.at[..., 0, :].multiply(sign[..., None])


@dataclasses.dataclass(frozen=True)
class Invertible(_Group):
    """Invertible matrices with a positive determinant, GL⁺(n); register with
    :func:`paramx.constraints.invertible` (geotorch's ``GLp``).

    The value is ``base @ expm(A) @ expm(S)`` (skew ``A`` from the original's strictly lower
    triangle, symmetric ``S`` from its upper triangle), onto GL⁺(n) for every base; see the
    module docstring for registration, the refusal of ``det ≤ 0`` and layouts.

    Attributes:
      name: The display name.

    Raises:
      ValueError, TypeError: At registration, for a tensor that is not square in its last two
        axes, a complex, integer or boolean tensor, or a value with ``det ≤ 0`` (or numerically
        singular).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.general_linear import Invertible
      >>> w = jnp.array([[2.0, 1.0], [0.0, 0.5]])
      >>> tree = px.register_parametrization({"w": w}, "w", Invertible())
      >>> px.materialize(tree)["w"]
      Array([[2. , 1. ],
             [0. , 0.5]], dtype=float32)
    """

    name: str = "invertible"

    _owner = "Invertible"
    _traceless = False

    def __post_init__(self) -> None:
        numerics.option_name(self._owner, self.name)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` is not in GL⁺(n) (``det ≤ 0``, or the
        smallest singular value at most ``10·n·eps`` times the largest); does nothing for a
        traced one (under ``jit`` / ``vmap``), which gives a base of NaN."""
        _check(value, self._owner)
        if not _concrete(value) or value.size == 0:
            return
        ok = self.in_manifold(value)
        if bool(jnp.all(ok)):
            return
        x = value.astype(compute_dtype(value.dtype))
        det = numerics.lapack(jnp.linalg.det, x)
        s = _singular_values(x)
        bad = jnp.argwhere(~ok)[0] if ok.ndim else ()
        d = float(det[tuple(bad)])
        ratio = float((s[..., -1] / jnp.maximum(s[..., 0], jnp.finfo(x.dtype).tiny))[tuple(bad)])
        what = (
            f"a determinant of {d:g}"
            if d <= 0
            else f"a smallest-to-largest singular value ratio of {ratio:g} (numerically singular)"
        )
        raise ValueError(
            f"{self._owner} needs invertible matrices with a positive determinant (GL⁺(n)), but "
            f"the value has {what}{_first_bad(ok)}. GL⁺(n) is open: a matrix with det ≤ 0 has "
            f"no nearest point in it, so it cannot be projected. Negate one row or column of "
            f"each matrix with det < 0 (e.g. `x.at[..., 0, :].multiply(-1)`), add a multiple of "
            f"the identity to a singular one, or initialize with Invertible().sample "
            f"(paramx.sampler)."
        )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """Gaussian matrices conditioned on ``det > 0``: entries i.i.d. N(0, 1/n) (a Glorot-like
        scale, as geotorch's Xavier-normal init), with the first row negated where the
        determinant is negative. Negating a row preserves the Gaussian law and swaps the signs
        of the determinant, so the result is exactly the Gaussian restricted to GL⁺(n): every
        entry still has mean 0 and variance 1/n. For bfloat16 / float16 the draw is rounded first
        and the sign of the rounded matrix's determinant decides (negation is exact), so the
        result is in GL⁺(n) in its own dtype. Leading axes of ``shape`` are a batch.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.general_linear import Invertible
          >>> x = Invertible().sample(jax.random.key(0), (4, 3, 3))
          >>> bool(jnp.all(jnp.linalg.det(x) > 0)), Invertible().in_manifold(x).tolist()
          (True, [True, True, True, True])
        """
        return self._sample_gl(key, shape, dtype)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix has ``det > 0`` and its smallest singular value above ``atol``
        (default ``10·n·eps`` times the largest singular value, ``eps`` of the dtype computed in,
        float32 for bfloat16 / float16: a matrix is stored exactly, and below that margin the
        sign of its computed determinant is not reliable). One bool per matrix."""
        _check(x, self._owner)
        xc = x.astype(compute_dtype(x.dtype))
        if x.size == 0:
            return jnp.ones(x.shape[:-2], bool)
        s = _singular_values(xc)
        if atol is None:
            atol = _default_tol(xc) * s[..., 0]
        return (numerics.lapack(jnp.linalg.det, xc) > 0) & (s[..., -1] > atol)

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the closure of GL⁺(n) (the set is open: the infimum of the
        distances to it, not attained): 0 where ``det ≥ 0``, else the smallest singular value
        (the distance to the nearest singular matrix, which lies on the boundary)."""
        _check(x, self._owner)
        xc = x.astype(compute_dtype(x.dtype))
        if x.size == 0:
            return jnp.zeros(x.shape[:-2], xc.dtype)
        s = _singular_values(xc)
        return jnp.where(
            numerics.lapack(jnp.linalg.det, xc) >= 0, jnp.zeros_like(s[..., -1]), s[..., -1]
        )

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "invertible"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` an invertible matrix with ``det > 0``, in place.

    Registers :class:`paramx.constraints.Invertible` (geotorch's ``GLp``): the original (an
    ``nnx.Param``) holds the chart's coordinates (0 right after registration), the ``base`` is
    state, and the value is ``base @ expm(A) @ expm(S)``. Registration and assignment keep a
    value of GL⁺(n) exactly and refuse one with ``det ≤ 0`` (GL⁺ is open: there is no nearest
    point to project to).

    Args:
      module: The module (``nnx.Linear(n, n)``, a conv with as many input as output channels).
      name: The attribute to constrain.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax, jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      >>> k = layer.kernel[...]
      >>> layer.kernel[...] = jnp.where(jnp.linalg.det(k) > 0, 1.0, -1.0) * k  # det > 0
      >>> layer = pnx.invertible(layer)
      >>> bool(jnp.linalg.det(layer.kernel) > 0)
      True
    """


@dataclasses.dataclass(frozen=True)
class SpecialLinear(_Group):
    """Matrices of determinant 1, SL(n); register with :func:`paramx.constraints.sln`
    (geotorch's ``SL``).

    The value is ``base @ expm(A) @ expm(S − tr(S)/n·I)`` (skew ``A`` from the original's
    strictly lower triangle, symmetric ``S`` from its upper triangle), onto SL(n) for every
    base; see the module docstring for registration, the refusal of ``det ≠ 1`` and layouts.

    Attributes:
      name: The display name.

    Raises:
      ValueError, TypeError: At registration, for a tensor that is not square in its last two
        axes, a complex, integer or boolean tensor, or a value whose determinant is not 1 (to
        :meth:`in_manifold`'s default tolerance).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.general_linear import SpecialLinear
      >>> w = jnp.array([[2.0, 3.0], [0.0, 0.5]])
      >>> tree = px.register_parametrization({"w": w}, "w", SpecialLinear())
      >>> px.materialize(tree)["w"]
      Array([[2. , 3. ],
             [0. , 0.5]], dtype=float32)
    """

    name: str = "sln"

    _owner = "SpecialLinear"
    _traceless = True

    def __post_init__(self) -> None:
        numerics.option_name(self._owner, self.name)

    def check_value(self, value: jax.Array) -> None:
        """Raises a ValueError if a concrete ``value`` is not in SL(n) (``|det − 1|`` above
        :meth:`in_manifold`'s default tolerance); does nothing for a traced one (under ``jit``
        / ``vmap``), which gives a base of NaN."""
        _check(value, self._owner)
        if not _concrete(value) or value.size == 0:
            return
        ok = self.in_manifold(value)
        if bool(jnp.all(ok)):
            return
        det = numerics.lapack(jnp.linalg.det, value.astype(compute_dtype(value.dtype)))
        bad = tuple(jnp.argwhere(~ok)[0]) if ok.ndim else ()
        d = float(det[bad])
        fix = (
            "Rescale it to `x / jnp.linalg.det(x)[..., None, None] ** (1 / n)` (a point of SL(n), "
            "though not the nearest one)"
            if d > 0
            else "Negate one row of each matrix with det < 0 (e.g. `x.at[..., 0, :].multiply(-1)`"
            "), then rescale it to `x / jnp.linalg.det(x)[..., None, None] ** (1 / n)`"
        )
        raise ValueError(
            f"{self._owner} needs matrices of determinant 1 (SL(n)), but the value has a "
            f"determinant of {d:g}{_first_bad(ok)}. Its nearest point in SL(n) has no closed "
            f"form, so it is not projected. {fix}, or initialize with SpecialLinear().sample "
            f"(paramx.sampler)."
        )

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(self, key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        """:meth:`Invertible.sample` (Gaussian conditioned on ``det > 0``) divided by
        ``det^{1/n}``, geotorch's choice of normalizing the singular values by their geometric
        mean. The law is invariant under ``Y ↦ R Y`` and ``Y ↦ Y R`` for rotations ``R`` (the
        Gaussian's invariance, kept by the rescaling), so every entry has mean 0 and the same
        distribution. Leading axes of ``shape`` are a batch.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from paramx._src.parametrizations.general_linear import SpecialLinear
          >>> y = SpecialLinear().sample(jax.random.key(0), (2, 3, 3))
          >>> jnp.round(jnp.linalg.det(y), 4).tolist(), SpecialLinear().in_manifold(y).tolist()
          ([1.0, 1.0], [True, True])
        """
        dtype = jnp.dtype(dtype)
        g = self._sample_gl(key, shape, compute_dtype(dtype))
        if g.shape[-1] == 0:
            return g.astype(dtype)
        _, logdet = numerics.lapack(jnp.linalg.slogdet, g)
        scale = jnp.exp(-logdet / jnp.asarray(g.shape[-1], logdet.dtype))
        return (g * scale[..., None, None]).astype(dtype)

    def in_manifold(self, x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
        """Whether each matrix has ``|det − 1| ≤ atol`` (default ``10·n·eps·κ`` of ``x``'s dtype,
        ``κ`` its condition number: the rounding error of a determinant grows with it). One
        bool per matrix."""
        _check(x, self._owner)
        xc = x.astype(compute_dtype(x.dtype))
        if x.size == 0:
            return jnp.ones(x.shape[:-2], bool)
        if atol is None:
            s = _singular_values(xc)
            kappa = s[..., 0] / jnp.maximum(s[..., -1], jnp.finfo(xc.dtype).tiny)
            atol = _default_tol(x) * kappa
        return jnp.abs(numerics.lapack(jnp.linalg.det, xc) - 1) <= atol

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to SL(n) where ``det x ≤ 1`` (negative included), and an upper
        bound on it where ``det x > 1``; 0 on the set.

        With the SVD ``x = U Σ Vᵀ`` the nearest point is ``U diag(τ) D Vᵀ`` (``D`` negates the
        last, smallest, direction when ``det x < 0``), where ``τ`` minimizes
        ``Σ (τᵢ − sᵢ)²`` subject to ``Π τᵢ = 1`` with ``s = σ`` (``σₙ`` negated when
        ``det x < 0``). For ``det x ≤ 1`` its Lagrange multiplier ``μ`` is ``≥ 0``, where the
        problem is convex: ``τᵢ = (sᵢ + √(sᵢ² + 4μ)) / 2``, with ``μ`` found by bisection
        on ``Σ log τᵢ = 0``, is the nearest point. For ``det x > 1`` the problem is not convex;
        the figure is then the distance to ``x / det(x)^{1/n}``, a point of SL(n).
        """
        _check(x, self._owner)
        xc = x.astype(compute_dtype(x.dtype))
        if x.size == 0:
            return jnp.zeros(x.shape[:-2], xc.dtype)
        sigma = _singular_values(xc)
        det = numerics.lapack(jnp.linalg.det, xc)
        s = sigma.at[..., -1].multiply(jnp.where(det < 0, -1.0, 1.0).astype(xc.dtype))

        def tau(mu: jax.Array) -> jax.Array:
            return (s + jnp.sqrt(s * s + 4 * mu[..., None])) / 2

        # Bisection on mu in [0, 1 + σₙ]; the product is increasing in mu and >= 1 there: at
        # mu = 1, with a = (σₙ + √(σₙ² + 4)) / 2, tau_i >= a for every s_i >= 0 (σᵢ >= σₙ) and
        # tau_n = 1 / a when s_n = -σₙ (n >= 2); for n = 1, tau = 1 at mu = 1 + σ₁.
        lo = jnp.zeros(det.shape, xc.dtype)
        hi = 1 + sigma[..., -1]

        def body(_: Any, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            lo, hi = bounds
            mid = (lo + hi) / 2
            up = jnp.sum(jnp.log(tau(mid)), axis=-1) < 0
            return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 2 * jnp.finfo(xc.dtype).nmant + 8, body, (lo, hi))
        near = jnp.sqrt(jnp.sum((tau((lo + hi) / 2) - s) ** 2, axis=-1))
        g = jnp.exp(jnp.sum(jnp.log(jnp.maximum(sigma, jnp.finfo(xc.dtype).tiny)), axis=-1))
        g = g ** (1 / xc.shape[-1])
        scaled = jnp.sqrt(jnp.sum(sigma**2, axis=-1)) * jnp.abs(1 - 1 / g)
        return jnp.where(det > 1, scaled, near)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "sln"
    torch_function_positional = ()
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` a matrix of determinant 1, in place.

    Registers :class:`paramx.constraints.SpecialLinear` (geotorch's ``SL``): the original (an
    ``nnx.Param``) holds the chart's coordinates (0 right after registration), the ``base`` is
    state, and the value is ``base @ expm(A) @ expm(S − tr(S)/n·I)``. Registration and
    assignment keep a value of SL(n) exactly and refuse any other (rescale it by
    ``det^{-1/n}`` first).

    Args:
      module: The module (``nnx.Linear(n, n)``, a conv with as many input as output channels).
      name: The attribute to constrain.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax, jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> from paramx._src.parametrizations.general_linear import SpecialLinear
      >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      >>> layer.kernel[...] = SpecialLinear().sample(jax.random.key(0), (3, 3))
      >>> layer = pnx.sln(layer)
      >>> round(float(jnp.linalg.det(layer.kernel)), 4)
      1.0
    """


def invertible(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.Invertible`: the selected square matrices stay
    invertible with a positive determinant (GL⁺(n)); geotorch's ``invertible``.

    The registered values must already have ``det > 0`` (they are kept exactly); a Dense kernel
    (in, out) with in == out is then an orientation-preserving invertible map of feature space,
    and a conv kernel (*spatial, in, out) with in == out one per spatial tap.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square, or a matrix of it has ``det ≤ 0``.
      TypeError: If it is a complex, integer or boolean tensor.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.general_linear import Invertible, invertible
      >>> kernel = Invertible().sample(jax.random.key(1), (3, 3))
      >>> tree = invertible({"kernel": kernel}, "kernel")
      >>> bool(jnp.array_equal(px.materialize(tree)["kernel"], kernel))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, Invertible(), batch_axes=batch_axes)


def sln(tree: Any, where: Any, *, batch_axes: int = 0) -> Any:
    """Registers :class:`paramx.constraints.SpecialLinear`: the selected square matrices keep a
    determinant of 1 (SL(n)); geotorch's ``sln``.

    The registered values must already have ``det = 1`` (to :meth:`SpecialLinear.in_manifold`'s
    tolerance; they are kept exactly); a Dense kernel (in, out) with in == out is then a
    volume-preserving map of feature space, and a conv kernel (*spatial, in, out) with
    in == out one per spatial tap.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not square, or a matrix of it has ``det ≠ 1``.
      TypeError: If it is a complex, integer or boolean tensor.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.general_linear import SpecialLinear, sln
      >>> kernel = SpecialLinear().sample(jax.random.key(1), (3, 3))
      >>> tree = sln({"kernel": kernel}, "kernel")
      >>> bool(jnp.array_equal(px.materialize(tree)["kernel"], kernel))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, SpecialLinear(), batch_axes=batch_axes)
