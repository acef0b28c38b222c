"""Flax linen integration: parametrizations declared inside a model definition.

``Parametrize`` wraps any linen module; see :class:`paramx.linen.Parametrize`.
"""

from paramx._src.integrations.linen import Parametrize as Parametrize
from paramx._src.integrations.lipschitz_layers import SLLConv as SLLConv
from paramx._src.integrations.lipschitz_layers import SLLDense as SLLDense
from paramx._src.integrations.lipschitz_layers import SOCConv as SOCConv

__all__ = ["Parametrize", "SLLConv", "SLLDense", "SOCConv"]
