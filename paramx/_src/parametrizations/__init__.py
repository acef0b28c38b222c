"""The parametrizations: one file per family, and their matrix numerics.

Imports the core only. :data:`BUILTINS` lists the built-in parametrization classes, which
``paramx`` exports; ``paramx.nnx`` builds a torch-named function for each that declares one
(``torch_function``).
"""

from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal
from paramx._src.parametrizations.cholesky import Cholesky, CorrelationCholesky
from paramx._src.parametrizations.conv_orthogonal import (
    BlockOrthogonalConv,
    CayleyConv,
    SkewOrthogonalConv,
)
from paramx._src.parametrizations.conv_spectral_norm import ConvSpectralNorm
from paramx._src.parametrizations.general_linear import Invertible, SpecialLinear
from paramx._src.parametrizations.grassmannian import Grassmannian
from paramx._src.parametrizations.lipschitz_rescaling import AOL, SLL
from paramx._src.parametrizations.low_rank import FixedRank, LowRank
from paramx._src.parametrizations.ordered import Ordered
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.positive import Interval, Positive
from paramx._src.parametrizations.product import Product
from paramx._src.parametrizations.psd import (
    PositiveDefinite,
    PositiveSemidefinite,
    PositiveSemidefiniteFixedRank,
    PositiveSemidefiniteLowRank,
)
from paramx._src.parametrizations.simplex import Simplex
from paramx._src.parametrizations.skew import Skew, SkewHermitian
from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal
from paramx._src.parametrizations.spectral_norm import SpectralNorm
from paramx._src.parametrizations.sphere import Sphere
from paramx._src.parametrizations.symmetric import Hermitian, Symmetric
from paramx._src.parametrizations.weight_norm import WeightNorm

BUILTINS: tuple[type, ...] = (
    Orthogonal,
    SpectralNorm,
    WeightNorm,
    Symmetric,
    Skew,
    Sphere,
    Positive,
    Interval,
    Simplex,
    Ordered,
    SpecialOrthogonal,
    Cholesky,
    CorrelationCholesky,
    PositiveDefinite,
    PositiveSemidefinite,
    PositiveSemidefiniteLowRank,
    Invertible,
    SpecialLinear,
    Product,
    AlmostOrthogonal,
    Grassmannian,
    LowRank,
    FixedRank,
    PositiveSemidefiniteFixedRank,
    Hermitian,
    SkewHermitian,
    ConvSpectralNorm,
    SkewOrthogonalConv,
    BlockOrthogonalConv,
    CayleyConv,
    AOL,
    SLL,
)
"""The built-in parametrization classes."""
