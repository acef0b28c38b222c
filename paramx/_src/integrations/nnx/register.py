"""``register_parametrization(module, name, p)``: torch's function on an NNX module, in place.

The Variable is read, :func:`paramx._src.core.register.register_tensor` computes the node
(:mod:`.run`), and only when everything is computed is the module modified: the Variable
moves into a :class:`ParametrizationList` under ``module.parametrizations`` and the module's
class is swapped for the generated subclass (:mod:`.classes`). A tied Variable is kept or
refused as :mod:`.shared` describes.
"""

from __future__ import annotations

import difflib
import gc
import sys
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from paramx._src.core import checks
from paramx._src.integrations.nnx import run, shared
from paramx._src.integrations.nnx.classes import (
    parametrized_class,
    shadowing_class_attribute,
    type_before_parametrizations,
)
from paramx._src.integrations.nnx.container import (
    CONTAINER,
    ParametrizationList,
    Parametrizations,
    is_variable,
    lookup,
)
from paramx._src.parametrizations.convops import ConvGeometry, flax_conv_geometry, uncovered


def check_module(module: Any) -> None:
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"Expected an nnx.Module, got {type(module).__name__}. For a pytree of arrays use "
            f"paramx.register_parametrization; for a linen model, paramx.linen."
        )


def _variable(module: Any, name: str) -> nnx.Variable:
    """The Variable ``module.<name>``; raises a ValueError naming the closest names."""
    attrs = vars(module)
    if not isinstance(name, str) or name not in attrs:
        names = sorted(k for k, v in attrs.items() if is_variable(v))
        container = attrs.get(CONTAINER)
        names += sorted(container) if isinstance(container, Mapping) else []
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
        listing = (
            f"Closest names: {', '.join(map(repr, close))}."
            if close
            else f"Its Variables: {', '.join(map(repr, names)) or 'none'}."
        )
        raise ValueError(
            f"Module {type(module).__name__} has no Variable and no parametrized tensor named "
            f"{name!r}. {listing}"
        )
    var = attrs[name]
    if not is_variable(var) or not checks.is_array(var.get_value()):
        what = type(var.get_value()).__name__ if is_variable(var) else type(var).__name__
        raise ValueError(
            f"The attribute {name!r} of {type(module).__name__} is a {what}, not a Variable "
            f"holding an array; only arrays held by Variables (nnx.Param, nnx.BatchStat, ...) "
            f"can be parametrized."
        )
    if shadowing_class_attribute(module, name):
        cls = type_before_parametrizations(module).__name__
        raise ValueError(
            f"Class {cls} defines {name!r} at class level (a property or class attribute), "
            f"which would hide the parametrized value of the instance attribute. Rename one "
            f"of them to parametrize {cls}.{name}."
        )
    return var


def label_of(module: Any, name: str) -> str:
    """``Linear.kernel`` (``Linear.kernel.original`` for a nested registration): how errors
    name a tensor, since a module does not know its path in the model."""
    if isinstance(module, ParametrizationList):
        return f"{module.label}.{name}"
    return f"{type_before_parametrizations(module).__name__}.{name}"


def _check_conv_geometry(module: Any, name: str, p: Any, label: str) -> None:
    """A parametrization that declares a conv geometry (a Lipschitz bound's padding, strides,
    dilation) on an ``nnx.Conv``'s kernel must declare the Conv's own; else its bound is for
    another operator."""
    declared = getattr(p, "geometry", None)
    if type(module) is not nnx.Conv or name != "kernel":
        return
    conv: Any = module  # the fields as Flax keeps them (ints or sequences)
    if declared is None:
        why = uncovered(p, flax_conv_geometry(conv))
        if why:
            raise ValueError(
                f"{label}: {getattr(p, 'name', type(p).__name__)} declares no geometry, and its "
                f"bound does not cover the Conv (padding={module.padding!r}, strides="
                f"{module.strides or 1}, kernel_dilation={module.kernel_dilation or 1}): {why}"
            )
        return
    if not isinstance(declared, ConvGeometry):
        return
    wrong = declared.mismatches(flax_conv_geometry(conv), len(tuple(conv.kernel_size)))
    if wrong:
        raise ValueError(
            f"{label}: the geometry declared for the kernel is not the Conv's "
            f"({'; '.join(wrong)}), so its bound would be for another operator. Declare the "
            f"Conv's own: ConvGeometry(input_size=..., strides={module.strides or 1}, "
            f"padding={module.padding!r}, kernel_dilation={module.kernel_dilation or 1})."
        )


def register_parametrization(
    module: nnx.Module,
    name: str,
    parametrization: Any,
    *,
    unsafe: bool = False,
    key: jax.Array | None = None,
    batch_axes: int = 0,
) -> nnx.Module:
    """Registers a parametrization on ``module.<name>``, in place; torch's
    ``register_parametrization``.

    The Variable ``module.<name>`` is replaced by ``module.parametrizations[name]`` (a
    :class:`ParametrizationList`) holding ``original = right_inverse(value)``, and
    ``module.<name>`` now reads the constrained value, so layers that read
    ``self.kernel[...]`` work unchanged. Registering on a name that is already
    parametrized appends to its chain; the originals are kept (torch's semantics). The
    computation is the core's (the per-tensor form of :func:`paramx.register_parametrization`):
    the checks and error messages are the same, naming the tensor as ``Class.name``. Nothing
    is modified when an error is raised.

    The parametrization's functions run once per registration (``right_inverse`` once, and
    ``forward`` once for the shape check). A parametrization that declares
    ``traceable = True`` (the built-ins do) is run as one compiled program; any other runs
    eagerly, as it is written.

    Tied weights: when ``right_inverse`` keeps the value (or there is none), the registered
    Variable itself becomes ``original``, as torch keeps the Parameter, so a Variable shared
    with another module stays shared and trains once. When the originals differ from the
    value, a Variable that another NNX object also holds is refused (ValueError naming the
    holders), since it could not stay tied.

    Register before building ``nnx.Optimizer``, whose state follows the Param paths.

    Args:
      module: The NNX module holding the Variable, or a :class:`ParametrizationList` to
        parametrize its ``original`` (nesting).
      name: The attribute name (``"kernel"``).
      parametrization: A :class:`paramx.Parametrization`, an object with ``forward`` (and
        optionally ``right_inverse``, ``init``, ``update_state``, ``traceable``), or a plain
        function.
      unsafe: Skip the checks that ``forward`` keeps the tensor's shape and dtype.
      key: PRNG key for parametrizations with ``init`` (spectral norm's random start).
      batch_axes: How many leading axes of the Variable index a stack of layers (a module
        built with ``nnx.vmap`` / ``nnx.scan`` before registering): each layer is
        registered and computed separately. Registering inside the transform needs nothing.

    Returns:
      ``module`` (modified in place).

    Raises:
      TypeError: If ``module`` is not an ``nnx.Module``.
      ValueError: If there is no Variable named ``name`` (the closest names are listed), if
        it does not hold an array, if it is shared and cannot stay shared, or on the core's
        shape, dtype and ``right_inverse`` checks.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> layer.kernel = nnx.Param(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> symmetric = px.Parametrization(
      ...     forward=lambda x: jnp.triu(x) + jnp.triu(x, 1).T, right_inverse=jnp.triu)
      >>> _ = pnx.register_parametrization(layer, "kernel", symmetric)
      >>> layer.kernel
      Array([[1., 2.],
             [2., 4.]], dtype=float32)
      >>> layer.parametrizations["kernel"].original[...]
      Array([[1., 2.],
             [0., 4.]], dtype=float32)
    """
    check_module(module)
    label = label_of(module, name)
    _check_conv_geometry(module, name, parametrization, label)
    options: dict[str, Any] = dict(key=key, unsafe=unsafe, batch_axes=batch_axes, label=label)
    plist = lookup(module, name)
    if plist is not None:
        node, failed = run.register(plist.node(), parametrization, eager=plist.eager, **options)
        plist._append(node, failed_trace=failed)
        return module
    var = _variable(module, name)
    refs = sys.getrefcount(var) if hasattr(sys, "getrefcount") else shared.OWN_REFS + 1
    value = var.get_value()
    node, failed = run.register(value, parametrization, **options)
    keep = shared.keeps_value(node, value)
    if not keep and refs > shared.OWN_REFS:
        holders = shared.other_holders(module, name, var)
        if holders:
            gc.collect()  # dropped modules in reference cycles hold nothing
            holders = shared.other_holders(module, name, var)
        if holders:
            shared.refuse_shared(label, holders, parametrization, node.multi)
    originals = (var,) if keep else None
    eager = True if failed else None  # None: decided by the chain's declarations
    plist = ParametrizationList(node, var, name, label=label, originals=originals, eager=eager)
    container = vars(module).get(CONTAINER)
    if container is None:
        if CONTAINER in vars(module) or hasattr(type(module), CONTAINER):
            raise ValueError(
                f"Module {type(module).__name__} already has an attribute {CONTAINER!r} that "
                f"paramx did not create; rename it to parametrize this module."
            )
        # Everything is computed: only now is the module modified.
        setattr(module, CONTAINER, Parametrizations())
        container = vars(module)[CONTAINER]
    delattr(module, name)
    container[name] = plist
    gen = parametrized_class(type(module))
    if type(module) is not gen:
        object.__setattr__(module, "__class__", gen)
    return module
