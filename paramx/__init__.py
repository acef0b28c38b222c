"""paramx: PyTorch's parametrizations for JAX and Flax, functional and stateless.

Register a parametrization on a leaf of a parameter tree, train the raw originals, and
materialize the constrained tree at apply time. See ``docs/design.md``.
"""

from paramx import interop as interop
from paramx import linen as linen
from paramx import nnx as nnx
from paramx._src import serialization as _serialization  # noqa: F401  (registers with flax)
from paramx._src.assign import assign as assign
from paramx._src.inspect import get_parametrized as get_parametrized
from paramx._src.inspect import is_parametrized as is_parametrized
from paramx._src.inspect import originals as originals
from paramx._src.inspect import summary as summary
from paramx._src.materialize import cached as cached
from paramx._src.materialize import materialize as materialize
from paramx._src.node import Parametrized as Parametrized
from paramx._src.optimizer import param_labels as param_labels
from paramx._src.optimizer import param_mask as param_mask
from paramx._src.orthogonal import Orthogonal as Orthogonal
from paramx._src.orthogonal import orthogonal as orthogonal
from paramx._src.parametrization import Parametrization as Parametrization
from paramx._src.paths import path_keys as path_keys
from paramx._src.register import register_parametrization as register_parametrization
from paramx._src.remove import remove_parametrizations as remove_parametrizations
from paramx._src.spectral_norm import SpectralNorm as SpectralNorm
from paramx._src.spectral_norm import spectral_norm as spectral_norm
from paramx._src.state import merge_state as merge_state
from paramx._src.state import split_state as split_state
from paramx._src.transfer import (
    transfer_parametrizations_and_params as transfer_parametrizations_and_params,
)
from paramx._src.weight_norm import WeightNorm as WeightNorm
from paramx._src.weight_norm import weight_norm as weight_norm

__version__ = "0.1.0"

__all__ = [
    "Orthogonal",
    "Parametrization",
    "Parametrized",
    "SpectralNorm",
    "WeightNorm",
    "assign",
    "cached",
    "get_parametrized",
    "is_parametrized",
    "materialize",
    "merge_state",
    "originals",
    "orthogonal",
    "param_labels",
    "param_mask",
    "path_keys",
    "register_parametrization",
    "remove_parametrizations",
    "spectral_norm",
    "split_state",
    "summary",
    "transfer_parametrizations_and_params",
    "weight_norm",
]
