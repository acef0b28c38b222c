"""`weight_norm`: w = g * v / |v|, with g and v as the two originals (torch's original0/1).

Layouts. ``dim`` is the axis whose slices are normalized separately (the output features):
torch's default is its weight's axis 0, Flax keeps output features last, so paramx's
default is ``dim=-1``. ``dim=None`` normalizes the whole tensor (g is a scalar). Note one
difference in spelling: torch treats ``dim=-1`` like ``None`` (whole tensor); paramx's
``dim=-1`` is the last axis, like any other negative index. g keeps the weight's rank with
ones on the normalized axes, e.g. (1, out) for a Flax Dense kernel (torch: (out, 1)).

Edge cases. A zero slice of v gives a zero slice of the weight with finite gradients (torch:
NaN). Zero-size tensors work. ``dim`` is validated at construction (an int or None) and
against the tensor at registration; integer and boolean tensors are refused; complex tensors
work (g holds the real norms, stored in the tensor's complex dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.parametrizations import numerics
from paramx._src.parametrizations.numerics import compute_dtype, normalize_axis

_OWNER = "WeightNorm"


@dataclasses.dataclass(frozen=True)
class WeightNorm:
    """The weight-norm parametrization; register it with :func:`paramx.weight_norm`.

    Attributes:
      dim: The axis kept (one norm per slice along it); ``None`` for the whole tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization(
      ...     {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])}, "kernel", px.WeightNorm())
      >>> g, v = px.originals(tree, "kernel")
      >>> g
      Array([[5., 2.]], dtype=float32)
    """

    dim: int | None = -1
    name: str = "weight_norm"

    # ----- paramx.nnx: its torch-named function (paramx._src.integrations.nnx.wrappers) ---
    # The function's name, the options after (module, name) in torch's order, the
    # keyword-only ones, whether it takes a PRNG key, and its docstring (`nnx_doc`).
    # `traceable`: forward, right_inverse, init and update_state can be traced (jax.jit),
    # so paramx.nnx runs them as one compiled program.
    torch_function = "weight_norm"
    torch_function_positional = ("dim",)
    torch_function_keyword = ()
    torch_function_takes_key = False
    traceable = True
    nnx_doc = """Splits ``module.<name>`` into a norm g and a direction v, in place; torch's
    ``weight_norm``.

    Registers :class:`paramx.WeightNorm`: ``original0`` is g (one norm per output feature,
    shape (1, out) for a Dense kernel) and ``original1`` is v, both ``nnx.Param``, so the
    optimizer trains g (``nnx.WeightNorm``'s scales never train, flax#5577). The module's
    output is unchanged by registration.

    Args:
      module: The module.
      name: The attribute to reparametrize.
      dim: The axis of output features (default: the last); ``None`` for one norm over the
        whole tensor. Counted without the ``batch_axes`` stack axes.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> kernel = layer.kernel[...]
      >>> layer = pnx.weight_norm(layer)
      >>> bool(jnp.allclose(layer.kernel, kernel))
      True
    """

    def __post_init__(self) -> None:
        dim = numerics.option_dim(_OWNER, self.dim, default="one norm over the whole tensor")
        object.__setattr__(self, "dim", dim)
        numerics.option_name(_OWNER, self.name)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(range(ndim))
        keep = normalize_axis(
            self.dim,
            ndim,
            "dim is the axis of output features, kept with one norm per slice: Flax kernels "
            "keep them last, the default (dim=-1); dim=None normalizes the whole tensor.",
        )
        return tuple(a for a in range(ndim) if a != keep)

    def _sq(self, v: jax.Array) -> jax.Array:
        numerics.check_dtype(v, "weight_norm")
        x = v.astype(compute_dtype(v.dtype))
        sq = jnp.real(x * jnp.conj(x))
        return jnp.sum(sq, axis=self._axes(v.ndim), keepdims=self.dim is not None)

    def norm(self, v: jax.Array) -> jax.Array:
        """|v| over every axis but ``dim`` (kept as size-1 axes; a scalar for ``None``)."""
        sq = self._sq(v)
        nonzero = sq > 0  # sqrt has an infinite derivative at 0: keep the gradient finite
        norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, jnp.ones_like(sq))), 0)
        return norm.astype(v.dtype)

    def forward(self, g: jax.Array, v: jax.Array) -> jax.Array:
        numerics.check_dtype(g, "weight_norm")
        dtype = v.dtype
        x = v.astype(compute_dtype(dtype))
        sq = self._sq(v)
        # torch returns NaN for a zero slice of v; here it stays zero, with finite gradients.
        norm = jnp.sqrt(jnp.where(sq > 0, sq, jnp.ones_like(sq))).astype(x.dtype)
        return (x * (g.astype(x.dtype) / norm)).astype(dtype)

    def right_inverse(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.norm(w), w

    def health(
        self, value: jax.Array, inputs: Any, *, params: Any, state: Any
    ) -> dict[str, jax.Array]:
        """Health figure for :func:`paramx.table`: ``v_norm_min``, the smallest norm of a slice
        of the direction v. The gradient through ``v / |v|`` grows like ``1 / |v|``, so a
        slice whose norm shrinks towards 0 makes training unstable."""
        norms = jnp.real(self.norm(inputs[1]))
        if norms.size == 0:
            return {"v_norm_min": jnp.zeros((), norms.dtype)}
        return {"v_norm_min": jnp.min(norms)}

    # ----- torch interop: the protocol of paramx._src.integrations.torch ------------------
    # torch.nn.utils.weight_norm's hook-based keys: `<module>.<name>_g`, `<module>.<name>_v`.
    torch_legacy_suffixes = ("_g", "_v")

    def torch_originals(self, link: Any) -> list[Any]:
        """torch's ``original0`` (g) and ``original1`` (v), both in the weight's layout: g
        keeps the weight's rank with ones on the normalized axes, so a Dense kernel's g
        (1, out) is torch's (out, 1); ``dim=None``'s scalar g is copied as is."""
        return [
            link.array(name, ("original", i), like_weight=len(x.shape) == len(link.shape))
            for i, (name, x) in enumerate(zip(link.original_names, link.originals))
        ]


def weight_norm(tree: Any, where: Any, dim: int | None = -1, *, batch_axes: int = 0) -> Any:
    """Registers weight normalization; torch's ``weight_norm``.

    The originals are ``original0 = g`` (the norms) and ``original1 = v`` (the direction),
    initialized so that the weight is unchanged by registration, as in torch (and unlike
    Flax's ``WeightNorm``, whose scale starts at 1).

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      dim: The axis of output features (default: the last, Flax's layout); ``None`` for one
        norm over the whole tensor. See the module notes for torch's ``dim=-1``.
      batch_axes: How many leading axes index a stack of independent tensors (the layer axis
        of an ``nn.scan`` / ``nn.vmap`` stack): each tensor of the stack is registered and
        computed separately. See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      IndexError: If ``dim`` is out of range for a selected tensor.
      TypeError: If ``dim`` is neither an int nor None, or the tensor is an integer or
        boolean one.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> kernel = jax.random.normal(jax.random.key(0), (4, 3))
      >>> tree = px.weight_norm({"kernel": kernel}, "kernel")
      >>> [x.shape for x in px.originals(tree, "kernel")]
      [(1, 3), (4, 3)]
      >>> bool(jnp.allclose(px.materialize(tree)["kernel"], kernel))
      True
    """
    from paramx._src.core.register import register_parametrization

    return register_parametrization(tree, where, WeightNorm(dim), batch_axes=batch_axes)
