"""Tied and derived parameters on NNX modules: ``paramx.nnx.tie``.

NNX shares graph nodes natively: ``dec.kernel = enc.kernel`` makes both layers hold one
Variable, and ``nnx.state`` / ``nnx.Optimizer`` / checkpoints see it once. A tie *through a
transform* (the decoder reads the encoder's kernel transposed) needs a value computed on
access, as paramx.nnx parametrizations are: :func:`tie` puts a :class:`Tied` module at
``module.<name>``, which holds the source module (a shared graph node, not a copy) and reads
``transform(source_module.<source_name>)`` each time it is read, through the source's
parametrization if it has one. The tied leaf holds no Variable of its own, so the gradient of
every use reaches the source's Variable.

As for any shared node in NNX, the source's Variables are filed in ``nnx.state`` under the
first path NNX meets (it walks attribute names in sorted order): with ``model.dec`` tied to
``model.enc``, the encoder's kernel appears at ``dec/kernel/source/kernel``. It is one copy
either way; name the modules so that the source comes first if the paths matter.
:mod:`paramx.interop` writes and reads a plain tie (no transform, an unparametrized source)
as torch's shared parameter, under each name, and refuses a tie through a transform.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paramx._src.integrations.nnx.container import is_variable, lookup
from paramx._src.integrations.nnx.register import check_module


class Tied(nnx.Module):
    """An NNX attribute that reads another module's parameter (through a transform).

    Put on a module by :func:`paramx.nnx.tie`. Reading it (``tied[...]``, ``tied.value``,
    ``jnp.asarray(tied)``) gives ``transform(source.<source_name>)``, the constrained value
    when the source is parametrized. It holds the source module, shared, and no array.

    Attributes:
      source: The module holding the source parameter.
      source_name: The source parameter's name on it.
      transform: The function applied to the source's value (``None``: the value itself).
      variable_type: The Variable type of the attribute it replaced (what :func:`untie` makes).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import paramx as px
      >>> enc, dec = nnx.Linear(4, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 4, rngs=nnx.Rngs(1))
      >>> px.nnx.tie(dec, "kernel", enc, "kernel", transform=jnp.transpose)
      >>> dec.kernel[...].shape, bool(jnp.all(dec.kernel[...] == enc.kernel[...].T))
      ((2, 4), True)
    """

    def __init__(
        self,
        source: nnx.Module,
        source_name: str,
        transform: Any = None,
        variable_type: type[nnx.Variable] = nnx.Param,
    ):
        self.source = source
        self.source_name = source_name
        self.transform = transform
        self.variable_type = variable_type

    def get_value(self) -> Any:
        value = getattr(self.source, self.source_name)
        if is_variable(value) or isinstance(value, Tied):
            value = value.get_value()
        return value if self.transform is None else self.transform(value)

    @property
    def value(self) -> Any:
        return self.get_value()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.get_value).shape)

    @property
    def dtype(self) -> Any:
        return jax.eval_shape(self.get_value).dtype

    def __getitem__(self, index: Any) -> Any:
        return self.get_value()[index]

    def __jax_array__(self) -> Any:
        return self.get_value()


def _value_of(module: Any, name: str) -> Any:
    value = getattr(module, name)
    return value.get_value() if is_variable(value) or isinstance(value, Tied) else value


def tie(
    module: nnx.Module,
    name: str,
    source_module: nnx.Module,
    source_name: str,
    *,
    transform: Any = None,
) -> None:
    """Ties ``module.<name>`` to ``source_module.<source_name>`` (through ``transform``), in place.

    The NNX form of :func:`paramx.tie`. The Variable at ``module.<name>`` is replaced by a
    :class:`Tied` module that reads ``transform(source_module.<source_name>)`` on access (the
    constrained value, if the source is parametrized), so the model holds one array and the
    gradients of both uses are summed into it. Without a transform, plain NNX sharing does the
    same (``module.kernel = source_module.kernel``). :func:`untie` gives the attribute its own
    Variable back.

    Args:
      module: The module whose attribute to tie.
      name: The attribute (a Variable holding an array).
      source_module: The module holding the source parameter (any module of the same model).
      source_name: The source parameter's name on it (a Variable, a parametrized tensor or
        another tied attribute).
      transform: A function of the source's value giving this attribute's value (its shape
        and dtype), e.g. ``jnp.transpose``; ``None`` reads the value as it is.

    Raises:
      ValueError: If an attribute is missing, ``module.<name>`` is parametrized, or the shapes
        or dtypes do not match (naming both attributes).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import paramx as px
      >>> enc, dec = nnx.Linear(4, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 4, rngs=nnx.Rngs(1))
      >>> _ = px.nnx.orthogonal(enc, "kernel")
      >>> px.nnx.tie(dec, "kernel", enc, "kernel", transform=jnp.transpose)
      >>> w = dec.kernel[...]
      >>> bool(jnp.allclose(w @ w.T, jnp.eye(2), atol=1e-5))
      True
    """
    check_module(module)
    check_module(source_module)
    here = f"{type(module).__name__}.{name}"
    there = f"{type(source_module).__name__}.{source_name}"
    if lookup(module, name) is not None:
        raise ValueError(
            f"{here} is parametrized; a tie replaces its Variables, so its originals would be "
            f"lost. Remove the parametrization first (paramx.nnx.remove_parametrizations), or "
            f"register it on the source {there}: the tied attribute then reads its value."
        )
    current = vars(module).get(name)
    if isinstance(current, Tied):
        raise ValueError(f"{here} is tied already; paramx.nnx.untie it first.")
    if not isinstance(current, nnx.Variable):
        raise ValueError(
            f"{type(module).__name__} has no Variable named {name!r} to tie (it has "
            f"{sorted(k for k, v in vars(module).items() if is_variable(v))})."
        )
    if source_module is module and source_name == name:
        raise ValueError(f"Cannot tie {here} to itself.")
    try:
        source_value = jax.eval_shape(lambda: _value_of(source_module, source_name))
    except AttributeError:
        raise ValueError(
            f"{type(source_module).__name__} has no attribute {source_name!r}."
        ) from None
    out = jax.eval_shape(lambda v: v if transform is None else transform(v), source_value)
    want = current.get_value()
    if tuple(out.shape) != tuple(jnp.shape(want)) or out.dtype != jnp.result_type(want):
        raise ValueError(
            f"Cannot tie {here} to {there}: {here} is {jnp.result_type(want).name}"
            f"{list(jnp.shape(want))}, but the transform of the source "
            f"({source_value.dtype.name}{list(source_value.shape)}) gives "
            f"{out.dtype.name}{list(out.shape)}. Give a transform that maps one to the other "
            f"(e.g. jnp.transpose)."
        )
    setattr(module, name, Tied(source_module, source_name, transform, type(current)))


def tied_attributes(root: Any) -> list[tuple[nnx.Module, str]]:
    """``(module, name)`` for every :class:`Tied` attribute of the modules in ``root``'s graph."""
    out: list[tuple[nnx.Module, str]] = []
    seen: set[int] = set()
    for _, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module) and id(node) not in seen:
            seen.add(id(node))
            out += [(node, k) for k, v in vars(node).items() if isinstance(v, Tied)]
    return out


def untie(module: nnx.Module, name: str) -> None:
    """Gives a tied attribute its own Variable again, holding the current tied value.

    Args:
      module: The module.
      name: An attribute tied by :func:`tie`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import paramx as px
      >>> enc, dec = nnx.Linear(4, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 4, rngs=nnx.Rngs(1))
      >>> px.nnx.tie(dec, "kernel", enc, "kernel", transform=jnp.transpose)
      >>> px.nnx.untie(dec, "kernel")
      >>> type(dec.kernel).__name__
      'Param'
    """
    current = vars(module).get(name)
    if not isinstance(current, Tied):
        raise ValueError(f"{type(module).__name__}.{name} is not tied (paramx.nnx.tie).")
    setattr(module, name, current.variable_type(current.get_value()))
