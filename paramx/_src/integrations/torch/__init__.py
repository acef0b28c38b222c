"""PyTorch ``state_dict`` interop: a parametrized torch model's arrays to a paramx tree and back.

torch stores a parametrized tensor ``<module>.<name>`` under these keys (torch 2.13):

* ``<module>.parametrizations.<name>.original`` (or ``original0``, ``original1``, ... when the
  first parametrization's ``right_inverse`` returned several tensors, as ``weight_norm`` does);
* ``<module>.parametrizations.<name>.<i>.<buffer>`` for the buffers of link ``i`` of the chain:
  ``_u`` and ``_v`` for ``spectral_norm``, ``base`` for ``orthogonal`` with trivialization;
* ``<module>.<name>_g`` and ``<module>.<name>_v`` for the legacy hook-based
  ``torch.nn.utils.weight_norm`` (read here, and written with ``legacy_weight_norm=True``);
* ``<module>.<name>`` for a plain tensor.

A state_dict alone does not say which parametrization, with which options, produced it, so
reading takes a *template*: a paramx tree with the same parametrizations registered (e.g.
``model.init(...)["params"]`` passed through ``px.spectral_norm`` and friends). The template
gives the structure, shapes and dtypes; the state_dict gives the values.

Names (``keys.py``, ``modules.py``). A torch module ``encoder.layers.0`` is the Flax path
``encoder/layers/0`` unless ``modules`` maps it elsewhere (``{"encoder.layers.0":
"encoder/layers_0"}``; entries map whole dotted components, longest prefix first). torch's
``weight`` is Flax's ``kernel``, ``scale`` (norm layers) or ``embedding``, whichever the
template's module holds; other names are kept.

Layouts (``layouts.py``; of the tensor torch calls ``weight``; see ``LAYOUTS``). A 2-D
``kernel`` is a Dense kernel (in, out), the transpose of torch's Linear weight (out, in); a
kernel of 3 or more axes is a Conv kernel (*k, in, out) for torch's (out, in, *k). ``layouts``
overrides this per torch module, e.g. ``"conv_transpose"`` for a Flax ``ConvTranspose`` (whose
default ``transpose_kernel=False`` also reverses the spatial axes). Every other tensor is
copied as is. How each built-in parametrization's arrays follow, as each declares it:

* ``weight_norm``: g and v take the weight's layout (torch's g (out, 1) is paramx's (1, out)).
* ``spectral_norm``: paramx's ``dim`` axis of the Flax kernel is torch's ``dim`` axis of the
  weight; u is the same vector and v the same up to the order of the flattened axes (for conv
  kernels torch flattens (in, *k), paramx (*k, in)), which is permuted here.
* ``orthogonal``: paramx computes ``torch(Kᵀ)ᵀ`` on a Dense kernel K, so the original is
  transposed and ``base`` (which lives in the tall orientation) is copied as is. A conv kernel
  has no orthogonal equivalent (torch orthogonalizes the spatial slices, paramx the channel
  matrices) and raises.

The torch protocol (``protocol.py``). What the interop knows about a parametrization comes
only from these optional members of the parametrization object; the built-ins declare them
like any user-defined parametrization, and the interop never checks a parametrization's type:

* ``torch_originals(self, link) -> Sequence[TorchArray]``, asked of the *first* link of a
  chain (its ``right_inverse`` made the originals): one entry per original, naming it
  (relative to ``<module>.parametrizations.<name>``) and giving its layout.
  Without it: ``original`` / ``original<i>``, in the weight's layout when the original has the
  tensor's rank, as is otherwise.
* ``torch_arrays(self, link) -> Sequence[TorchArray]``, asked of every link: one entry per
  array of the link's ``params`` and ``state``, naming it (relative to
  ``<module>.parametrizations.<name>.<i>``) and giving its layout. It may raise when the
  parametrization has no torch equivalent in ``link.layout`` (orthogonal on a conv kernel).
  Without it: every array as is, under ``<i>.<its keys joined by dots>``.
* ``torch_legacy_suffixes: tuple[str, ...]``: when this parametrization is a tensor's only
  one, its originals may also be stored as ``<module>.<name><suffix>``, one suffix per
  original (weight_norm: ``("_g", "_v")``); read when a state_dict holds exactly those keys,
  written with ``legacy_weight_norm=True``.

``link`` (a ``TorchLink``) describes the link and its tensor: ``path`` (Flax path, for
messages), ``module`` and ``tensor`` (torch's names), ``index`` (``<i>``), ``parametrization``,
``shape`` (the tensor's value, Flax layout), ``layout`` (``to_flax``, ``to_torch``,
``torch_shape``, ``perm``, ``rule()``, ``matrix_indices(shape, axis)``), ``originals``,
``original_names``, and the link's ``params`` and ``state``. A hook builds each entry with
``link.array(name, source, *, like_weight=False, to_flax=None, to_torch=None, rule="")``:
``source`` is ``("original", i)``, ``("params", *keys)`` or ``("state", *keys)``; the array is
copied as is, takes the weight's layout (``like_weight=True``), or is mapped by ``to_flax`` /
``to_torch`` (numpy in, numpy out; each the other's inverse); ``rule`` explains the layout in
shape-mismatch messages. ``link.require_state(what)`` returns the link's state or raises the
"pass the full registered tree" error. A declaration must cover each array exactly once. So
a parametrization needs no import from paramx to declare its torch form.

Example: a parametrization with a learnable per-output scale, which a torch model keeps as
``<i>.scale`` with the same (1, out) shape as paramx:

  >>> import dataclasses
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> from paramx.interop import from_torch_state_dict, to_torch_state_dict
  >>> @dataclasses.dataclass(frozen=True)
  ... class Scaled:
  ...     def init(self, value, key):
  ...         return {"s": jnp.full((1, value.shape[-1]), 2.0)}, None
  ...     def forward(self, v, *, params, state):
  ...         return v * params["s"]
  ...     def right_inverse(self, w, *, params, state):
  ...         return w / params["s"], state
  ...     def torch_arrays(self, link):
  ...         return [link.array("scale", ("params", "s"))]
  >>> tree = px.register_parametrization(
  ...     {"fc": {"kernel": jnp.ones((3, 2))}}, "fc/kernel", Scaled())
  >>> sd = to_torch_state_dict(tree)
  >>> {k: v.shape for k, v in sd.items()}
  {'fc.parametrizations.weight.original': (2, 3), 'fc.parametrizations.weight.0.scale': (1, 2)}
  >>> back = from_torch_state_dict(sd, tree)
  >>> px.materialize(back)["fc"]["kernel"].tolist()
  [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]

Without ``torch_arrays`` the scale would be written as ``fc.parametrizations.weight.0.s``.

torch is never imported: state_dict values may be torch tensors (read with
``.detach().cpu().numpy()``) or numpy arrays, and ``to_torch_state_dict`` returns numpy
arrays (``torch.from_numpy`` each, then ``model.load_state_dict``). Modules: ``keys.py``
(names), ``layouts.py``, ``protocol.py`` (the hooks), ``plan.py`` (which key holds which
array), ``read.py``, ``write.py``, ``modules.py`` (module-name matching and suggestions),
``report.py`` (``IncompatibleKeys`` and messages), ``nnx.py`` (NNX modules).
"""

from paramx._src.integrations.torch.layouts import LAYOUTS as LAYOUTS
from paramx._src.integrations.torch.protocol import TorchArray as TorchArray
from paramx._src.integrations.torch.protocol import TorchLink as TorchLink
from paramx._src.integrations.torch.read import from_torch_state_dict as from_torch_state_dict
from paramx._src.integrations.torch.report import IncompatibleKeys as IncompatibleKeys
from paramx._src.integrations.torch.write import to_torch_state_dict as to_torch_state_dict

__all__ = [
    "LAYOUTS",
    "IncompatibleKeys",
    "TorchArray",
    "TorchLink",
    "from_torch_state_dict",
    "to_torch_state_dict",
]
