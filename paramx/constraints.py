"""The constraint catalogue: every parametrization beyond torch's three built-ins.

Each is a frozen dataclass (register it with :func:`paramx.register_parametrization`, chain it,
use it in ``paramx.linen.Parametrize``) and a tree function of the same name in lower case
(``constraints.positive(tree, "params/scale")``); ``paramx.nnx`` has a function of that name for
NNX modules. Each also has ``sample`` (its documented distribution; :func:`paramx.sampler` makes
an initializer of it), ``in_manifold`` and ``distance``, and its ``right_inverse`` is exact on the
set and, off it, the nearest point where one exists (otherwise registration raises, naming the
path). The README's table lists them with their geotorch names.

Examples:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> from paramx import constraints
  >>> tree = {"cov": jnp.array([[2.0, 0.5], [0.5, 1.0]]), "w": jnp.array([0.2, 0.3, 0.5])}
  >>> tree = constraints.positive_definite(tree, "cov")
  >>> tree = constraints.simplex(tree, "w")
  >>> plain = px.materialize(tree)
  >>> bool(jnp.allclose(plain["w"], jnp.array([0.2, 0.3, 0.5]), atol=1e-6))
  True
  >>> bool(constraints.PositiveDefinite().in_manifold(plain["cov"]))
  True
"""

from paramx._src.parametrizations.almost_orthogonal import AlmostOrthogonal as AlmostOrthogonal
from paramx._src.parametrizations.almost_orthogonal import almost_orthogonal as almost_orthogonal
from paramx._src.parametrizations.cholesky import Cholesky as Cholesky
from paramx._src.parametrizations.cholesky import CorrelationCholesky as CorrelationCholesky
from paramx._src.parametrizations.cholesky import cholesky as cholesky
from paramx._src.parametrizations.cholesky import correlation_cholesky as correlation_cholesky
from paramx._src.parametrizations.general_linear import Invertible as Invertible
from paramx._src.parametrizations.general_linear import SpecialLinear as SpecialLinear
from paramx._src.parametrizations.general_linear import invertible as invertible
from paramx._src.parametrizations.general_linear import sln as sln
from paramx._src.parametrizations.grassmannian import Grassmannian as Grassmannian
from paramx._src.parametrizations.grassmannian import grassmannian as grassmannian
from paramx._src.parametrizations.low_rank import FixedRank as FixedRank
from paramx._src.parametrizations.low_rank import LowRank as LowRank
from paramx._src.parametrizations.low_rank import fixed_rank as fixed_rank
from paramx._src.parametrizations.low_rank import low_rank as low_rank
from paramx._src.parametrizations.ordered import Ordered as Ordered
from paramx._src.parametrizations.ordered import ordered as ordered
from paramx._src.parametrizations.positive import Interval as Interval
from paramx._src.parametrizations.positive import Positive as Positive
from paramx._src.parametrizations.positive import interval as interval
from paramx._src.parametrizations.positive import positive as positive
from paramx._src.parametrizations.product import Product as Product
from paramx._src.parametrizations.product import product as product
from paramx._src.parametrizations.psd import PositiveDefinite as PositiveDefinite
from paramx._src.parametrizations.psd import PositiveSemidefinite as PositiveSemidefinite
from paramx._src.parametrizations.psd import (
    PositiveSemidefiniteFixedRank as PositiveSemidefiniteFixedRank,
)
from paramx._src.parametrizations.psd import (
    PositiveSemidefiniteLowRank as PositiveSemidefiniteLowRank,
)
from paramx._src.parametrizations.psd import positive_definite as positive_definite
from paramx._src.parametrizations.psd import positive_semidefinite as positive_semidefinite
from paramx._src.parametrizations.psd import (
    positive_semidefinite_fixed_rank as positive_semidefinite_fixed_rank,
)
from paramx._src.parametrizations.psd import (
    positive_semidefinite_low_rank as positive_semidefinite_low_rank,
)
from paramx._src.parametrizations.simplex import Simplex as Simplex
from paramx._src.parametrizations.simplex import simplex as simplex
from paramx._src.parametrizations.skew import Skew as Skew
from paramx._src.parametrizations.skew import SkewHermitian as SkewHermitian
from paramx._src.parametrizations.skew import skew as skew
from paramx._src.parametrizations.skew import skew_hermitian as skew_hermitian
from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal as SpecialOrthogonal
from paramx._src.parametrizations.special_orthogonal import special_orthogonal as special_orthogonal
from paramx._src.parametrizations.sphere import Sphere as Sphere
from paramx._src.parametrizations.sphere import sphere as sphere
from paramx._src.parametrizations.symmetric import Hermitian as Hermitian
from paramx._src.parametrizations.symmetric import Symmetric as Symmetric
from paramx._src.parametrizations.symmetric import hermitian as hermitian
from paramx._src.parametrizations.symmetric import symmetric as symmetric

__all__ = [
    "AlmostOrthogonal",
    "Cholesky",
    "CorrelationCholesky",
    "FixedRank",
    "Grassmannian",
    "Hermitian",
    "Interval",
    "Invertible",
    "LowRank",
    "Ordered",
    "Positive",
    "PositiveDefinite",
    "PositiveSemidefinite",
    "PositiveSemidefiniteFixedRank",
    "PositiveSemidefiniteLowRank",
    "Product",
    "Simplex",
    "Skew",
    "SkewHermitian",
    "SpecialLinear",
    "SpecialOrthogonal",
    "Sphere",
    "Symmetric",
    "almost_orthogonal",
    "cholesky",
    "correlation_cholesky",
    "fixed_rank",
    "grassmannian",
    "hermitian",
    "interval",
    "invertible",
    "low_rank",
    "ordered",
    "positive",
    "positive_definite",
    "positive_semidefinite",
    "positive_semidefinite_fixed_rank",
    "positive_semidefinite_low_rank",
    "product",
    "simplex",
    "skew",
    "skew_hermitian",
    "sln",
    "special_orthogonal",
    "sphere",
    "symmetric",
]
