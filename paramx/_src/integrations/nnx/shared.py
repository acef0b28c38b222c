"""Tied weights: whether a registered Variable is held elsewhere, and whether it can stay shared.

When the first parametrization's ``right_inverse`` keeps the value (spectral norm, a
parametrization without ``right_inverse``), the registered Variable itself becomes
``original``, as torch keeps the Parameter object: a Variable shared with another module stays
shared, and both uses train one array. When the originals must differ from the value
(orthogonal's -I, weight norm's g and v), a Variable held elsewhere is refused with an error
naming its other holders, instead of being silently untied. NNX objects have no parent links,
so the holders are found through the garbage collector, and only when the Variable's
reference count says that something other than its module holds it.
"""

from __future__ import annotations

import gc
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized
from paramx._src.integrations.nnx.classes import original_class
from paramx._src.integrations.nnx.container import ParametrizationList

OWN_REFS = 3
"""References a Variable has when only its module holds it, counted inside
``register_parametrization``: the module's attribute, the local name, getrefcount's argument."""


def keeps_value(node: Parametrized, value: Any) -> bool:
    """Whether the registered node's single original is exactly ``value`` (an identity
    ``right_inverse``), so the registered Variable itself can stay the original."""
    if node.multi or len(node.originals) != 1:
        return False
    x = node.originals[0]
    if x is value:
        return True
    if jnp.shape(x) != jnp.shape(value) or jnp.result_type(x) != jnp.result_type(value):
        return False
    if any(isinstance(y, jax.core.Tracer) for y in (x, value)):
        return False
    try:
        return bool(jnp.array_equal(x, value, equal_nan=True))
    except Exception:  # say, operands on different meshes: treated as a different value
        return False


def other_holders(module: Any, name: str, var: nnx.Variable) -> list[str]:
    """Where NNX objects other than ``module.<name>`` hold ``var`` (tied weights), as
    ``Class.attribute`` strings."""
    found = [
        f"{original_class(type(module)).__name__}.{attr}"
        for attr, v in vars(module).items()
        if v is var and attr != name
    ]
    for ref in gc.get_referrers(var):
        found += _owners(ref, var, module, depth=2)
    return sorted(set(found))


def _owners(ref: Any, target: Any, module: Any, depth: int) -> list[str]:
    """The NNX objects other than ``module`` that hold ``target`` through ``ref``."""
    if isinstance(ref, nnx.Pytree):
        return [] if ref is module else [_describe_holder(ref, target)]
    if isinstance(ref, dict):
        owners = [
            o
            for o in gc.get_referrers(ref)
            if isinstance(o, nnx.Pytree) and getattr(o, "__dict__", None) is ref
        ]
        if owners:
            return [_describe_holder(o, target) for o in owners if o is not module]
    if depth and isinstance(ref, (dict, list, tuple)):
        return [h for up in gc.get_referrers(ref) for h in _owners(up, ref, module, depth - 1)]
    return []


def _describe_holder(owner: Any, target: Any) -> str:
    attrs = [k for k, v in vars(owner).items() if v is target]
    if isinstance(owner, ParametrizationList):
        return f"{owner.label} (as its {attrs[0] if attrs else 'original'})"
    cls = original_class(type(owner)).__name__
    return f"{cls}.{attrs[0]}" if attrs else cls


def refuse_shared(label: str, holders: list[str], parametrization: Any, multi: bool) -> None:
    """Raises the ValueError for a shared Variable that could not stay shared."""
    what = (
        "several originals"
        if multi
        else "an original that differs from the value (its `right_inverse` is not the identity)"
    )
    attr = label.rsplit(".", 1)[-1]
    raise ValueError(
        f"The Variable at {label} is shared: it is also held at {', '.join(holders)} (tied "
        f"weights, or a module made from this one's Variables by nnx.view or nnx.merge). "
        f"Registering {pz.display_name(parametrization)} stores {what} in new "
        f"Variables, so the other holders would keep the old Variable and the weights would "
        f"silently stop being tied. Either read the parametrized tensor where it is shared "
        f"(the other module computes with `module.{attr}`, e.g. `x @ enc.kernel.T`), or use a "
        f"parametrization whose `right_inverse` keeps the value (spectral_norm, or one without "
        f"`right_inverse`), which keeps the shared Variable as `original`, or untie first: "
        f"`module.{attr} = nnx.Param(module.{attr}[...])`."
    )
