"""`aol` and `sll`: cheap diagonal rescalings that make a Dense or conv kernel 1-Lipschitz.

Both rescale the OUTPUT features of a Flax kernel ``W`` (``(in, out)``, or ``(*spatial, in,
out)`` for a conv) by a positive diagonal computed from the absolute Gram matrix of the
layer, ``A = |WᵀW|`` (``out x out``) for a Dense kernel. For a conv, ``A`` sums the absolute
autocorrelation of the kernel over all spatial offsets ``δ``:
``A[o, o'] = Σ_δ |R(δ)[o, o']|`` with ``R(δ)[o, o'] = Σ_{p, c} W[p + δ, c, o] W[p, c, o']``;
the rescaling holds for zero or circular padding, any stride and any dilation (see "Why any
geometry" below).

* :class:`AOL` (almost-orthogonal layers, Prach and Lampert, ECCV 2022): ``W' = W D`` with
  ``D = diag(d)``, ``d_i = (Σ_j A_ij)^(-1/2)``.
* :class:`SLL` (SDP-based Lipschitz layers, Araujo et al., ICLR 2023): ``K = W T^(-1/2)`` with
  ``T = diag(t)``, ``t_i = Σ_j A_ij q_j / q_i`` and learnable weights ``q > 0`` (its second
  original is ``log q``). AOL is SLL with ``q = 1``. The SLL residual block
  ``x - 2 W T⁻¹ relu(Wᵀx + b)`` equals ``x - 2 K relu(Kᵀx + T^(-1/2) b)`` (ReLU is positively
  homogeneous), so it is written with the rescaled kernel: see
  ``paramx._src.integrations.lipschitz_layers``.

Why 1-Lipschitz (the Schur test). For any matrix ``P`` and positive ``q``, with
``M = |PᵀP|`` and ``t_i = Σ_j M_ij q_j / q_i``: for every ``v``,
``vᵀT^(-1/2) PᵀP T^(-1/2) v ≤ Σ_ij M_ij |v_i| |v_j| / √(t_i t_j)
≤ Σ_ij M_ij (q_j v_i² / (q_i t_i) + q_i v_j² / (q_j t_j)) / 2 = |v|²`` (AM-GM on the middle
term), so ``‖P T^(-1/2)‖ ≤ 1``. With ``P = Wᵀ`` (the layer ``x ↦ x @ W`` on row vectors, whose
output features are ``W``'s columns) this is ``‖W T^(-1/2)‖ = ‖x ↦ x @ K‖ ≤ 1``; ``q = 1`` is
AOL. (Prach and Lampert rescale the input side, ``P D``; the output side used here is the same
theorem on ``Pᵀ``, keeps SLL's ``T`` (which must sit on the hidden features), and is the
tighter of the two for a layer that reduces dimension, ``in >= out``.)

Why any geometry. Let ``C`` be the conv on the unbounded grid (stride 1, no padding). The
Schur test above, on ``C``'s Gram operator ``C Cᵀ`` (whose entry at output positions
``x, x'`` and channels ``o, o'`` is ``R(x - x')[o, o']``), with weights ``q_o`` constant over
positions, has row sums ``t_o`` exactly: ``‖T^(-1/2) C‖ ≤ 1``. A conv with zero padding
(``SAME``, ``VALID``, explicit, ``CAUSAL``) and any stride is ``S C E``: ``E`` embeds the
image in the grid (zeros around it) and ``S`` keeps some output positions, both of norm at
most 1 and commuting with the per-channel ``T``, so ``‖T^(-1/2) S C E‖ ≤ 1``. A circular conv
on an ``n``-grid has the Gram entries ``Σ_m R(x - x' + m n)``, whose absolute row sums are at
most ``t_o`` (``|Σ| ≤ Σ|·|``); with a stride it is followed by an ``S`` again. Dilation only
spreads the taps (the sum over all offsets is unchanged). So ``geometry=None`` is valid for
every Dense kernel and every conv with zero or ``CIRCULAR`` padding, any stride and dilation.
``REFLECT`` padding repeats border pixels (the padding itself has norm up to √2 per axis) and
is refused. The ``geometry`` field is carried for the reading functions (a measured norm needs
the input size) and validated; it does not change the rescaling.

Right inverse (both). Let ``u > 0`` be the Perron vector of ``A = A(V)``, ``A u = ρ u``. Then
``W = V diag(u)`` has ``A(W) = diag(u) A diag(u)``, so AOL's ``t_i = u_i (A u)_i = ρ u_i²`` and
``AOL(W) = V / √ρ``; likewise SLL with ``(W, log q) = (V, log u)`` has ``t_i = ρ`` and gives
``V / √ρ``. A value in the image has ``ρ = 1``, so these right inverses are exact there; any
other ``V`` comes back as ``V / √ρ(A)``, the only point of the image on the ray of ``V`` (for a
block-diagonal ``A`` whose blocks have different radii, the dominant block(s) get that factor
and the others AOL's own rescaling). ``ρ(A) ≥ ‖V‖²``, so registration never scales a kernel
beyond norm 1. ``u`` is read off ``eigh(A)``: the square root of the diagonal of the projector
on the top eigenspace (which also handles a degenerate top eigenvalue, e.g. an orthogonal
``V``'s), floored at ``√eps · max u``; registration on any plain init works.

Tightness. On a Dense kernel whose Gram matrix has a consistent sign pattern the bound is
attained (the value is the spectrally normalized kernel); on random 3x3 convs the measured
norm of AOL's value is about 0.5-0.7 (cancellations in the autocorrelation that ``|·|``
ignores), the price of needing no iteration. SLL's ``q`` lets training tighten ``T``.

Edge cases. A zero column has ``t_i = 0``: its scale is set to 1 (the column stays zero, with
finite values and gradients, and can leave zero). bfloat16 and float16 compute in float32;
every product runs at full precision. Complex kernels are refused. A stack of Dense kernels
``(L, in, out)`` would read as a 1-D conv kernel: register it with ``batch_axes=1``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.parametrizations import convops, numerics
from paramx._src.parametrizations.numerics import compute_dtype, matmul

_HIGHEST = jax.lax.Precision.HIGHEST


# ----- the shared math ----------------------------------------------------------------------


def _check_kernel(w: Any, owner: str) -> None:
    numerics.check_dtype(
        w, owner, complex_ok=False, hint="Register it on a real Dense or conv kernel."
    )
    if w.ndim < 2:
        raise ValueError(
            f"{owner} needs a Dense kernel (in, out) or a conv kernel (*spatial, in, out); got "
            f"shape {list(w.shape)}. Register it on a layer's kernel, not on a bias or a scalar."
        )
    if w.ndim > 5:
        raise ValueError(
            f"{owner} reads a kernel of shape {list(w.shape)} as a conv with {w.ndim - 2} "
            f"spatial axes; at most 3 are supported. For a stack of kernels (nn.scan, "
            f"nn.vmap), pass batch_axes= the number of leading stack axes."
        )


@jax.jit
def abs_gram(w: jax.Array) -> jax.Array:
    """``A = Σ_δ |R(δ)|`` (``out x out``): the absolute Gram matrix ``|WᵀW|`` of a Dense kernel
    ``(in, out)``, or the absolute autocorrelation of a conv kernel ``(*spatial, in, out)``
    summed over all spatial offsets. Computed in ``w``'s dtype, at full precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> from paramx._src.parametrizations.lipschitz_rescaling import abs_gram
      >>> abs_gram(jnp.array([[1.0, 1.0], [0.0, -1.0]]))
      Array([[1., 1.],
             [1., 2.]], dtype=float32)
    """
    if w.ndim == 2:
        return jnp.abs(matmul(w.T, w))
    # All tap pairs' Gram blocks in one product, G[t, s] = w[t]ᵀ w[s], then R(δ) as the sum of
    # the blocks with t - s = δ (a constant 0/1 matrix). XLA's CPU conv with out-channels as
    # the batch was 5x slower for a 3x3 64 -> 64 kernel, forward and backward.
    rank = w.ndim - 2
    taps = w.shape[:rank]
    t_count = math.prod(taps)
    cin, cout = w.shape[-2:]
    wr = jnp.moveaxis(w.reshape(t_count, cin, cout), 0, 1).reshape(cin, t_count * cout)
    g = matmul(wr.T, wr).reshape(t_count, cout, t_count, cout)
    g = jnp.moveaxis(g, 2, 1).reshape(t_count * t_count, cout * cout)
    r = matmul(jnp.asarray(_offsets(taps), w.dtype), g)  # (offsets, out*out): R(δ)[o, o']
    return jnp.sum(jnp.abs(r), axis=0).reshape(cout, cout)


def _offsets(taps: tuple[int, ...]) -> np.ndarray:
    """The 0/1 matrix ``(offsets, taps²)`` that sums the pairs ``(t, s)`` with ``t - s = δ``."""
    rank = len(taps)
    idx = np.indices(taps).reshape(rank, -1).T
    diff = idx[:, None, :] - idx[None, :, :] + (np.array(taps) - 1)
    shape = tuple(2 * k - 1 for k in taps)
    flat = np.ravel_multi_index(tuple(diff[..., a] for a in range(rank)), shape)
    count = len(idx)
    t, s = np.meshgrid(np.arange(count), np.arange(count), indexing="ij")
    m = np.zeros((math.prod(shape), count, count), np.float32)
    m[flat, t, s] = 1
    return m.reshape(-1, count * count)


def _rsqrt_or_one(t: jax.Array) -> jax.Array:
    """``t^(-1/2)``, and 1 where ``t = 0`` (a zero column), with finite gradients."""
    nonzero = t > 0
    return jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, t, jnp.ones_like(t))), 1)


def per_output(r: jax.Array, ndim: int) -> jax.Array:
    """``r`` (one entry per output feature) shaped to multiply a tensor of rank ``ndim``
    along its last axis (explicitly: paramx runs under ``jax_numpy_rank_promotion='raise'``)."""
    return r.reshape((1,) * (ndim - 1) + r.shape)


@jax.jit
def rescaling(w: jax.Array, log_q: jax.Array | None = None) -> jax.Array:
    """The diagonal ``T^(-1/2)`` (shape ``(out,)``, in the compute dtype) of SLL with weights
    ``q = exp(log_q)``, or of AOL (``log_q=None``, ``q = 1``): ``w * rescaling(w, log_q)``
    (along the last axis) is the rescaled kernel, and ``b * rescaling(w, log_q)`` the SLL
    block's rescaled bias.

    Examples:
      >>> import jax.numpy as jnp
      >>> from paramx._src.parametrizations.lipschitz_rescaling import rescaling
      >>> rescaling(jnp.array([[3.0, 0.0], [4.0, 0.0]]))  # column norms 5 and 0
      Array([0.2, 1. ], dtype=float32)
    """
    x = w.astype(compute_dtype(w.dtype))
    a = abs_gram(x)
    if log_q is None:
        t = jnp.sum(a, axis=-1)
    else:
        lq = log_q.astype(x.dtype)
        q = jnp.exp(lq - jax.lax.stop_gradient(jnp.max(lq, initial=0.0)))  # t is scale-free
        t = matmul(a, q) / q
    return _rsqrt_or_one(t)


@jax.jit
def perron_weights(a: jax.Array) -> jax.Array:
    """Positive weights ``u`` (max 1) with ``A u = ρ(A) u`` on the dominant block(s) of a
    symmetric nonnegative ``A``: the square root of the diagonal of the projector on the top
    eigenspace (so a degenerate top eigenvalue, e.g. ``A = I``, gives all ones), floored at
    ``√eps``; a zero ``A`` gives all ones."""
    n = a.shape[-1]
    eps = float(jnp.finfo(a.dtype).eps)
    lam, vecs = numerics.lapack(jnp.linalg.eigh, (a + a.T) / 2, symmetrize_input=False)
    top = lam[-1]
    near = lam >= top - 64 * n * eps * jnp.abs(top)
    u = jnp.sqrt(jnp.sum(jnp.where(near[None, :], vecs * vecs, 0), axis=-1))
    u = u / jnp.maximum(jnp.max(u), jnp.finfo(a.dtype).tiny)
    return jnp.maximum(u, math.sqrt(eps))


@jax.jit
def certified_bound(value: jax.Array) -> jax.Array:
    """An upper bound on the operator norm of the Dense layer or of the conv (zero or circular
    padding, any stride and dilation) whose kernel is ``value``, from the value alone:
    ``√(max_i (A u)_i / u_i)`` for the Perron weights ``u`` of ``A`` (a bound for every
    positive ``u``, by the Schur test above; certified in exact arithmetic), times the margin
    ``1 + 2 (m + n) eps`` for the rounding of the ``m = taps·in``-term products and the
    ``n = offsets·out``-term sums it computes (an allowance of a few ulps per term, not the
    worst-case bound of floating-point error analysis). For an AOL or SLL value in float32 it
    is ``1`` up to that margin (about ``3e-5`` for a 3x3 conv with 4 channels, ``5e-4`` with
    64). The value is read as stored: a bfloat16 value's rounding is in the bound.

    Examples:
      >>> import jax.numpy as jnp
      >>> from paramx._src.parametrizations.lipschitz_rescaling import certified_bound
      >>> round(float(certified_bound(jnp.diag(jnp.array([0.5, 2.0])))), 4)
      2.0
    """
    _check_kernel(value, "certified_bound")
    x = value.astype(compute_dtype(value.dtype))
    a = abs_gram(x)
    u = perron_weights(a)
    r = jnp.max(matmul(a, u) / u)
    rank = x.ndim - 2
    taps = math.prod(x.shape[:rank])
    offsets = math.prod(2 * k - 1 for k in x.shape[:rank])
    slack = 2 * (taps * x.shape[-2] + offsets * x.shape[-1]) * float(jnp.finfo(x.dtype).eps)
    return jnp.sqrt(r) * (1 + slack)


def _check_geometry(owner: str, geometry: Any) -> None:
    if geometry is None:
        return
    if not isinstance(geometry, convops.ConvGeometry):
        raise TypeError(
            f"{owner}: geometry must be a paramx.lipschitz.ConvGeometry or None; got "
            f"{geometry!r} ({type(geometry).__name__})."
        )
    convops.refuse_reflect(owner, geometry)


# ----- AOL ----------------------------------------------------------------------------------

_AOL = "AOL"


@dataclasses.dataclass(frozen=True)
class AOL:
    """Almost-orthogonal layer rescaling (Prach and Lampert, 2022): ``W D`` is 1-Lipschitz.

    ``D = diag(d)`` rescales the output features, ``d_i = (Σ_j A_ij)^(-1/2)`` with ``A`` the
    absolute Gram matrix ``|WᵀW|`` of a Dense kernel ``(in, out)``, or the absolute
    autocorrelation of a conv kernel ``(*spatial, in, out)`` summed over offsets. Proof for
    Dense (the Schur test): ``vᵀDWᵀWDv ≤ Σ_ij A_ij d_i|v_i| d_j|v_j| ≤ Σ_ij A_ij (d_i²v_i² +
    d_j²v_j²)/2 = Σ_i v_i²``, so ``‖x ↦ x @ WD‖ ≤ 1``; the conv case is the same test on the
    conv's Gram operator (module notes). One ``out x out`` Gram (one small conv of the kernel
    with itself for a conv) per forward; no iteration, no state.

    ``right_inverse`` is exact on the image (module notes: ``W = V diag(u)`` with ``u`` the
    Perron vector of ``|VᵀV|``) and maps any other value ``V`` to ``V / √ρ(|VᵀV|)``.

    Attributes:
      geometry: The conv's :class:`paramx.lipschitz.ConvGeometry`, or ``None``: the rescaling
        is valid for every Dense kernel and every conv with zero or circular padding, any
        stride and dilation (module notes), so ``None`` is always allowed; a geometry is
        validated (``REFLECT`` padding is refused) and kept for the reading functions.
      name: The display name.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from paramx.lipschitz import AOL
      >>> w = jax.random.normal(jax.random.key(0), (6, 4))
      >>> k = AOL().forward(w)
      >>> bool(jnp.linalg.norm(k, 2) <= 1 + 1e-5)
      True
    """

    geometry: Any = None
    name: str = "aol"

    def __post_init__(self) -> None:
        _check_geometry(_AOL, self.geometry)
        numerics.option_name(_AOL, self.name)

    def forward(self, w: jax.Array) -> jax.Array:
        _check_kernel(w, _AOL)
        x = w.astype(compute_dtype(w.dtype))
        return (x * per_output(rescaling(x), x.ndim)).astype(w.dtype)

    def right_inverse(self, value: jax.Array) -> jax.Array:
        """``V diag(u)``, ``u`` the Perron weights of ``|VᵀV|``: exact on the image, and
        ``forward`` of it is ``V / √ρ(|VᵀV|)`` otherwise (module notes)."""
        _check_kernel(value, _AOL)
        x = value.astype(compute_dtype(value.dtype))
        return (x * per_output(perron_weights(abs_gram(x)), x.ndim)).astype(value.dtype)

    def lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified bound on the norm of the layer whose kernel is ``value``, computed
        from ``value`` (:func:`certified_bound`): 1 up to ``2 (m + n) eps`` on AOL's values,
        with ``m = taps·in`` and ``n = offsets·out``; the true bound of any other kernel."""
        return certified_bound(value)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "aol"
    torch_function_positional = ()
    torch_function_keyword = ("geometry",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Rescales ``module.<name>``'s output features so that the layer is
    1-Lipschitz, in place (AOL, Prach and Lampert 2022).

    Registers ``paramx.lipschitz.AOL``: the value is ``W D``, ``D`` the diagonal of
    ``(Σ_j |WᵀW|_ij)^(-1/2)`` (for a conv kernel, of its absolute autocorrelation summed over
    offsets). Valid for ``nnx.Linear`` and for ``nnx.Conv`` with zero or circular padding,
    any stride and dilation. Registration keeps the direction of the kernel: a value already
    1-Lipschitz in AOL's sense comes back exactly, any other is divided by one factor.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``).
      name: The attribute to rescale.
      geometry: The conv's ``ConvGeometry`` (optional; for the reading functions).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.aol(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
      >>> bool(jnp.linalg.norm(layer.kernel[...], 2) <= 1 + 1e-5)
      True
    """


def aol(tree: Any, where: Any, *, geometry: Any = None, batch_axes: int = 0) -> Any:
    """Registers :class:`AOL`: the selected Dense or conv kernels become 1-Lipschitz layers.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      geometry: The conv's ``ConvGeometry``, or ``None`` (valid for any zero or circular
        padding, stride and dilation).
      batch_axes: How many leading axes index a stack of independent kernels (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not a kernel (fewer than 2 axes), or for REFLECT
        padding.
      TypeError: For an integer, boolean or complex tensor, or a geometry of the wrong type.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import aol
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
      >>> tree = aol({"conv": {"kernel": kernel}}, "conv/kernel")
      >>> px.materialize(tree)["conv"]["kernel"].shape
      (3, 3, 4, 8)
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, AOL(geometry), batch_axes=batch_axes)


# ----- SLL ----------------------------------------------------------------------------------

_SLL = "SLL"


@dataclasses.dataclass(frozen=True)
class SLL:
    """SDP-based Lipschitz layer rescaling (Araujo et al., ICLR 2023): ``K = W T^(-1/2)``.

    Two originals: the kernel ``W`` and ``log q`` (shape ``(out,)``), the learnable weights of
    ``T = diag(t)``, ``t_i = Σ_j A_ij q_j / q_i`` with ``A`` as for :class:`AOL`. Then
    ``KᵀK ≼ I`` (the Schur test with weights ``q``, module notes): the plain layer ``x ↦ x @ K``
    is 1-Lipschitz, and so is the SLL residual block ``x ↦ x - 2 relu(x @ K + b') @ Kᵀ`` (its
    Jacobian ``I - 2 K Λ Kᵀ``, ``0 ≼ Λ ≼ I``, has eigenvalues in ``[-1, 1]``), which equals
    the paper's ``x - 2 W T⁻¹ relu(Wᵀx + b)`` with ``b' = T^(-1/2) b``. The blocks are
    ``paramx.linen.SLLDense``/``SLLConv`` and ``paramx.nnx.SLLLinear``/``SLLConv``, which call
    :func:`rescaling`.

    ``right_inverse(V)`` is ``(V, log u)``, ``u`` the Perron weights of ``A(V)``: then
    ``t_i = ρ(A)`` for every ``i``, so ``V`` in the image (``ρ = 1``) comes back exactly and
    any other as ``V / √ρ(A)``; ``q`` starts at the weights that make ``T`` tightest.

    Attributes:
      geometry: As for :class:`AOL`.
      name: The display name.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import SLL
      >>> w = jax.random.normal(jax.random.key(0), (6, 4))
      >>> tree = px.register_parametrization({"kernel": w}, "kernel", SLL())
      >>> [x.shape for x in px.originals(tree, "kernel")]
      [(6, 4), (4,)]
      >>> bool(jnp.linalg.norm(px.materialize(tree)["kernel"], 2) <= 1 + 1e-5)
      True
    """

    geometry: Any = None
    name: str = "sll"

    def __post_init__(self) -> None:
        _check_geometry(_SLL, self.geometry)
        numerics.option_name(_SLL, self.name)

    def _check(self, w: jax.Array, log_q: jax.Array) -> None:
        _check_kernel(w, _SLL)
        numerics.check_dtype(log_q, _SLL, complex_ok=False)
        if log_q.shape != (w.shape[-1],):
            raise ValueError(
                f"{_SLL}: log q must have shape ({w.shape[-1]},), one weight per output "
                f"feature of the kernel {list(w.shape)}; got {list(log_q.shape)}. Restore the "
                f"originals from a tree registered with the same kernel shape."
            )

    def rescaling(self, w: jax.Array, log_q: jax.Array) -> jax.Array:
        """``T^(-1/2)``, shape ``(out,)``, in the compute dtype (see :func:`rescaling`)."""
        self._check(w, log_q)
        return rescaling(w, log_q)

    def forward(self, w: jax.Array, log_q: jax.Array) -> jax.Array:
        self._check(w, log_q)
        x = w.astype(compute_dtype(w.dtype))
        return (x * per_output(rescaling(x, log_q), x.ndim)).astype(w.dtype)

    def right_inverse(self, value: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_kernel(value, _SLL)
        x = value.astype(compute_dtype(value.dtype))
        u = perron_weights(abs_gram(x))
        return value, jnp.log(u).astype(value.dtype)

    def lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified bound on the norm of the plain layer whose kernel is ``value``
        (:func:`certified_bound`; 1 up to the slack on SLL's values). The SLL block built on
        a kernel of norm ``β`` has the bound :meth:`block_lipschitz_bound`."""
        return certified_bound(value)

    def block_lipschitz_bound(self, value: jax.Array) -> jax.Array:
        """A certified bound on the SLL residual block ``x - 2 relu(x @ K + b) @ Kᵀ`` with
        ``K = value``: ``max(1, 2β² - 1)``, ``β`` = :meth:`lipschitz_bound` (the Jacobian
        ``I - 2KΛKᵀ`` has eigenvalues in ``[1 - 2β², 1]``)."""
        beta = certified_bound(value)
        return jnp.maximum(jnp.ones_like(beta), 2 * beta * beta - 1)

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "sll"
    torch_function_positional = ()
    torch_function_keyword = ("geometry",)
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Rescales ``module.<name>`` by SLL's ``T^(-1/2)`` (learnable weights q), in
    place, so that the layer is 1-Lipschitz (Araujo et al., ICLR 2023).

    Registers ``paramx.lipschitz.SLL``: ``original0`` is the kernel W and ``original1`` is
    ``log q`` (one per output feature), both ``nnx.Param``. The value is
    ``W T^(-1/2)``, ``t_i = Σ_j |WᵀW|_ij q_j / q_i``. This constrains a plain layer; the SLL
    residual block is ``paramx.nnx.SLLLinear`` / ``SLLConv``.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``).
      name: The attribute to rescale.
      geometry: The conv's ``ConvGeometry`` (optional; for the reading functions).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.sll(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
      >>> bool(jnp.linalg.norm(layer.kernel[...], 2) <= 1 + 1e-5)
      True
    """


def sll(tree: Any, where: Any, *, geometry: Any = None, batch_axes: int = 0) -> Any:
    """Registers :class:`SLL`: the selected kernels become ``W T^(-1/2)`` with learnable
    weights ``q`` (a second original, ``log q``), 1-Lipschitz layers.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      geometry: The conv's ``ConvGeometry``, or ``None`` (valid for any zero or circular
        padding, stride and dilation).
      batch_axes: How many leading axes index a stack of independent kernels. See
        :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If a selected tensor is not a kernel (fewer than 2 axes), or for REFLECT
        padding.
      TypeError: For an integer, boolean or complex tensor, or a geometry of the wrong type.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx.lipschitz import sll
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
      >>> tree = sll({"conv": {"kernel": kernel}}, "conv/kernel")
      >>> [x.shape for x in px.originals(tree, "conv/kernel")]
      [(3, 3, 4, 8), (8,)]
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, SLL(geometry), batch_axes=batch_axes)
