"""`Parametrized`: the pytree node that stands where a parametrized leaf stood.

Its children are the raw originals (trainable), the chain's own learnable ``params`` and its
non-trainable ``state``; its static part is the chain itself. Nothing else is stored, so the
registered tree is an ordinary pytree: ``jax.jit``, ``jax.grad``, ``jax.vmap``, optax,
``flax.serialization`` and orbax all see plain arrays at stable key paths:

``...['kernel'].original`` (or ``.original0``, ``.original1``, ...), ``...['kernel'].params['<i>']``
and ``...['kernel'].state['<i>']``, where ``<i>`` is the position of the link in the chain.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax.tree_util import GetAttrKey

from paramx._src.core import parametrization as pz

PyTree = Any


class _Static(NamedTuple):
    """A node's static part (its pytree aux data), compared and hashed by value under jit."""

    chain: tuple[Any, ...]
    multi: bool
    unsafe: bool
    n_originals: int
    has_params: bool
    has_state: bool
    event_ndims: tuple[int, ...]


@jax.tree_util.register_pytree_with_keys_class
class Parametrized:
    """A parametrized tensor inside a registered tree.

    You rarely build one by hand: :func:`paramx.register_parametrization` puts it in the
    tree. Read it to inspect what is registered.

    Attributes:
      originals: The raw tensors the optimizer trains, as a tuple (one entry unless the first
        parametrization's ``right_inverse`` returned a sequence).
      chain: The parametrizations, applied in order.
      params: The learnable arrays of the links that have them, keyed by link position.
      state: The non-trainable state of the links that have it, keyed by link position. It is
        empty in the trainable half returned by :func:`paramx.split_state`.
      multi: Whether the originals came from a sequence (torch's ``original0``, ...).
      unsafe: Whether consistency checks are skipped for this tensor (sticky, as in torch).
      event_ndims: The number of dimensions of each original as registered, for one tensor.
        Originals with more dimensions than this are a stack of tensors along their leading
        axes (layers stacked by ``nn.scan``, ``nn.vmap`` or ``nnx.vmap``, or registration with
        ``batch_axes``): the chain runs on each tensor of the stack separately.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> tree = px.register_parametrization({"w": jnp.ones((2, 2))}, "w", jnp.tanh)
      >>> node = tree["w"]
      >>> node.original.shape, px.is_parametrized(tree, "w")
      ((2, 2), True)
    """

    # A node is immutable and stores exactly what ``tree_flatten`` returns: its children
    # (the originals, then ``params`` and ``state`` when they are not empty) and its static
    # part ``(chain, multi, unsafe, n_originals, has_params, has_state, event_ndims)``. Every
    # jit call flattens its arguments and unflattens its results, in the parameters, the
    # gradients and each optimizer moment, so both directions are a tuple hand-over. Empty
    # ``params`` / ``state`` (most links have neither, and ``split_state`` empties ``state`` in
    # the trainable half) hold no leaves and are left out of the children.
    __slots__ = ("_aux", "_children")

    _FIELDS = ("originals", "chain", "params", "state", "multi", "unsafe", "event_ndims")

    def __init__(
        self,
        originals: tuple[Any, ...],
        chain: tuple[Any, ...],
        params: dict[str, PyTree] | None = None,
        state: dict[str, PyTree] | None = None,
        *,
        multi: bool = False,
        unsafe: bool = False,
        event_ndims: tuple[int, ...] | None = None,
    ):
        originals = tuple(originals)
        params, state = dict(params or {}), dict(state or {})
        extra = ((params,) if params else ()) + ((state,) if state else ())
        if event_ndims is None:
            event_ndims = tuple(len(getattr(x, "shape", ())) for x in originals)
        self._children = (*originals, *extra)
        self._aux = _Static(
            chain=tuple(chain),
            multi=multi,
            unsafe=unsafe,
            n_originals=len(originals),
            has_params=bool(params),
            has_state=bool(state),
            event_ndims=tuple(int(d) for d in event_ndims),
        )

    @property
    def originals(self) -> tuple[Any, ...]:
        return self._children[: self._aux.n_originals]

    @property
    def chain(self) -> tuple[Any, ...]:
        return self._aux.chain

    @property
    def params(self) -> dict[str, PyTree]:
        aux = self._aux
        return self._children[aux.n_originals] if aux.has_params else {}

    @property
    def state(self) -> dict[str, PyTree]:
        aux = self._aux
        return self._children[aux.n_originals + aux.has_params] if aux.has_state else {}

    @property
    def multi(self) -> bool:
        return self._aux.multi

    @property
    def unsafe(self) -> bool:
        return self._aux.unsafe

    @property
    def event_ndims(self) -> tuple[int, ...]:
        return self._aux.event_ndims

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading axes along which this node holds a stack of tensors (``()``: one)."""
        x = self.originals[0]
        shape = tuple(getattr(x, "shape", ()))
        extra = len(shape) - self.event_ndims[0]
        return shape[:extra] if extra > 0 else ()

    @property
    def original_names(self) -> tuple[str, ...]:
        """torch's names of the originals: ``("original",)``, or ``("original0", ...)``."""
        return original_names(self.multi, self._aux.n_originals)

    # ----- pytree protocol -------------------------------------------------------------
    def tree_flatten_with_keys(self) -> tuple[list[tuple[GetAttrKey, Any]], _Static]:
        names = list(self.original_names)
        if self._aux.has_params:
            names.append("params")
        if self._aux.has_state:
            names.append("state")
        return [(GetAttrKey(n), x) for n, x in zip(names, self._children)], self._aux

    def tree_flatten(self) -> tuple[tuple[Any, ...], _Static]:
        # The hot path: no key objects, no new containers.
        return self._children, self._aux

    @classmethod
    def tree_unflatten(cls, aux: _Static, children: Any) -> Parametrized:
        node = object.__new__(cls)
        node._children = tuple(children)
        node._aux = aux
        return node

    # ----- used as an array by mistake ---------------------------------------------------
    def _not_an_array(self) -> TypeError:
        return TypeError(
            f"A paramx.Parametrized node ({', '.join(self.chain_names())} on "
            f"{', '.join(_describe(x) for x in self.originals)}) was used as an array. The "
            f"registered tree holds raw originals: turn it into the plain tree the model reads "
            f"with `paramx.materialize(tree)` (or `paramx.materialize(params, state)` after "
            f"`split_state`), and give that to `model.apply`."
        )

    def __jax_array__(self) -> Any:
        raise self._not_an_array()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._not_an_array()

    def _operator(self, *args: Any) -> Any:
        raise self._not_an_array()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _operator
    __matmul__ = __rmatmul__ = __truediv__ = __rtruediv__ = __pow__ = __neg__ = _operator

    def __contains__(self, key: Any) -> bool:
        # Reached when a tool treats the node as a nested dict of variables: nnx.bridge.ToNNX
        # merges a linen module's collections into one namespace, and a node sits where the
        # state collection has entries below the same name.
        raise TypeError(
            f"A paramx.Parametrized node ({', '.join(self.chain_names())}) was read as a dict "
            f"of variables (looking up {key!r}). The tree functions read nodes for you; with "
            f'flax.nnx.bridge.ToNNX, give paramx.linen.Parametrize `layout="arrays"`, which '
            f"stores plain arrays the bridge and nnx.Optimizer can hold."
        )

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes a node does not have (or a property that raised
        # AttributeError: its own message is the one to show). Array attributes get the hint.
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property) and attribute.fget is not None:
            return attribute.fget(self)
        if name in _ARRAY_ATTRIBUTES:
            raise AttributeError(f"{self._not_an_array()} (`.{name}` was read)")
        raise AttributeError(f"'Parametrized' object has no attribute {name!r}")

    # ----- convenience -----------------------------------------------------------------
    @property
    def original(self) -> Any:
        """The single original; raises if the originals are several."""
        if self.multi:
            raise AttributeError(
                f"This tensor is parametrized in terms of {len(self.originals)} originals "
                f"({', '.join(self.original_names)}); read `.originals` instead of `.original`."
            )
        return self.originals[0]

    def replace(self, **changes: Any) -> Parametrized:
        """Returns a copy with some fields replaced (the node itself is never modified)."""
        fields = {name: getattr(self, name) for name in self._FIELDS}
        fields.update(changes)
        return Parametrized(
            fields["originals"],
            fields["chain"],
            fields["params"],
            fields["state"],
            multi=fields["multi"],
            unsafe=fields["unsafe"],
            event_ndims=fields["event_ndims"],
        )

    def chain_names(self) -> list[str]:
        return [pz.display_name(p) for p in self.chain]

    def __repr__(self) -> str:
        describe = _describe
        names = self.original_names
        parts = [f"{n}={describe(x)}" for n, x in zip(names, self.originals)]
        parts.insert(0, f"chain=[{', '.join(self.chain_names())}]")
        for label, tree in (("params", self.params), ("state", self.state)):
            if tree:
                shown = jax.tree_util.tree_map(describe, tree)
                parts.append(f"{label}={shown}")
        if self.unsafe:
            parts.append("unsafe=True")
        if self.batch_shape:
            parts.append(f"stack={list(self.batch_shape)}")
        return f"Parametrized({', '.join(parts)})"


_ARRAY_ATTRIBUTES = frozenset(
    {"shape", "dtype", "ndim", "size", "T", "mT", "astype", "reshape", "at", "sharding"}
)


def _describe(x: Any) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return repr(x)
    return f"{jax.numpy.dtype(dtype).name}{list(shape)}"


def original_names(multi: bool, n: int) -> tuple[str, ...]:
    """torch's names for ``n`` originals: ``original``, or ``original0`` ... when ``multi``."""
    return tuple(f"original{i}" for i in range(n)) if multi else ("original",)


def is_node(x: Any) -> bool:
    return isinstance(x, Parametrized)
