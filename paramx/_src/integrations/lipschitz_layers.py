"""SLL residual blocks (Araujo et al., ICLR 2023) and term-by-term SOC convolutions as linen and
NNX layers.

``y = x - 2 relu(P_K x + T^(-1/2) b)`` mapped back by ``P_Kᵀ``, where ``P_K`` is the Dense
layer or the conv with the rescaled kernel ``K = W T^(-1/2)`` of
:class:`paramx._src.parametrizations.lipschitz_rescaling.SLL` and ``P_Kᵀ`` its adjoint
(``@ Kᵀ``, or ``convops.conv_transpose``). It is the paper's ``x - 2 W T⁻¹ relu(Wᵀx + b)``
(ReLU is positively homogeneous) and is 1-Lipschitz for every ``W``, ``b`` and ``q > 0``: its
Jacobian ``I - 2 P_Kᵀ Λ P_K`` (``Λ`` the 0/1 diagonal of active units) has eigenvalues in
``[-1, 1]`` because ``‖P_K‖ ≤ 1``. The output has the input's shape whatever the conv's
padding and stride (the adjoint maps back to the input space).

Parameters: ``kernel`` (``(in, features)`` or ``(*kernel_size, in, features)``), ``bias`` and
``log_q`` (``(features,)``), all trained; ``T`` comes from the parametrization's
:func:`~paramx._src.parametrizations.lipschitz_rescaling.rescaling`, so the math lives in one
place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from paramx._src.parametrizations import convops
from paramx._src.parametrizations.conv_orthogonal import (
    SkewOrthogonalConv,
    check_series_padding,
    soc_conv,
)
from paramx._src.parametrizations.lipschitz_rescaling import SLL, per_output

_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()


def sll_block(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    log_q: jax.Array,
    geometry: convops.ConvGeometry | None = None,
    *,
    dtype: Any = None,
) -> jax.Array:
    """The SLL residual block on ``x``: ``x - 2 P_Kᵀ relu(P_K x + b')``, ``K = W T^(-1/2)``,
    ``b' = T^(-1/2) b``.

    Args:
      x: ``(..., in)`` for a Dense kernel ``(in, features)``; ``(batch, *spatial, in)`` for a
        conv kernel ``(*kernel_size, in, features)``.
      kernel: ``W``.
      bias: ``b``, ``(features,)``.
      log_q: ``log q``, ``(features,)``.
      geometry: The conv's options (stride, padding, dilation; ``input_size`` is taken from
        ``x``); ``None`` is ``ConvGeometry()`` (stride 1, SAME). Unused for a Dense kernel.
      dtype: The computation dtype; ``None`` promotes ``x`` and the parameters (Flax's rule).

    Returns:
      An array of ``x``'s shape.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from paramx._src.integrations.lipschitz_layers import sll_block
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> x = jax.random.normal(jax.random.key(1), (2, 3))
      >>> sll_block(x, w, jnp.zeros(5), jnp.zeros(5)).shape
      (2, 3)
    """
    geometry = convops.ConvGeometry() if geometry is None else geometry
    r = SLL(geometry).rescaling(kernel, log_q)  # T^(-1/2), validated, in the compute dtype
    k = kernel.astype(r.dtype) * per_output(r, kernel.ndim)
    b = bias.astype(r.dtype) * r
    x, k, b = nn.dtypes.promote_dtype(x, k, b, dtype=dtype)
    b = per_output(b, x.ndim)
    hi = jax.lax.Precision.HIGHEST
    if kernel.ndim == 2:
        h = jax.nn.relu(jnp.einsum("...i,io->...o", x, k, precision=hi) + b)
        return x - 2 * jnp.einsum("...o,io->...i", h, k, precision=hi)
    if x.ndim != kernel.ndim:
        raise ValueError(
            f"An SLL conv block with a kernel of shape {list(kernel.shape)} takes inputs "
            f"(batch, *spatial, in) with {kernel.ndim - 2} spatial axes; got {list(x.shape)}. "
            f"Add the batch axis (x[None])."
        )
    g = convops.ConvGeometry(
        input_size=x.shape[1:-1],
        strides=geometry.strides,
        padding=geometry.padding,
        kernel_dilation=geometry.kernel_dilation,
    )
    h = jax.nn.relu(convops.conv(x, k, g) + b)
    return x - 2 * convops.conv_transpose(h, k, g)


# ----- linen -------------------------------------------------------------------------------


class SLLDense(nn.Module):
    """The SLL residual block on features (linen): ``x - 2 relu(x @ K + b') @ Kᵀ``, 1-Lipschitz.

    Attributes:
      features: The hidden width (columns of the kernel); the output has the input's width.
      kernel_init: Initializer of ``W``.
      bias_init: Initializer of ``b``.
      dtype: Computation dtype (``None``: promote the input and the parameters).
      param_dtype: Dtype of the parameters.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from paramx._src.integrations.lipschitz_layers import SLLDense
      >>> block = SLLDense(8)
      >>> x = jnp.ones((2, 4))
      >>> variables = block.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'bias': (8,), 'kernel': (4, 8), 'log_q': (8,)}
      >>> block.apply(variables, x).shape
      (2, 4)
    """

    features: int
    kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT
    bias_init: Callable[..., Any] = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (jnp.shape(x)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        log_q = self.param("log_q", nn.initializers.zeros, (self.features,), self.param_dtype)
        return sll_block(x, kernel, bias, log_q, dtype=self.dtype)


class SLLConv(nn.Module):
    """The SLL residual block on images (linen): ``x - 2 convᵀ(relu(conv(x, K) + b'))``,
    1-Lipschitz, with the output of the input's shape.

    Attributes:
      features: The hidden channels (the kernel's output channels).
      kernel_size: The kernel's spatial size, e.g. ``(3, 3)``.
      strides: As ``flax.linen.Conv``'s.
      padding: As ``flax.linen.Conv``'s (``REFLECT`` is refused: it is not 1-Lipschitz).
      kernel_dilation: As ``flax.linen.Conv``'s.
      kernel_init: Initializer of ``W``.
      bias_init: Initializer of ``b``.
      dtype: Computation dtype (``None``: promote the input and the parameters).
      param_dtype: Dtype of the parameters.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from paramx._src.integrations.lipschitz_layers import SLLConv
      >>> block = SLLConv(8, (3, 3))
      >>> x = jnp.ones((1, 6, 6, 4))
      >>> variables = block.init(jax.random.key(0), x)
      >>> variables["params"]["kernel"].shape, block.apply(variables, x).shape
      ((3, 3, 4, 8), (1, 6, 6, 4))
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT
    bias_init: Callable[..., Any] = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        geometry = _geometry(self.strides, self.padding, self.kernel_dilation)
        shape = (*tuple(self.kernel_size), jnp.shape(x)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        log_q = self.param("log_q", nn.initializers.zeros, (self.features,), self.param_dtype)
        return sll_block(x, kernel, bias, log_q, geometry, dtype=self.dtype)


class SOCConv(nn.Module):
    """A skew-orthogonal convolution applied term by term (linen): the operator of
    :func:`~paramx.lipschitz.soc` with the merged kernel, computed as ``terms - 1`` convs with
    the raw ``kernel_size`` (:func:`~paramx.lipschitz.soc_conv`), plus a bias.

    Orthogonal (to the truncation of the series) for ``features == in`` with ``"SAME"`` or
    ``"CIRCULAR"`` padding; 1-Lipschitz for every channel count and stride. Its parameters are
    the raw kernel ``(*kernel_size, in, features)`` and the bias.

    Attributes:
      features: The output channels.
      kernel_size: The raw kernel's spatial size, odd, e.g. ``(3, 3)``.
      terms: Terms of the exponential series (default 6).
      max_norm: The bound on the scaled skew conv's norm (default 1).
      strides: As ``flax.linen.Conv``'s (the stride-1 output is subsampled).
      padding: ``"SAME"`` or ``"CIRCULAR"``.
      kernel_dilation: As ``flax.linen.Conv``'s.
      use_bias: Whether to add a bias.
      kernel_init: Initializer of the raw kernel.
      bias_init: Initializer of the bias.
      dtype: Computation dtype (``None``: promote the input and the parameters).
      param_dtype: Dtype of the parameters.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from paramx.linen import SOCConv
      >>> layer = SOCConv(4, (3, 3), terms=10, use_bias=False)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y = layer.apply(variables, x)
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5))
      True
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    terms: int = 6
    max_norm: float = 1.0
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT
    bias_init: Callable[..., Any] = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        geometry = _geometry(self.strides, self.padding, self.kernel_dilation)
        shape = (*tuple(self.kernel_size), jnp.shape(x)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return _soc_layer(x, kernel, bias, self.terms, self.max_norm, geometry, self.dtype)


def _soc_layer(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    terms: int,
    max_norm: float,
    geometry: convops.ConvGeometry,
    dtype: Any,
) -> jax.Array:
    """``soc_conv`` plus the bias, in Flax's dtype rule (``None`` promotes the input and the
    parameters)."""
    if bias is None:
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=dtype)
    else:
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    y = soc_conv(x, kernel, terms=terms, max_norm=max_norm, geometry=geometry)
    return y if bias is None else y + per_output(bias, y.ndim)


def _geometry(strides: Any, padding: Any, kernel_dilation: Any) -> convops.ConvGeometry:
    return convops.ConvGeometry(
        strides=strides if isinstance(strides, int) else tuple(strides),
        padding=padding,
        kernel_dilation=kernel_dilation
        if isinstance(kernel_dilation, int)
        else tuple(kernel_dilation),
    )


# ----- NNX ---------------------------------------------------------------------------------


class SLLLinear(nnx.Module):
    """The SLL residual block on features (NNX): ``x - 2 relu(x @ K + b') @ Kᵀ``, 1-Lipschitz.

    Args:
      in_features: The input (and output) width.
      features: The hidden width (columns of the kernel).
      kernel_init: Initializer of ``W``.
      bias_init: Initializer of ``b``.
      dtype: Computation dtype (``None``: promote the input and the parameters).
      param_dtype: Dtype of the parameters.
      rngs: The module's ``nnx.Rngs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from paramx._src.integrations.lipschitz_layers import SLLLinear
      >>> block = SLLLinear(4, 8, rngs=nnx.Rngs(0))
      >>> block.kernel.shape, block(jnp.ones((2, 4))).shape
      ((4, 8), (2, 4))
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT,
        bias_init: Callable[..., Any] = nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype))
        self.log_q = nnx.Param(jnp.zeros((features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return sll_block(x, self.kernel[...], self.bias[...], self.log_q[...], dtype=self.dtype)


class NNXSLLConv(nnx.Module):
    """The SLL residual block on images (NNX; public as ``paramx.nnx.SLLConv``):
    ``x - 2 convᵀ(relu(conv(x, K) + b'))``, 1-Lipschitz, output of the input's shape.

    Args:
      in_features: The input (and output) channels.
      features: The hidden channels (the kernel's output channels).
      kernel_size: The kernel's spatial size, e.g. ``(3, 3)``.
      strides: As ``nnx.Conv``'s.
      padding: As ``nnx.Conv``'s (``REFLECT`` is refused: it is not 1-Lipschitz).
      kernel_dilation: As ``nnx.Conv``'s.
      kernel_init: Initializer of ``W``.
      bias_init: Initializer of ``b``.
      dtype: Computation dtype (``None``: promote the input and the parameters).
      param_dtype: Dtype of the parameters.
      rngs: The module's ``nnx.Rngs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from paramx._src.integrations.lipschitz_layers import NNXSLLConv
      >>> block = NNXSLLConv(4, 8, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
      >>> block(jnp.ones((1, 6, 6, 4))).shape
      (1, 6, 6, 4)
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT,
        bias_init: Callable[..., Any] = nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.geometry = _geometry(strides, padding, kernel_dilation)
        SLL(self.geometry)  # refuses REFLECT padding now, not at the first call
        shape = (*tuple(kernel_size), in_features, features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype))
        self.log_q = nnx.Param(jnp.zeros((features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k, b, lq = self.kernel[...], self.bias[...], self.log_q[...]
        return sll_block(x, k, b, lq, self.geometry, dtype=self.dtype)


class NNXSOCConv(nnx.Module):
    """A skew-orthogonal convolution applied term by term (NNX; public as
    ``paramx.nnx.SOCConv``): ``terms - 1`` convs with the raw kernel
    (:func:`~paramx.lipschitz.soc_conv`), plus a bias. See ``paramx.linen.SOCConv``.

    Args:
      in_features: The input channels.
      features: The output channels.
      kernel_size: The raw kernel's spatial size, odd, e.g. ``(3, 3)``.
      terms: Terms of the exponential series (default 6).
      max_norm: The bound on the scaled skew conv's norm (default 1).
      strides: As ``nnx.Conv``'s (the stride-1 output is subsampled).
      padding: ``"SAME"`` or ``"CIRCULAR"``.
      kernel_dilation: As ``nnx.Conv``'s.
      use_bias: Whether to add a bias.
      kernel_init: Initializer of the raw kernel.
      bias_init: Initializer of the bias.
      dtype: Computation dtype (``None``: promote the input and the parameters).
      param_dtype: Dtype of the parameters.
      rngs: The module's ``nnx.Rngs``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from paramx.nnx import SOCConv
      >>> layer = SOCConv(4, 4, (3, 3), terms=10, use_bias=False, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
      >>> bool(jnp.allclose(jnp.linalg.norm(layer(x)), jnp.linalg.norm(x), rtol=1e-5))
      True
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int] = (3, 3),
        *,
        terms: int = 6,
        max_norm: float = 1.0,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT,
        bias_init: Callable[..., Any] = nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.geometry = _geometry(strides, padding, kernel_dilation)
        SkewOrthogonalConv(terms=terms, max_norm=max_norm, geometry=self.geometry)
        check_series_padding(self.geometry.padding)  # refused now, not at the first call
        self.terms, self.max_norm = terms, max_norm
        shape = (*tuple(kernel_size), in_features, features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (features,), param_dtype)) if use_bias else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return _soc_layer(
            x, self.kernel[...], bias, self.terms, self.max_norm, self.geometry, self.dtype
        )
