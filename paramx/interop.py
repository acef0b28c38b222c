"""Interop with PyTorch checkpoints: ``state_dict`` of a parametrized model <-> paramx tree.

:func:`from_torch_state_dict` reads a torch ``model.state_dict()`` (torch tensors or numpy
arrays; torch itself is never imported) into a paramx tree, using a template tree with the
same parametrizations registered. :func:`to_torch_state_dict` writes a paramx tree back under
torch's keys. Both handle torch's parametrization keys (``parametrizations.<name>.original``,
``original0``/``original1``, spectral norm's ``<i>._u``/``<i>._v``, orthogonal's ``<i>.base``),
the legacy ``weight_g``/``weight_v`` of ``torch.nn.utils.weight_norm``, plain tensors, and the
Linear/Conv/ConvTranspose layouts. ``LAYOUTS`` lists the layouts ``layouts=`` accepts.

Examples:
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> from paramx import interop
  >>> tree = px.spectral_norm({"fc": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}}, "fc/kernel")
  >>> sorted(interop.to_torch_state_dict(tree))
  ['fc.bias', 'fc.parametrizations.weight.0._u', 'fc.parametrizations.weight.0._v',
   'fc.parametrizations.weight.original']
"""

from paramx._src.torch_state_dict import LAYOUTS as LAYOUTS
from paramx._src.torch_state_dict import from_torch_state_dict as from_torch_state_dict
from paramx._src.torch_state_dict import to_torch_state_dict as to_torch_state_dict

__all__ = ["LAYOUTS", "from_torch_state_dict", "to_torch_state_dict"]
