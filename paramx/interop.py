"""Interop with PyTorch checkpoints: ``state_dict`` of a parametrized model <-> paramx tree.

:func:`from_torch_state_dict` reads a torch ``model.state_dict()`` (torch tensors or numpy
arrays; torch itself is never imported) into a paramx tree, using a template tree with the
same parametrizations registered. :func:`to_torch_state_dict` writes a paramx tree back under
torch's keys. Both handle torch's parametrization keys (``parametrizations.<name>.original``,
``original0``/``original1``, spectral norm's ``<i>._u``/``<i>._v``, orthogonal's ``<i>.base``),
the legacy ``weight_g``/``weight_v`` of ``torch.nn.utils.weight_norm``, plain tensors, and the
Linear/Conv/ConvTranspose layouts. ``LAYOUTS`` lists the layouts ``layouts=`` accepts.

Both also take an NNX module (plain, or registered with ``paramx.nnx``): reading returns an
``nnx.State`` for ``nnx.update(model, state)``. ``strict=False`` keeps the template's values
for missing keys and skips unexpected ones, as torch's ``load_state_dict`` does;
``return_report=True`` returns the lists (:class:`IncompatibleKeys`).

Module names. torch's ``encoder.layers.0`` is the Flax path ``encoder/layers/0`` unless
``modules=`` maps it. A linen model names its modules differently from torch in two common
cases, and ``modules=`` says how they pair:

* a list of submodules set up in ``setup`` (torch ``nn.ModuleList``): torch
  ``encoder.layers.0``, Flax ``encoder/layers_0``;
* ``nn.Sequential``: torch numbers the children of ``nn.Sequential(nn.Linear(3, 4),
  nn.ReLU(), nn.Linear(4, 2))`` ``0`` and ``2`` (the ReLU is child 1); a linen
  ``nn.Sequential`` built in ``setup`` names them ``layers_0`` and ``layers_2``, and one built
  inline in a compact method leaves ``Dense_0`` and ``Dense_1`` in the parent module. So
  ``modules={"net.0": "net/layers_0", "net.2": "net/layers_2"}``.

When names do not match, the error lists the unmatched keys and a suggested ``modules=`` that
pairs modules holding the same keys and shapes. ``nnx.Sequential`` (whose layers sit at
``layers/0``, ``layers/2``) is mapped to torch's names automatically.

Examples:
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> from paramx import interop
  >>> tree = px.spectral_norm({"fc": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}}, "fc/kernel")
  >>> sorted(interop.to_torch_state_dict(tree))
  ['fc.bias', 'fc.parametrizations.weight.0._u', 'fc.parametrizations.weight.0._v',
   'fc.parametrizations.weight.original']

  A linen ``nn.Sequential`` read from torch's ``nn.Sequential`` (activations take indices in
  torch and in the names of a linen ``Sequential`` set up in ``setup``):

  >>> import numpy as np
  >>> template = {"net": {"layers_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
  ...                     "layers_2": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}}
  >>> sd = {"net.0.weight": np.ones((4, 3), np.float32), "net.0.bias": np.zeros(4, np.float32),
  ...       "net.2.weight": np.ones((2, 4), np.float32), "net.2.bias": np.zeros(2, np.float32)}
  >>> try:
  ...     interop.from_torch_state_dict(sd, template)
  ... except ValueError as e:
  ...     print(str(e).splitlines()[-2].strip())
  modules={'net.0': 'net/layers_0', 'net.2': 'net/layers_2'}
  >>> modules = {"net.0": "net/layers_0", "net.2": "net/layers_2"}
  >>> tree = interop.from_torch_state_dict(sd, template, modules=modules)
  >>> tree["net"]["layers_2"]["kernel"].shape
  (4, 2)
"""

from paramx._src.integrations.torch.layouts import LAYOUTS as LAYOUTS
from paramx._src.integrations.torch.read import from_torch_state_dict as from_torch_state_dict
from paramx._src.integrations.torch.report import IncompatibleKeys as IncompatibleKeys
from paramx._src.integrations.torch.write import to_torch_state_dict as to_torch_state_dict

__all__ = ["LAYOUTS", "IncompatibleKeys", "from_torch_state_dict", "to_torch_state_dict"]
