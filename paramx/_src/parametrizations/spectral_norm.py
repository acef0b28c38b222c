"""`spectral_norm`: W / sigma(W), sigma estimated by power iteration kept as state.

Layouts. ``dim`` is the axis of output features, moved to the front before the rest is
flattened: the matrix is (size of ``dim``, everything else). torch's default is its weight's
axis 0 (axis 1 for ConvTranspose); a Flax kernel keeps output features last for Dense,
Conv and ConvTranspose alike, so paramx's default is the last axis. A Flax Dense kernel
(in, out) with ``dim=-1`` gives the (out, in) matrix of torch's weight, and conv kernels
give the same matrix up to the order of its columns (same sigma, same u). (A Flax
ConvTranspose with ``transpose_kernel=True`` keeps its output features at axis -2: pass
``dim=-2`` there.)

Edge cases. A zero weight stays zero (torch divides 0 by 0): sigma = 0 is replaced by 1. A
power-iteration step whose product is exactly zero keeps the previous vector, so a weight
that starts at zero (``nn.initializers.zeros``) does not lock u and v at zero for good, as
torch's would (its sigma would then stay 0 and the weight would never be normalized). A
zero vector (a 1-D tensor) has a finite gradient (torch's ``x / max(|x|, eps)``: 1 / eps).
Zero-size tensors work. Options are validated at construction; integer and boolean tensors
are refused at registration; complex tensors are supported, as in torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.numerics import (
    compute_dtype,
    matmul,
    missing_state,
    normalize_axis,
)

_OWNER = "SpectralNorm"
_DIM_HINT = (
    "dim is the axis of output features: Flax kernels keep them last, the default "
    "(dim=None); torch's dim=0 is the first axis of its (out, in) weight."
)

_WARMUP_ITERATIONS = 15
# torch runs 15 power iterations when the parametrization is built


def _norm(x: jax.Array) -> jax.Array:
    """The 2-norm, with a finite gradient at zero (``sqrt``'s derivative there is infinite)."""
    sq = jnp.sum(jnp.real(x * jnp.conj(x)))
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, jnp.ones_like(sq))), 0)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """torch's ``F.normalize``: ``x / max(|x|, eps)``."""
    return x / jnp.maximum(_norm(x), eps).astype(x.dtype)


def _normalize_or_keep(x: jax.Array, previous: jax.Array, eps: float) -> jax.Array:
    """``_normalize(x)``, or ``previous`` where ``x`` is exactly zero (a zero weight)."""
    norm = _norm(x)
    return jnp.where(norm > 0, x / jnp.maximum(norm, eps).astype(x.dtype), previous)


@functools.partial(jax.jit, static_argnums=(3, 4))  # one program when called eagerly (init)
def _power_iterations(
    mt: jax.Array, u: jax.Array, v: jax.Array, n: int, eps: float
) -> tuple[jax.Array, jax.Array]:
    # With mat = mt.T: mat @ v is v @ mt, and mat^H @ u is conj(mt) @ u.
    def body(_: Any, uv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        u, v = uv
        u = _normalize_or_keep(matmul(v, mt), u, eps)
        v = _normalize_or_keep(matmul(jnp.conj(mt), u), v, eps)
        return u, v

    return jax.lax.fori_loop(0, n, body, (u, v))


def _flat(w: jax.Array, front: bool) -> jax.Array:
    """``w`` (its axis of features already first or last) as a matrix, that axis kept.

    The sizes are spelled out: ``reshape(-1, 0)`` cannot infer the -1 of a zero-size tensor.
    """
    if front:
        return w.reshape(w.shape[0], math.prod(w.shape[1:]))
    return w.reshape(math.prod(w.shape[:-1]), w.shape[-1])


@dataclasses.dataclass(frozen=True)
class SpectralNorm:
    """The spectral-norm parametrization; register it with :func:`paramx.spectral_norm`.

    State is ``{'u': (h,), 'v': (w,)}`` for the (h, w) matrix; a 1-D tensor has no state and
    is simply L2-normalized.

    Attributes:
      n_power_iterations: Power iterations per state update (training step).
      eps: Floor of the norms in the normalizations.
      dim: Axis of output features; ``None`` means the last axis (Flax's layout).
      axis_name: If set, u and v are averaged over this named axis after each update
        (``shard_map`` / ``pmap`` / ``vmap`` with ``axis_name``), so replicas agree.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.diag(jnp.array([3.0, 1.0]))}, "kernel", px.SpectralNorm())
      >>> px.materialize(tree)["kernel"]
      Array([[1.        , 0.        ],
             [0.        , 0.33333334]], dtype=float32)
    """

    n_power_iterations: int = 1
    eps: float = 1e-12
    dim: int | None = None
    axis_name: Any = None
    name: str = "spectral_norm"

    # ----- paramx.nnx: its torch-named function (paramx._src.integrations.nnx.wrappers) ---
    # The function's name, the options after (module, name) in torch's order, the
    # keyword-only ones, whether it takes a PRNG key, and its docstring (`nnx_doc`).
    # `traceable`: forward, right_inverse, init and update_state can be traced (jax.jit),
    # so paramx.nnx runs them as one compiled program.
    torch_function = "spectral_norm"
    torch_function_positional = ("n_power_iterations", "eps", "dim")
    torch_function_keyword = ("axis_name",)
    torch_function_takes_key = True
    traceable = True
    nnx_doc = """Divides ``module.<name>`` by its spectral norm, in place; torch's
    ``spectral_norm``.

    Registers :class:`paramx.SpectralNorm`. ``u`` and ``v`` are
    :class:`ParametrizationState`: 15 power iterations at registration, then
    ``n_power_iterations`` on each read while the module is in training mode
    (``use_running_average=False``, the default; ``module.eval()`` freezes them). The raw
    kernel is never overwritten, unlike ``nnx.SpectralNorm`` (flax#5576).

    Args:
      module: The module.
      name: The attribute to normalize.
      n_power_iterations: Power iterations per read in training mode.
      eps: Floor of the norms.
      dim: Axis of output features; ``None`` is the last axis (Flax's layout).
      axis_name: Average u and v over this named axis after each update.
      key: PRNG key for the initial u and v.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``): each
        layer is normalized by its own spectral norm, with its own u and v.

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> round(float(jnp.linalg.norm(layer.kernel, 2)), 4)
      1.0
    """

    def __post_init__(self) -> None:
        n = numerics.option_int(_OWNER, "n_power_iterations", self.n_power_iterations)
        if n <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but got "
                f"n_power_iterations={n}. It is the number of power iterations per state "
                "update; the default is 1."
            )
        object.__setattr__(self, "n_power_iterations", n)
        object.__setattr__(self, "eps", numerics.option_positive_float(_OWNER, "eps", self.eps))
        object.__setattr__(
            self, "dim", numerics.option_dim(_OWNER, self.dim, default="the last axis")
        )
        try:
            hash(self.axis_name)
        except TypeError:
            raise TypeError(
                f"{_OWNER}: axis_name must be a hashable axis name (a str, or a tuple of them) "
                f"or None; got {self.axis_name!r} ({type(self.axis_name).__name__})."
            ) from None
        numerics.option_name(_OWNER, self.name)

    def _axis(self, ndim: int) -> int:
        return normalize_axis(-1 if self.dim is None else self.dim, ndim, _DIM_HINT)

    def _check(self, w: Any) -> None:
        """Refuses what has no spectral norm: a scalar, an integer or boolean tensor."""
        if len(w.shape) == 0:
            raise ValueError(
                "spectral_norm expects a tensor with at least 1 dimension; got a scalar. "
                "Register it on a kernel (or a vector, which is L2-normalized)."
            )
        numerics.check_dtype(w, "spectral_norm")
        self._axis(len(w.shape))

    def matrix(self, w: jax.Array) -> jax.Array:
        """The (h, w) matrix whose spectral norm is normalized: ``dim`` first, rest flattened."""
        return _flat(jnp.moveaxis(w, self._axis(w.ndim), 0), front=True)

    def _matrix_t(self, w: jax.Array) -> jax.Array:
        """The transpose of :meth:`matrix`, built without a copy when ``dim`` is the last axis
        (Flax's layout): ``dim`` moved last, the rest flattened in the same order."""
        return _flat(jnp.moveaxis(w, self._axis(w.ndim), -1), front=False)

    def _iterate(self, mt: jax.Array, u: jax.Array, v: jax.Array, n: int) -> tuple:
        return _power_iterations(mt, u, v, n, self.eps)

    # ----- the protocol --------------------------------------------------------------------
    def init(self, value: jax.Array, key: jax.Array) -> tuple[None, Any]:
        self._check(value)
        if value.ndim == 1:
            return None, None
        mt = self._matrix_t(value).astype(compute_dtype(value.dtype))
        ku, kv = jax.random.split(key)
        u = _normalize(jax.random.normal(ku, mt.shape[1:], mt.dtype), self.eps)
        v = _normalize(jax.random.normal(kv, mt.shape[:1], mt.dtype), self.eps)
        u, v = self._iterate(mt, u, v, _WARMUP_ITERATIONS)
        return None, {"u": u, "v": v}

    def update_state(self, w: jax.Array, *, params: Any, state: Any) -> Any:
        if state is None:
            return None
        mt = self._matrix_t(w).astype(state["u"].dtype)
        u, v = self._iterate(mt, state["u"], state["v"], self.n_power_iterations)
        if self.axis_name is not None:
            u = _normalize(jax.lax.pmean(u, self.axis_name), self.eps)
            v = _normalize(jax.lax.pmean(v, self.axis_name), self.eps)
        return {"u": u, "v": v}

    def forward(self, w: jax.Array, *, params: Any, state: Any) -> jax.Array:
        self._check(w)
        if state is None:  # 1-D: plain L2 normalization
            if w.ndim > 1:
                raise missing_state("spectral_norm", "u and v")
            return _normalize(w.astype(compute_dtype(w.dtype)), self.eps).astype(w.dtype)
        mt = self._matrix_t(w).astype(state["u"].dtype)
        # sigma = u^H W v, written as (W^H u)^H v: W^H u is the product that the last power
        # iteration already computed (before normalizing it into v), so XLA reuses it.
        sigma = jnp.vdot(
            matmul(jnp.conj(mt), state["u"]), state["v"], precision=jax.lax.Precision.HIGHEST
        )
        # torch divides by zero here; a zero weight stays zero instead.
        sigma = jnp.where(sigma == 0, jnp.ones_like(sigma), sigma)
        return (w.astype(sigma.dtype) / sigma).astype(w.dtype)

    def health(
        self, value: jax.Array, inputs: Any, *, params: Any, state: Any
    ) -> dict[str, jax.Array]:
        """Health figures for :func:`paramx.table`: ``sigma``, the estimate ``uᴴWv`` that the
        state holds (what ``forward`` divides by), and ``sigma_true``, the largest singular
        value of the tensor's matrix (an SVD). They agree once the power iteration converged;
        a 1-D tensor reports its norm as both."""
        (w,) = inputs
        if state is None:
            norm = _norm(w.astype(compute_dtype(w.dtype)))
            return {"sigma": norm, "sigma_true": norm}
        mt = self._matrix_t(w).astype(state["u"].dtype)
        sigma = jnp.real(
            jnp.vdot(
                matmul(jnp.conj(mt), state["u"]), state["v"], precision=jax.lax.Precision.HIGHEST
            )
        )
        if mt.size == 0:
            return {"sigma": sigma, "sigma_true": jnp.zeros_like(sigma)}
        return {
            "sigma": sigma,
            "sigma_true": numerics.lapack(jnp.linalg.svd, mt, compute_uv=False)[0],
        }

    def right_inverse(self, value: jax.Array, *, params: Any, state: Any) -> tuple[jax.Array, Any]:
        self._check(value)
        if state is not None:  # the state's u and v tell the registered matrix's shape
            h, w = state["u"].shape[-1], state["v"].shape[-1]
            size = math.prod(value.shape)
            out = value.shape[self._axis(value.ndim)] if value.ndim > 1 else None
            if out != h or size != h * w:
                raise ValueError(
                    f"Expected a tensor whose matrix (the output axis dim={self.dim}, then the "
                    f"rest flattened) is {h} x {w}, the registered tensor's. Got a tensor of "
                    f"shape {tuple(value.shape)}, whose matrix is {out} x {size // (out or 1)}. "
                    f"Assign a value of the tensor's own shape."
                )
        return value, state

    # ----- torch interop: the protocol of paramx._src.integrations.torch ------------------
    def torch_arrays(self, link: Any) -> list[Any]:
        """u and v as torch's ``<i>._u`` / ``<i>._v``. paramx's ``dim`` axis of the Flax array
        is torch's ``dim`` axis of its array, so u is the same vector; v is the same up to the
        order of the flattened axes (a conv kernel: torch flattens (in, *k), paramx (*k, in)),
        which ``link.layout.matrix_indices`` gives. A 1-D tensor has no state."""
        if len(link.shape) == 1:
            return []
        state = link.require_state("u and v")
        axis = self._axis(len(link.shape))
        u_idx, v_idx = link.layout.matrix_indices(link.shape, axis)
        rule = (
            f"paramx's spectral_norm dim={self.dim} on the Flax array {tuple(link.shape)} is "
            f"torch's dim={link.layout.perm[axis]} on the torch array "
            f"{link.layout.torch_shape(link.shape)} ({link.layout.rule()})"
        )
        out = []
        for name, idx in (("u", u_idx), ("v", v_idx)):
            if tuple(state[name].shape) != idx.shape:
                raise ValueError(
                    f"The spectral_norm state {name} at {link.path} has shape "
                    f"{tuple(state[name].shape)}, expected {idx.shape} for the tensor's "
                    f"{tuple(link.shape)}; a chain that changes the shape before spectral_norm "
                    f"is not supported by torch interop."
                )
            inv = idx.argsort()
            out.append(
                link.array(
                    "_" + name,
                    ("state", name),
                    to_flax=lambda x, idx=idx: x[idx],
                    to_torch=lambda y, inv=inv: y[inv],
                    rule=rule,
                )
            )
        return out


def spectral_norm(
    tree: Any,
    where: Any,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    axis_name: Any = None,
    key: jax.Array | None = None,
    batch_axes: int = 0,
) -> Any:
    """Registers spectral normalization; torch's ``spectral_norm``.

    u and v start from random unit vectors (drawn from ``key``, one per leaf) followed by 15
    power iterations. They are state: they change only in
    ``materialize(..., update_state=True)`` (``n_power_iterations`` each time, torch's training
    mode), never receive gradients, and sigma = u^H (W v). Registration does not change the
    weight's raw value (``right_inverse`` is the identity, as in torch).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      n_power_iterations: Iterations per state update; must be positive.
      eps: Floor of the norms in the normalizations.
      dim: Axis of output features; ``None`` is the last axis (see the module notes for the
        mapping from torch's layouts).
      axis_name: Average u and v over this named axis after each update (data parallel).
      key: PRNG key for the initial u and v.
      batch_axes: How many leading axes index a stack of independent tensors (the layer axis
        of an ``nn.scan`` / ``nn.vmap`` stack): each layer of the stack is divided by its own
        spectral norm, with its own u and v. See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      IndexError: If ``dim`` is out of range for a selected tensor.
      ValueError: If ``n_power_iterations <= 0``, ``eps`` is not positive and finite, or the
        tensor is a scalar.
      TypeError: For an option of the wrong type (``n_power_iterations=1.5``, ``dim=True``),
        or an integer or boolean tensor.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 3))
      >>> tree = px.spectral_norm({"kernel": kernel}, "kernel")
      >>> w = px.materialize(tree)["kernel"]
      >>> round(float(jnp.linalg.norm(w, 2)), 4)
      1.0
    """
    from paramx._src.core.register import register_parametrization

    p = SpectralNorm(n_power_iterations, eps, dim, axis_name)
    return register_parametrization(tree, where, p, key=key, batch_axes=batch_axes)
