"""`orthogonal`: matrices with orthonormal columns (or rows), as torch's parametrization.

The value is Q in K^{m x n} (K = R or C) with Q^H Q = I_n when m >= n and Q Q^H = I_m when
m < n, for the last two axes of the array; leading axes are a batch of matrices.

Layouts. A Flax ``Dense`` kernel K is (in, out), the transpose of torch's ``Linear.weight``
W. paramx computes exactly the transpose of what torch computes on W = K^T, for every
shape: torch works on W's tall orientation, which is K^T unless K is strictly tall (a
square kernel is transposed too, so the skew part comes from K's upper triangle). A Dense
kernel with in <= out gets orthonormal rows, as torch's weight with out >= in gets
orthonormal columns, and the originals are the transposes of torch's. For conv
kernels, Flax's last two axes are (in, out) and torch's are the spatial ones: paramx makes
each spatial tap orthogonal in channel space, where torch orthogonalizes each (kh, kw)
slice. Transpose to torch's layout first if you need torch's behaviour there.

Maps (on the tall orientation X of shape (n, k), n >= k, torch's working matrix):

* ``matrix_exp`` / ``cayley``: A = tril(X) padded with zero columns to n x n, skew part
  A - A^H, then exp or the Cayley map, first k columns.
* ``householder`` (real only): the strictly lower part of X holds reflectors with
  tau = 2 / (1 + |a|^2), column signs from the signs of X's diagonal (+1 for a zero entry).
* ``polar`` (real only; not in torch): the orthogonal polar factor of X itself, by matrix
  products only (``linalg.polar``: three Polar Express steps with bfloat16 products for
  float32 tensors, then full-precision Newton-Schulz steps; no LU, no data-dependent control
  flow). The value is orthogonal to float32 rounding when X's singular values lie within a
  factor of about 20 of each other (near-orthogonal originals: with trivialization the
  original starts at I, without it at the registered value's polar factor); beyond, the value
  is not orthogonal (``in_manifold`` says so). It is X's polar factor to about 1e-3 (bfloat16)
  in general and exactly (to float32 rounding) for an orthogonal X, so ``right_inverse``
  without trivialization returns the value itself: exact on orthogonal values.

``expm_plan`` chooses ``linalg.expm_skew``'s plan for ``matrix_exp``: ``"adaptive"`` (Padé,
degree and squarings chosen at run time with ``lax.cond``/``while_loop``, fewest products),
``"static"`` (degree-18 Taylor and masked squarings: no data-dependent control flow, matrix
products only, for GPUs and TPUs) or None: static on an accelerator backend, adaptive on CPU.

Column signs: a difference from torch. torch multiplies column j by ``int(X[j, j])``, the
diagonal truncated toward zero. ``right_inverse`` stores +-1 there, so both agree as long as
the diagonal stays +-1; but weight decay (``optax.adamw`` pulls -1 to -0.9999), a chained
registration (the diagonal of a spectral-normed or ``tanh``-ed tensor lies in (-1, 1)) or a
rank-deficient value put other numbers there, and torch's column becomes 0 (|X[j, j]| < 1)
or is scaled by 2, 3, ... (|X[j, j]| >= 2): the value is no longer orthogonal, and a zero
column gets no gradient back. paramx uses the sign instead, so the value is orthogonal for
every X; the two agree (to rounding) wherever torch's value is orthogonal (1 <= |X[j, j]| < 2).
No gradient flows into the diagonal in either.

Accuracy. The value (after the base, if any) ends with one Newton-Schulz step,
Q <- Q + Q (I - Q^H Q) / 2, which turns an error E = I - Q^H Q into O(E^2): what is left is
the rounding of Q^H Q itself, for every map. Measured after 1,000 Adam steps on 16 float32
(12, 5) kernels (``tests/golden/measure_orthogonality.py`` for torch 2.13), max |Q^T Q - I|
is 1.3-1.6e-7 for every map and setting, against 2.3e-7 to 2.2e-6 for torch; at (64, 32)
paramx's is 2.6-4.3e-7, float32's rounding floor (torch's 2-4e-7, its matrix_exp 5e-6). On
the manifold the step is the identity, and its derivative is the identity on tangent
directions. Every map but polar produces only tangent directions, so after those the step is
differentiated as the identity (``numerics.polish``: no products in the backward pass,
gradients equal to autodiff's up to O(E)); after polar, orthogonal only to its iteration's
accuracy, by autodiff. An exactly orthogonal value (E = 0) passes through unchanged.

With ``use_trivialization=True`` (the default), the state holds an orthogonal ``base`` and
the value is ``base @ map(X)``; registering (or assigning) a value Q sets ``base`` from Q
and the original to -I, so the value right after registration is the Q factor of the
registered matrix (positive diagonal of R), to rounding. A square Q is kept as it is only if it
is orthogonal to torch's tolerance 10 n eps on every entry of |Q^H Q - I|; torch's
``allclose`` also allows 1e-5 on the diagonal (its rtol), which keeps e.g. a float32
orthogonal init cast to float64 (error 1e-7 there) as the base for the whole of training.
paramx takes its Q factor instead, orthogonal to 1e-16.

Complex tensors: unitary. For complex64/complex128 the value is unitary (Q^H Q = I, or
Q Q^H = I when wide), as torch's: ``matrix_exp`` (the default for complex) and ``cayley``
build the skew-Hermitian A = tril(X) - tril(X)^H, whose diagonal keeps 2i Im(X_jj), and map
it to U(n) (``linalg.expm_skew`` and ``linalg.cayley`` and their VJPs are exact for
skew-Hermitian inputs); ``householder`` refuses complex tensors, as torch does. Registration,
assignment, ``update_base`` and ``in_manifold`` use the same formulas with conjugate
transposes, the Q factor's R gets a real positive diagonal, and ``sample`` draws from Haar on
U(n) (the circular unitary ensemble) or the Stiefel manifold of C^{n x k}. Training: for a real
loss L of complex originals, ``jax.grad`` returns dL/dRe - i dL/dIm, the conjugate of the
steepest-ascent direction (JAX's convention; torch's ``.grad`` is the direction itself), and
optax applies updates as they come: give it ``jax.tree.map(jnp.conj, grads)``, or Adam moves
the imaginary parts uphill.

Validation: options are checked when the dataclass is built; the tensor (at least 2-D,
floating point, not complex for householder) at registration; an assigned value must have
the registered batch and matrix size (torch's "Expected a matrix or batch of matrices of
shape ..."). Zero-size tensors are accepted (their value is empty).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul, missing_state

_MAPS = ("matrix_exp", "cayley", "householder", "polar")
_OWNER = "Orthogonal"


def _mH(x: jax.Array) -> jax.Array:
    return jnp.conj(jnp.matrix_transpose(x))


def _flip(x: Any) -> bool:
    """Whether the tall orientation of a Flax-layout matrix is its transpose.

    torch works on its weight W, transposing it only when wide. A Flax kernel is K = W^T, so
    torch's working matrix is K^T unless K is strictly tall: square kernels flip too.
    """
    return x.shape[-2] <= x.shape[-1]


def _eye_like(x: jax.Array) -> jax.Array:
    n, k = x.shape[-2:]
    return jnp.broadcast_to(jnp.eye(n, k, dtype=x.dtype), x.shape)


def _signs(d: jax.Array) -> jax.Array:
    """+1 where ``d >= 0`` (zero included), -1 elsewhere; never 0, unlike ``sign``."""
    return jnp.where(d >= 0, jnp.ones_like(d), -jnp.ones_like(d))


def _make_orthogonal(a: jax.Array) -> jax.Array:
    """The Q factor of a tall ``a`` with a real, non-negative diagonal of R."""
    q, r = numerics.lapack(jnp.linalg.qr, a)
    d = jnp.diagonal(r, axis1=-2, axis2=-1)
    mag = jnp.abs(d)
    phase = jnp.where(mag > 0, d / jnp.where(mag > 0, mag, 1).astype(d.dtype), 1).astype(q.dtype)
    return q * phase[..., None, :]


def _is_orthogonal(q: jax.Array) -> jax.Array:
    """Whether every entry of |Q^H Q - I| is at most 10 * n * eps (torch's atol).

    torch's ``allclose`` adds rtol = 1e-5 relative to I, i.e. on the diagonal: a float32
    orthogonal matrix cast to float64 passes it and would stay 1e-7 away from orthogonal.
    """
    n, k = q.shape[-2:]
    eps = jnp.finfo(q.dtype).eps
    gram = matmul(_mH(q), q)
    err = jnp.abs(gram - jnp.broadcast_to(jnp.eye(k, dtype=q.dtype), gram.shape))
    return jnp.all(err <= 10.0 * n * eps)


@jax.jit  # one program when called eagerly (registration), as jax.numpy's functions
def _complete_base(q: jax.Array) -> jax.Array:
    """An n x n unitary whose first k columns are the Q factor of the tall ``q``.

    torch completes with random columns; paramx completes deterministically with the QR of
    [q, I], whose Householder Q is unitary even where [q, I] is rank deficient.
    """
    n, k = q.shape[-2:]
    qk = _make_orthogonal(q)
    if n == k:
        return qk
    ext = jnp.concatenate([qk, jnp.broadcast_to(jnp.eye(n, dtype=q.dtype), (*q.shape[:-1], n))], -1)
    full, _ = numerics.lapack(jnp.linalg.qr, ext)
    return jnp.concatenate([qk, full[..., :, k:n]], axis=-1)


@jax.jit
def _householder_q(a: jax.Array) -> jax.Array:
    """First k columns of H_1 ... H_k, H_i = I - tau_i v_i v_i^T, v_i = e_i + a[:, i].

    With tau_i = 2 / (v_i^T v_i) each H_i is an exact reflection, and the product has the
    compact WY form I - V T V^T with T^{-1} = triu(V^T V, 1) + diag(V^T V) / 2 (upper
    triangular). So Q[:, :k] = I_{n,k} - V T V[:k]^T: matrix products and one triangular
    solve, differentiable as they stand (``householder_product`` has no derivative rule).
    """
    n, k = a.shape[-2:]
    eye = jnp.broadcast_to(jnp.eye(n, k, dtype=a.dtype), a.shape)
    v = a + eye
    gram = matmul(jnp.matrix_transpose(v), v)
    t_inv = jnp.triu(gram, 1) + jnp.diagonal(gram, axis1=-2, axis2=-1)[..., None, :] * (
        0.5 * jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), gram.shape)
    )
    w = numerics.lapack(
        jax.scipy.linalg.solve_triangular, t_inv, jnp.matrix_transpose(v[..., :k, :]), lower=False
    )
    return eye - matmul(v, w)


@dataclasses.dataclass(frozen=True)
class Orthogonal:
    """The orthogonal parametrization; register it with :func:`paramx.orthogonal`.

    Attributes:
      orthogonal_map: ``"matrix_exp"``, ``"cayley"``, ``"householder"``, ``"polar"``
        (matrix products only, see the module docstring), or ``None`` for torch's rule:
        ``matrix_exp`` if the matrix is square or complex, else ``householder``.
      use_trivialization: Keep an orthogonal ``base`` as state (the dynamic trivialization
        framework); the value is ``base @ map(original)``.
      expm_plan: The plan of ``matrix_exp``: ``"adaptive"``, ``"static"`` (no data-dependent
        control flow) or ``None`` (static on GPU/TPU, adaptive on CPU).

    A complex tensor (complex64, complex128) gets a unitary value, through ``matrix_exp``
    (the default for complex tensors) or ``cayley``; train it with conjugated gradients (see
    the module docstring: ``jax.tree.map(jnp.conj, grads)`` before optax).

    Raises:
      ValueError, TypeError: At construction, for an unknown map or an option of the wrong
        type; at registration, for a tensor of fewer than 2 dimensions, an integer or boolean
        tensor, or householder with a complex one.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"w": jnp.eye(3)}, "w", px.Orthogonal("cayley"))
      >>> px.materialize(tree)["w"]
      Array([[1., 0., 0.],
             [0., 1., 0.],
             [0., 0., 1.]], dtype=float32)
      >>> u = px.Orthogonal().sample(jax.random.key(0), (3, 3), jnp.complex64)  # Haar on U(3)
      >>> tree = px.register_parametrization({"w": u}, "w", px.Orthogonal())
      >>> w = px.materialize(tree)["w"]
      >>> bool(jnp.allclose(w, u, atol=1e-6)), bool(px.Orthogonal().in_manifold(w))
      (True, True)
    """

    orthogonal_map: str | None = None
    use_trivialization: bool = True
    name: str = "orthogonal"
    expm_plan: str | None = None

    # ----- paramx.nnx: its torch-named function (paramx._src.integrations.nnx.wrappers) ---
    # The function's name, the options after (module, name) in torch's order, the
    # keyword-only ones, whether it takes a PRNG key, and its docstring (`nnx_doc`).
    # `traceable`: forward, right_inverse, init and update_state can be traced (jax.jit),
    # so paramx.nnx runs them as one compiled program.
    torch_function = "orthogonal"
    torch_function_positional = ("orthogonal_map",)
    torch_function_keyword = ("use_trivialization", "expm_plan")
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Makes ``module.<name>`` orthogonal, in place; torch's ``orthogonal``.

    Registers :class:`paramx.Orthogonal` with the shape and dtype checks on (torch skips
    them), so assigning a value of another shape or dtype raises. Right after
    registration the kernel reads as the Q factor of its value; with the default
    trivialization the original is -I and the orthogonal ``base`` is
    :class:`ParametrizationState`, set only at registration and on assignment. On a Flax
    kernel (in, out) it computes the transpose of torch's result on the (out, in) weight;
    a conv kernel gets one orthogonal (in, out) matrix per spatial tap.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      orthogonal_map: ``"matrix_exp"``, ``"cayley"``, ``"householder"``, ``"polar"`` or
        ``None`` (torch's rule: ``matrix_exp`` if square or complex, else ``householder``).
      use_trivialization: Keep an orthogonal base as state (default True).
      expm_plan: ``matrix_exp``'s plan: ``"adaptive"``, ``"static"`` or None (default).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``): one
        orthogonal matrix per layer.

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
      >>> k = layer.kernel
      >>> bool(jnp.allclose(k @ k.T, jnp.eye(3), atol=1e-5))
      True
    """

    def __post_init__(self) -> None:
        m = self.orthogonal_map
        if m is not None and (not isinstance(m, str) or m not in _MAPS):
            error = ValueError if isinstance(m, str) else TypeError
            raise error(
                'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". '
                f'Got: {m!r}. Pass one of these names (or paramx\'s "polar"), or None for '
                "torch's default (matrix_exp for square or complex matrices, householder "
                "otherwise)."
            )
        triv = numerics.option_bool(_OWNER, "use_trivialization", self.use_trivialization)
        object.__setattr__(self, "use_trivialization", triv)
        from paramx._src.parametrizations import linalg

        linalg.check_plan(self.expm_plan, f"{_OWNER}: expm_plan")
        numerics.option_name(_OWNER, self.name)

    # ----- shape rules -------------------------------------------------------------------
    def map_for(self, x: Any) -> str:
        """The map used for a tensor of ``x``'s shape and dtype (validating both)."""
        if len(x.shape) < 2:
            raise ValueError(
                f"Expected a matrix or batch of matrices. Got a tensor of {len(x.shape)} "
                f"dimensions. orthogonal acts on the last two axes (a batch of matrices "
                f"before them); register it on a kernel, not on a bias or a scalar."
            )
        numerics.check_dtype(x, "orthogonal")
        complex_ = jnp.issubdtype(x.dtype, jnp.complexfloating)
        name = self.orthogonal_map
        if name is None:
            name = "matrix_exp" if x.shape[-2] == x.shape[-1] or complex_ else "householder"
        if name in ("householder", "polar") and complex_:
            raise ValueError(
                f"The {name} parametrization does not support complex tensors. Use "
                'orthogonal_map="matrix_exp" or "cayley" (or None, which picks matrix_exp '
                "for complex tensors)."
            )
        return name

    # ----- the protocol --------------------------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        self.map_for(value)  # validates ndim, map and dtype before anything else runs
        if not self.use_trivialization:
            return None, None
        return None, {"base": self._base(value)}

    def forward(self, x: jax.Array, *, params: Any, state: Any) -> jax.Array:
        name = self.map_for(x)
        if state is None and self.use_trivialization:
            raise missing_state("orthogonal", "the base")
        if x.size == 0:  # an empty matrix (or batch) is orthogonal as it is
            return x
        dtype = x.dtype
        x = x.astype(compute_dtype(dtype))
        flip = _flip(x)
        if flip:
            x = jnp.matrix_transpose(x)
        n, k = x.shape[-2:]
        if name == "householder":
            q = _householder_q(jnp.tril(x, -1))
            # torch multiplies by int(diag), which zeroes columns whose |diag| < 1: signs only.
            signs = jax.lax.stop_gradient(_signs(jnp.diagonal(x, axis1=-2, axis2=-1)))
            q = q * signs[..., None, :]
        elif name == "polar":
            from paramx._src.parametrizations import linalg

            # One finishing step here, the second is the final Newton-Schulz step below.
            q = linalg.polar(x, finishing_steps=1)
        else:
            from paramx._src.parametrizations import linalg

            a = jnp.tril(x)
            if n != k:
                a = jnp.concatenate([a, jnp.zeros((*a.shape[:-1], n - k), a.dtype)], axis=-1)
            a = a - _mH(a)
            if name == "matrix_exp":
                q = linalg.expm_skew(a, plan=self.expm_plan)[..., :k]
            elif state is not None:  # the base's product inside the map, for a shorter VJP
                q = linalg.based_cayley(state["base"].astype(a.dtype), a, k)
            else:
                q = linalg.cayley(a)[..., :k]
        if state is not None and name != "cayley":
            q = matmul(state["base"].astype(q.dtype), q)
        # polar's value is orthonormal only to its iteration's accuracy: its last step keeps
        # the exact derivative; the other maps are orthonormal by construction.
        q = numerics.newton_schulz(q) if name == "polar" else numerics.polish(q)
        if flip:
            q = jnp.matrix_transpose(q)
        return q.astype(dtype)

    def update_base(self, x: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        """Dynamic trivialization (``paramx.update_base``): the base becomes the current value
        and the original the chart's centre, so the value is kept (projected back onto the
        orthogonal matrices if training moved it off by rounding). Without trivialization
        there is no base, and nothing changes."""
        if not self.use_trivialization:
            return x, state
        value = self.forward(x, params=params, state=state)
        return self.right_inverse(value, params=params, state=state)

    def right_inverse(self, q: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        name = self.map_for(q)
        self._check_shape(q, state)
        if not self.use_trivialization:
            if name == "polar":  # the polar factor of an orthogonal matrix is itself
                return self._polar_inverse(q), state
            if name != "householder":
                raise NotImplementedError(
                    "It is not possible to assign to the matrix exponential or the Cayley "
                    "parametrizations when use_trivialization=False. Register with "
                    'use_trivialization=True (the default) or orthogonal_map="householder" '
                    "to assign values, or remove the parametrization and register it again "
                    "on the new value."
                )
            return self._householder_inverse(q), state
        # The original whose map is I: -I for the skew maps (A = 0), I for polar.
        centre = _eye_like(q) if name == "polar" else -_eye_like(q)
        return centre, {"base": self._base(q)}

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    def sample(
        self,
        key: jax.Array,
        shape: Any,
        dtype: Any = jnp.float32,
        distribution: str = "uniform",
    ) -> jax.Array:
        """Points that ``forward`` can produce, for a tensor of ``shape`` (leading axes a batch).

        ``"uniform"`` (the default) is the Haar measure: for a square shape, Haar on O(n)
        (real) or U(n) (complex); otherwise uniform on the Stiefel manifold, the first k
        columns of a Haar n x n matrix (n = the larger, k = the smaller of the last two
        axes). It is the Q factor of a standard (complex) Gaussian n x k matrix with R's
        diagonal made positive (without that sign correction QR's Q is not Haar). The
        orientation is ``forward``'s: a Flax kernel (in, out) with in <= out gets orthonormal
        rows, a strictly tall one orthonormal columns. ``"torus"`` (geotorch's second
        choice) draws from the standard maximal torus: 2 x 2 rotation blocks down the
        diagonal (a 1 last for odd n) with angles uniform on [-pi, pi), or, for complex
        dtypes, diagonal phases; again the first k columns, in ``forward``'s orientation.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> import paramx as px
          >>> q = px.Orthogonal().sample(jax.random.key(0), (2, 3, 5))  # 2 Dense kernels
          >>> bool(jnp.allclose(q @ jnp.swapaxes(q, -1, -2), jnp.eye(3), atol=1e-5))
          True
          >>> px.Orthogonal().in_manifold(q)
          Array([ True,  True], dtype=bool)
        """
        shape, dtype = tuple(shape), jnp.dtype(dtype)
        if len(shape) < 2:
            raise ValueError(
                f"Orthogonal.sample needs a shape of at least 2 axes (a matrix, or a batch of "
                f"them); got {shape}."
            )
        numerics.check_dtype(jax.ShapeDtypeStruct(shape, dtype), _OWNER)
        if distribution not in ("uniform", "torus"):
            raise ValueError(
                f'Orthogonal.sample: distribution must be "uniform" (Haar) or "torus"; got '
                f"{distribution!r}."
            )
        rows, cols = shape[-2:]
        n, k, batch = max(rows, cols), min(rows, cols), shape[:-2]
        cdt = compute_dtype(dtype)
        complex_ = jnp.issubdtype(cdt, jnp.complexfloating)
        if distribution == "uniform":
            q = _make_orthogonal(jax.random.normal(key, (*batch, n, k), cdt))
        else:
            real = jnp.finfo(cdt).dtype
            if complex_:
                theta = jax.random.uniform(key, (*batch, n), real, -jnp.pi, jnp.pi)
                phase = jax.lax.complex(jnp.cos(theta), jnp.sin(theta)).astype(cdt)
                q = jnp.broadcast_to(jnp.eye(n, dtype=cdt), (*batch, n, n)) * phase[..., None, :]
            else:
                theta = jax.random.uniform(key, (*batch, n // 2), real, -jnp.pi, jnp.pi)
                c, s = jnp.cos(theta), jnp.sin(theta)
                even, odd = jnp.arange(0, 2 * (n // 2), 2), jnp.arange(1, 2 * (n // 2), 2)
                q = jnp.broadcast_to(jnp.eye(n, dtype=cdt), (*batch, n, n))
                q = q.at[..., even, even].set(c).at[..., odd, odd].set(c)
                q = q.at[..., even, odd].set(-s).at[..., odd, even].set(s)
            q = q[..., :k]
        if rows <= cols:
            q = jnp.matrix_transpose(q)
        return q.astype(dtype)

    def in_manifold(self, x: jax.Array, atol: float | None = None) -> jax.Array:
        """Whether each matrix is a value ``forward`` can produce: orthonormal columns when it is
        strictly tall, orthonormal rows otherwise (every entry of ``|QᴴQ - I|``, resp.
        ``|QQᴴ - I|``, at most ``atol``; default ``10·n·eps`` of ``x``'s dtype, n the larger
        dimension). One bool per matrix of the batch."""
        if len(x.shape) < 2:
            raise ValueError(
                f"Orthogonal expects a matrix or batch of matrices; got a tensor of "
                f"{len(x.shape)} dimensions."
            )
        numerics.check_dtype(x, "orthogonal")
        t = x.astype(compute_dtype(x.dtype))
        if _flip(t):
            t = jnp.matrix_transpose(t)
        n, k = t.shape[-2:]
        if atol is None:
            atol = 10 * n * float(jnp.finfo(x.dtype).eps)
        gram = matmul(_mH(t), t)
        err = jnp.abs(gram - jnp.broadcast_to(jnp.eye(k, dtype=t.dtype), gram.shape))
        return jnp.max(err, axis=(-2, -1), initial=0.0) <= atol

    def distance(self, x: jax.Array) -> jax.Array:
        """The Frobenius distance to the nearest value ``forward`` can produce (the polar
        factor of ``x`` in ``forward``'s orientation): ``sqrt(sum_i (sigma_i - 1)^2)`` over the
        singular values of ``x``; 0 on the set. Computed in float32 for narrower dtypes."""
        if len(x.shape) < 2:
            raise ValueError(
                f"Orthogonal expects a matrix or batch of matrices; got a tensor of "
                f"{len(x.shape)} dimensions."
            )
        numerics.check_dtype(x, "orthogonal")
        s = numerics.lapack(jnp.linalg.svd, x.astype(compute_dtype(x.dtype)), compute_uv=False)
        return jnp.sqrt(jnp.sum(jnp.square(s - 1), axis=-1))

    def health(
        self, value: jax.Array, inputs: Any, *, params: Any, state: Any
    ) -> dict[str, jax.Array]:
        """Health figure for :func:`paramx.table`: ``orth_error``, the Frobenius norm of
        ``QᴴQ - I`` in ``forward``'s orientation (the largest over a batch of matrices); 0 for
        an orthogonal value, away from 0 when rounding or a corrupted base moved it off."""
        t = value.astype(compute_dtype(value.dtype))
        if _flip(t):
            t = jnp.matrix_transpose(t)
        k = t.shape[-1]
        gram = matmul(_mH(t), t)
        err = gram - jnp.broadcast_to(jnp.eye(k, dtype=t.dtype), gram.shape)
        per_matrix = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(err)), axis=(-2, -1)))
        return {"orth_error": jnp.max(per_matrix, initial=0.0)}

    # ----- helpers -------------------------------------------------------------------------
    def _check_shape(self, q: Any, state: Any) -> None:
        """torch's shape check on assignment, as far as the state (the base) tells the shape."""
        base = None if state is None else state.get("base")
        if base is None:
            return  # without a base the core checks the originals' shapes
        batch, size = tuple(base.shape[:-2]), base.shape[-1]
        if tuple(q.shape[:-2]) != batch or max(q.shape[-2:]) != size:
            lead = ", ".join(map(str, batch)) + (", " if batch else "")
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape ({lead}{size}, k) or "
                f"({lead}k, {size}) with k <= {size}, the registered tensor's shape. Got a "
                f"tensor of shape {tuple(q.shape)}. Assign a value of the tensor's own shape."
            )

    def _base(self, q: jax.Array) -> jax.Array:
        dtype = compute_dtype(q.dtype)
        q = q.astype(dtype)
        if _flip(q):
            q = jnp.matrix_transpose(q)
        n = q.shape[-2]
        if q.size == 0:  # nothing to keep: the identity (an empty batch stays empty)
            return jnp.broadcast_to(jnp.eye(n, dtype=dtype), (*q.shape[:-2], n, n))
        if q.shape[-2] == q.shape[-1]:
            return jnp.where(_is_orthogonal(q), q, _make_orthogonal(q))
        return _complete_base(q)

    def _polar_inverse(self, q: jax.Array) -> jax.Array:
        """An original whose polar map is ``q``'s polar factor: ``q`` itself when it is
        orthogonal (to torch's tolerance), else its polar factor ``U V^H`` (SVD), so the
        iteration starts from a perfectly conditioned original."""
        if q.size == 0:
            return q
        dtype = q.dtype
        x = q.astype(compute_dtype(dtype))
        u, _, vt = numerics.lapack(jnp.linalg.svd, x, full_matrices=False)
        flip = _flip(x)
        t = jnp.matrix_transpose(x) if flip else x
        keep = _is_orthogonal(t)
        return jnp.where(keep, x, matmul(u, vt)).astype(dtype)

    def _householder_inverse(self, q: jax.Array) -> jax.Array:
        if q.size == 0:
            return q
        dtype = q.dtype
        x = q.astype(compute_dtype(dtype))
        flip = _flip(x)
        if flip:
            x = jnp.matrix_transpose(x)
        h, tau = numerics.lapack(
            jnp.linalg.qr, x, mode="raw"
        )  # LAPACK's geqrf, returned transposed
        a = jnp.matrix_transpose(h)
        d = _signs(jnp.diagonal(a, axis1=-2, axis2=-1))  # +-1: R's diagonal may be 0
        d = jnp.where(tau == 0, -d, d)  # LAPACK's "no reflection" reflector: flip its sign
        k = x.shape[-1]
        a = a.at[..., jnp.arange(k), jnp.arange(k)].set(d)
        if flip:
            a = jnp.matrix_transpose(a)
        return a.astype(dtype)

    # ----- torch interop: the protocol of paramx._src.integrations.torch ------------------
    def torch_arrays(self, link: Any) -> list[Any]:
        """torch's ``<i>.base``, copied as is (it lives in the tall orientation in both); the
        original takes the weight's layout (the generic rule). Only a Dense kernel has a
        torch equivalent: paramx's orthogonal on K computes torch's on Kᵀ, transposed."""
        if link.layout.name != "dense":
            raise ValueError(
                f"The tensor at {link.path} is orthogonal in paramx, in {link.layout.rule()}. "
                f"Only the 'dense' layout has a torch equivalent: paramx's orthogonal on a Flax "
                f"kernel K computes torch's orthogonal on Kᵀ, transposed (for conv kernels, "
                f"torch orthogonalizes the trailing spatial matrices of (out, in, *k) and paramx "
                f"the (in, out) matrix of each tap). Store the matrix as a Dense kernel, or pass "
                f"layouts={{{link.module!r}: 'dense'}} if it is one."
            )
        if not self.use_trivialization:
            return []
        link.require_state("the orthogonal base")
        rule = "the base is the same in both (it lives in the tall orientation)"
        return [link.array("base", ("state", "base"), rule=rule)]


def orthogonal(
    tree: Any,
    where: Any,
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
    batch_axes: int = 0,
) -> Any:
    """Registers an orthogonal (unitary) parametrization; torch's ``orthogonal``.

    See :class:`paramx.Orthogonal` for the maps and the layout notes: on a Flax kernel
    (in, out) it computes the transpose of what torch computes on the (out, in) weight.
    Unlike torch (which passes ``unsafe=True``), it registers with the usual checks, so
    assigning a value of another shape raises instead of reshaping the tree.

    Args:
      tree: The tree to register on (e.g. what ``model.init`` returns).
      where: A path, a tuple of keys, or a predicate over key paths.
      orthogonal_map: ``"matrix_exp"``, ``"cayley"``, ``"householder"`` or ``None`` (torch's
        default rule).
      use_trivialization: Keep an orthogonal ``base`` in the state (default True).
      batch_axes: How many leading axes index a stack of independent tensors (the layer axis
        of an ``nn.scan`` / ``nn.vmap`` stack): each tensor of the stack is registered and
        computed separately. Leading axes are a batch of matrices anyway; this keeps the
        stack's layout of the state. See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: For a tensor of fewer than 2 dimensions, an unknown map, or householder
        with a complex tensor.
      TypeError: For an integer or boolean tensor, or an option of the wrong type.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 5))  # a Flax Dense kernel
      >>> tree = px.orthogonal({"kernel": kernel}, "kernel")
      >>> q = px.materialize(tree)["kernel"]
      >>> bool(jnp.allclose(q @ q.T, jnp.eye(3), atol=1e-5))
      True
    """
    from paramx._src.core.register import register_parametrization

    p = Orthogonal(orthogonal_map, use_trivialization)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)
