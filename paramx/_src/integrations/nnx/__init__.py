"""Flax NNX: torch's parametrize API on NNX modules, which are mutable objects.

``register_parametrization(module, "kernel", p)`` mutates ``module`` in place, as torch
does and as NNX code expects, but every number goes through paramx's pure core: the
Variables are read into a :class:`paramx.Parametrized` node, and the core's per-tensor
functions (register, materialize, assign, remove) compute on it.

The package, one concept per module:

* :mod:`.container`: where the tensor lives. ``module.parametrizations`` is a
  :class:`Parametrizations` (an ``nnx.Dict``) holding one :class:`ParametrizationList` per
  parametrized name, which holds the raw ``original`` (or ``original0``, ``original1``, ...)
  as Variables of the registered Variable's type, the links' ``params`` as ``nnx.Param`` and
  their ``state`` as :class:`ParametrizationState`; ``nnx.state(model)`` paths read
  ``parametrizations/kernel/original``.
* :mod:`.classes`: how ``module.kernel`` keeps working (a generated subclass per class).
* :mod:`.run`: running the core, compiled or eagerly.
* :mod:`.cache`: :func:`cached`.
* :mod:`.shared`: tied weights.
* :mod:`.register`, :mod:`.remove`: torch's module functions.
* :mod:`.wrappers`: the torch-named functions (``orthogonal``, ...), built from what each
  parametrization class declares.

When state changes. Exactly as NNX's ``BatchNorm``: every :class:`ParametrizationList`
has ``use_running_average`` (``False`` on registration, torch's training mode). While it is
``False``, each read runs the links' ``update_state`` (a power-iteration step) before
``forward`` and writes the new state back into the :class:`ParametrizationState`
Variables; NNX carries those writes out of ``nnx.jit`` and ``nnx.grad``. ``model.eval()``,
``model.train()``, ``nnx.view(model, use_running_average=...)`` and ``set_attributes``
toggle it. No gradient reaches state.

Speed. Eager calls (registering, reading ``module.kernel`` outside ``nnx.jit``, assigning,
removing) of parametrizations that declare ``traceable = True`` (the built-ins) run as one
compiled program per chain and shape; inside a trace they run inline. Other
parametrizations run eagerly, so a user's function runs exactly once per call. Each read
computes the tensor again (and, in training mode, updates state again); inside
``with cached():`` it is computed once.

Stacks. Inside ``nnx.vmap`` / ``nnx.scan`` each layer registers as one tensor, and the node
remembers the tensor's rank (``event_ndims``), so reading the stacked module outside the
transform runs the chain per layer. ``batch_axes=`` registers on a module that is stacked
already.

Nesting. ``module.parametrizations[name]`` is itself an NNX module, so a parametrization can
be registered on its ``original`` (torch's nested parametrizations); the outer chain then
reads the inner chain's value as its original.

Caveats. Register before building ``nnx.Optimizer``: its state follows the Param paths at
construction (as torch's optimizer follows Parameter objects), and an optimizer built before
registering fails in ``update`` with a pytree-structure error; build it again after
registering.
"""

from paramx._src.integrations.nnx.cache import cached as cached
from paramx._src.integrations.nnx.classes import (
    type_before_parametrizations as type_before_parametrizations,
)
from paramx._src.integrations.nnx.container import ParametrizationList as ParametrizationList
from paramx._src.integrations.nnx.container import Parametrizations as Parametrizations
from paramx._src.integrations.nnx.container import ParametrizationState as ParametrizationState
from paramx._src.integrations.nnx.container import is_parametrized as is_parametrized
from paramx._src.integrations.nnx.register import (
    register_parametrization as register_parametrization,
)
from paramx._src.integrations.nnx.remove import remove_parametrizations as remove_parametrizations
from paramx._src.integrations.nnx.wrappers import torch_function as torch_function
from paramx._src.integrations.nnx.wrappers import torch_functions as torch_functions
