"""Lipschitz and orthogonal convolutions: constraints on a conv (or Dense) layer as an operator.

torch's ``spectral_norm`` on a conv normalizes the reshaped kernel, which is not the operator
norm of the convolution. The parametrizations here constrain the operator that
``flax.linen.Conv`` / ``nnx.Conv`` applies, which depends on its stride, padding, dilation and
input size: :class:`ConvGeometry` holds those options, spelled as Flax spells them.

- Normalization: :func:`conv_spectral_norm` (power iteration on the conv itself, the exact
  circular spectrum by FFT, or a certified Gram-iteration bound).
- Orthogonal convolutions: :func:`bcop` (block convolution orthogonal, any padding and
  stride), :func:`soc` (skew-orthogonal convolution; :func:`soc_conv` and the layers
  ``paramx.linen.SOCConv`` / ``paramx.nnx.SOCConv`` apply it term by term),
  :func:`cayley_conv` (Cayley transform in the Fourier domain; circular padding).
- Cheap rescalings that make any kernel 1-Lipschitz: :func:`aol`, :func:`sll` (and the SLL
  residual blocks ``paramx.linen.SLLDense`` / ``SLLConv``, ``paramx.nnx.SLLLinear`` /
  ``SLLConv``).
- Reading bounds: :func:`lipschitz` (each layer's certified and measured norm),
  :func:`network_bound` (a chain of layers), :func:`operator_norm`, :func:`gram_bound`.

Examples:
  >>> import flax.linen as nn
  >>> import jax
  >>> import paramx as px
  >>> from paramx import lipschitz
  >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  >>> variables = nn.Conv(4, (3, 3)).init(jax.random.key(1), x)
  >>> geometry = lipschitz.ConvGeometry(input_size=(8, 8), padding="SAME")
  >>> tree = lipschitz.conv_spectral_norm(variables, "params/kernel", geometry=geometry,
  ...                                     method="gram")
  >>> report = lipschitz.lipschitz(tree)
  >>> bool(report["params/kernel"].certified <= 1.0 + 1e-5)
  True
"""

from paramx._src.parametrizations.conv_orthogonal import (
    BlockOrthogonalConv as BlockOrthogonalConv,
)
from paramx._src.parametrizations.conv_orthogonal import CayleyConv as CayleyConv
from paramx._src.parametrizations.conv_orthogonal import (
    SkewOrthogonalConv as SkewOrthogonalConv,
)
from paramx._src.parametrizations.conv_orthogonal import bcop as bcop
from paramx._src.parametrizations.conv_orthogonal import cayley_conv as cayley_conv
from paramx._src.parametrizations.conv_orthogonal import soc as soc
from paramx._src.parametrizations.conv_orthogonal import soc_conv as soc_conv
from paramx._src.parametrizations.conv_orthogonal import soc_kernel_size as soc_kernel_size
from paramx._src.parametrizations.conv_spectral_norm import ConvSpectralNorm as ConvSpectralNorm
from paramx._src.parametrizations.conv_spectral_norm import (
    conv_spectral_norm as conv_spectral_norm,
)
from paramx._src.parametrizations.conv_spectral_norm import gram_bound as gram_bound
from paramx._src.parametrizations.conv_spectral_norm import operator_norm as operator_norm
from paramx._src.parametrizations.convops import ConvGeometry as ConvGeometry
from paramx._src.parametrizations.convops import (
    circular_singular_values as circular_singular_values,
)
from paramx._src.parametrizations.convops import conv as conv
from paramx._src.parametrizations.convops import conv_transpose as conv_transpose
from paramx._src.parametrizations.convops import frequency_response as frequency_response
from paramx._src.parametrizations.lipschitz_bound import LayerBound as LayerBound
from paramx._src.parametrizations.lipschitz_bound import LipschitzReport as LipschitzReport
from paramx._src.parametrizations.lipschitz_bound import lipschitz as lipschitz
from paramx._src.parametrizations.lipschitz_bound import network_bound as network_bound
from paramx._src.parametrizations.lipschitz_rescaling import AOL as AOL
from paramx._src.parametrizations.lipschitz_rescaling import SLL as SLL
from paramx._src.parametrizations.lipschitz_rescaling import aol as aol
from paramx._src.parametrizations.lipschitz_rescaling import sll as sll

__all__ = [
    "AOL",
    "SLL",
    "BlockOrthogonalConv",
    "CayleyConv",
    "ConvGeometry",
    "ConvSpectralNorm",
    "LayerBound",
    "LipschitzReport",
    "SkewOrthogonalConv",
    "aol",
    "bcop",
    "cayley_conv",
    "circular_singular_values",
    "conv",
    "conv_spectral_norm",
    "conv_transpose",
    "frequency_response",
    "gram_bound",
    "lipschitz",
    "network_bound",
    "operator_norm",
    "sll",
    "soc",
    "soc_conv",
    "soc_kernel_size",
]
