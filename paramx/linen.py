"""Flax linen integration: parametrizations declared inside a model definition.

``Parametrize`` wraps any linen module; see :class:`paramx.linen.Parametrize`.
"""

from paramx._src.integrations.linen import Parametrize as Parametrize

__all__ = ["Parametrize"]
