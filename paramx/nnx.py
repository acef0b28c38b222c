"""Flax NNX integration: torch's parametrize API on NNX modules (mutated in place).

See :mod:`paramx._src.integrations.nnx` for the design: ``module.parametrizations[name]`` holds the
originals (``nnx.Param``) and state (:class:`ParametrizationState`), and ``module.<name>``
reads the constrained value.
"""

from paramx._src.integrations.nnx import ParametrizationList as ParametrizationList
from paramx._src.integrations.nnx import Parametrizations as Parametrizations
from paramx._src.integrations.nnx import ParametrizationState as ParametrizationState
from paramx._src.integrations.nnx import cached as cached
from paramx._src.integrations.nnx import is_parametrized as is_parametrized
from paramx._src.integrations.nnx import orthogonal as orthogonal
from paramx._src.integrations.nnx import register_parametrization as register_parametrization
from paramx._src.integrations.nnx import remove_parametrizations as remove_parametrizations
from paramx._src.integrations.nnx import spectral_norm as spectral_norm
from paramx._src.integrations.nnx import (
    type_before_parametrizations as type_before_parametrizations,
)
from paramx._src.integrations.nnx import weight_norm as weight_norm

__all__ = [
    "ParametrizationList",
    "ParametrizationState",
    "Parametrizations",
    "cached",
    "is_parametrized",
    "orthogonal",
    "register_parametrization",
    "remove_parametrizations",
    "spectral_norm",
    "type_before_parametrizations",
    "weight_norm",
]
