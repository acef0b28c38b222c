"""The parametrization type: a small value holding pure functions.

A parametrization maps raw *originals* to a constrained *value*. Three forms are accepted
wherever paramx takes a parametrization, and all three behave the same:

* a :class:`Parametrization` (a ``NamedTuple`` of functions, optax style);
* any object with a ``forward`` method and optionally ``right_inverse``, ``init`` and
  ``update_state`` methods (for example a frozen dataclass whose fields are its options);
* a plain callable, which is a forward-only parametrization.

paramx keeps the object itself in the registered tree's static structure, so two
parametrizations that compare equal share compiled code under ``jax.jit``. Plain functions
compare by identity; frozen dataclasses and ``Parametrization`` tuples compare by value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax

PyTree = Any


class Parametrization(NamedTuple):
    """A parametrization written as pure functions.

    Two calling conventions exist, chosen by whether ``init`` is given.

    Plain (``init is None``): ``forward(*originals) -> value`` and
    ``right_inverse(value) -> original | tuple[original, ...]``. When ``right_inverse``
    returns a tuple, the first parametrization of a chain has several originals and its
    ``forward`` takes them all (torch's ``original0``, ``original1``, ...).

    With arrays of its own (``init`` given): ``init(value, key) -> (params, state)`` runs once
    at registration on the tensor's value at that moment. ``params`` are learnable arrays
    trained with the rest of the tree, ``state`` is non-trainable (power-iteration vectors,
    an orthogonal base); either may be ``None``. Then ``forward(*originals, params=, state=)``,
    ``right_inverse(value, params=, state=) -> (originals, state)`` and, optionally,
    ``update_state(*originals, params=, state=) -> state``, which paramx runs before
    ``forward`` only when the caller asks for a state update (training mode). No gradient
    flows through state.

    ``right_inverse`` is optional: without it (or when it raises ``NotImplementedError``)
    registration stores the value itself as the original, as in PyTorch.

    Attributes:
      forward: Maps originals to the constrained value.
      right_inverse: Maps a value back to originals; the initialization transform.
      init: Creates the parametrization's own learnable ``params`` and ``state``.
      update_state: Computes the new state from the inputs of ``forward``.
      name: A display name; defaults to the name of ``forward``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> positive = px.Parametrization(
      ...     forward=jnp.exp, right_inverse=jnp.log, name="positive")
      >>> tree = px.register_parametrization(
      ...     {"scale": jnp.array([1.0, 2.0])}, "scale", positive)
      >>> px.materialize(tree)["scale"]
      Array([1., 2.], dtype=float32)
      >>> px.originals(tree, "scale")[0]
      Array([0.       , 0.6931472], dtype=float32)
    """

    forward: Callable[..., jax.Array]
    right_inverse: Callable[..., Any] | None = None
    init: Callable[[jax.Array, jax.Array], tuple[PyTree, PyTree]] | None = None
    update_state: Callable[..., PyTree] | None = None
    name: str | None = None


def check_parametrization(p: Any) -> None:
    """Raises ``TypeError`` unless ``p`` can serve as a parametrization."""
    if callable(getattr(p, "forward", None)) or callable(p):
        return
    raise TypeError(
        f"A parametrization must be a paramx.Parametrization, an object with a `forward` "
        f"method, or a callable. Got {type(p).__name__}: {p!r}."
    )


def forward_fn(p: Any) -> Callable[..., jax.Array]:
    fwd = getattr(p, "forward", None)
    return cast(Callable[..., jax.Array], fwd if callable(fwd) else p)


def right_inverse_fn(p: Any) -> Callable[..., Any] | None:
    fn = getattr(p, "right_inverse", None)
    return fn if callable(fn) else None


def init_fn(p: Any) -> Callable[..., tuple[PyTree, PyTree]] | None:
    if isinstance(p, Parametrization):
        return p.init
    fn = getattr(p, "init", None)
    # A plain function has no `init`; an object with `forward` may define one.
    return fn if callable(fn) and callable(getattr(p, "forward", None)) else None


def update_state_fn(p: Any) -> Callable[..., PyTree] | None:
    fn = getattr(p, "update_state", None)
    return fn if callable(fn) else None


def has_arrays(p: Any) -> bool:
    """Whether ``p`` uses the calling convention with ``params`` and ``state``."""
    return init_fn(p) is not None


def display_name(p: Any) -> str:
    name = getattr(p, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(p, Parametrization):
        return getattr(p.forward, "__name__", type(p.forward).__name__)
    if callable(getattr(p, "forward", None)):
        return type(p).__name__
    return getattr(p, "__name__", type(p).__name__)
