"""Flax NNX integration: torch's parametrize API on NNX modules (mutated in place).

See :mod:`paramx._src.integrations.nnx` for the design: ``module.parametrizations[name]``
holds the originals (``nnx.Param``) and state (:class:`ParametrizationState`), and
``module.<name>`` reads the constrained value. The torch-named functions (``orthogonal``,
``spectral_norm``, ``weight_norm``) are built from the built-in parametrization classes,
one for each class that declares ``torch_function``.
"""

from paramx._src.integrations.lipschitz_layers import NNXSLLConv as SLLConv
from paramx._src.integrations.lipschitz_layers import NNXSOCConv as SOCConv
from paramx._src.integrations.lipschitz_layers import SLLLinear as SLLLinear
from paramx._src.integrations.nnx.cache import cached as cached
from paramx._src.integrations.nnx.classes import (
    type_before_parametrizations as type_before_parametrizations,
)
from paramx._src.integrations.nnx.container import ParametrizationList as ParametrizationList
from paramx._src.integrations.nnx.container import Parametrizations as Parametrizations
from paramx._src.integrations.nnx.container import ParametrizationState as ParametrizationState
from paramx._src.integrations.nnx.container import is_parametrized as is_parametrized
from paramx._src.integrations.nnx.load import load_plain as load_plain
from paramx._src.integrations.nnx.load import plain_state as plain_state
from paramx._src.integrations.nnx.register import (
    register_parametrization as register_parametrization,
)
from paramx._src.integrations.nnx.remove import remove_parametrizations as remove_parametrizations
from paramx._src.integrations.nnx.table import table as table
from paramx._src.integrations.nnx.tie import Tied as Tied
from paramx._src.integrations.nnx.tie import tie as tie
from paramx._src.integrations.nnx.tie import untie as untie
from paramx._src.integrations.nnx.wrappers import torch_functions as _torch_functions
from paramx._src.parametrizations import BUILTINS as _BUILTINS

_TORCH_FUNCTIONS = _torch_functions(_BUILTINS)
globals().update(_TORCH_FUNCTIONS)  # orthogonal, spectral_norm, weight_norm, ...
# doctest finds only functions defined in a module; these are built here, so list them.
__test__ = dict(_TORCH_FUNCTIONS)

__all__ = [
    "ParametrizationList",
    "ParametrizationState",
    "Parametrizations",
    "SLLConv",
    "SLLLinear",
    "SOCConv",
    "Tied",
    "cached",
    "is_parametrized",
    "load_plain",
    "plain_state",
    "register_parametrization",
    "remove_parametrizations",
    "table",
    "tie",
    "type_before_parametrizations",
    "untie",
]
__all__ += sorted(_TORCH_FUNCTIONS)
