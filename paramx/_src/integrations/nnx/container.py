"""Where a parametrized tensor lives on an NNX module: the Variables and their containers.

``module.parametrizations`` is a :class:`Parametrizations` (an ``nnx.Dict``) holding one
:class:`ParametrizationList` per parametrized name; the list holds the raw originals as
Variables of the registered Variable's type, the links' ``params`` as ``nnx.Param`` and their
``state`` as :class:`ParametrizationState`, keyed by link position as in the core. A list
reads its Variables as a :class:`paramx.Parametrized` node and hands it to the core
(:mod:`.run`); nothing here computes a number.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized, original_names
from paramx._src.integrations.nnx import cache, run

CONTAINER = "parametrizations"
"""The attribute holding a module's :class:`Parametrizations` (torch's name)."""


class ParametrizationState(nnx.Variable):
    """Non-trainable state of a parametrization: spectral norm's ``u`` and ``v``, an
    orthogonal ``base``.

    It is not an ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never
    updates it, and ``nnx.state(model, ParametrizationState)`` selects it.

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> state = nnx.state(layer, pnx.ParametrizationState)
      >>> state["parametrizations"]["kernel"]["state"]["0"]["u"].shape
      (2,)
    """


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _wrap(tree: Any, variable_type: type[nnx.Variable]) -> Any:
    return jax.tree_util.tree_map(variable_type, tree)


def _unwrap(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda v: v.get_value(), tree, is_leaf=is_variable)


def _variable_leaves(tree: Any) -> list[nnx.Variable]:
    return jax.tree_util.tree_leaves(tree, is_leaf=is_variable)


def _write(variables: Any, values: Any) -> None:
    """Sets each Variable of a tree to the matching array of a tree of the same structure."""
    jax.tree_util.tree_map(lambda v, x: v.set_value(x), variables, values, is_leaf=is_variable)


def _like(variable: nnx.Variable, value: jax.Array) -> nnx.Variable:
    """A new Variable of ``variable``'s type holding ``value``; metadata (sharding, ...) is
    kept when the rank is the same."""
    if value.ndim == variable.get_value().ndim:
        return variable.copy(value)
    return type(variable)(value)


def _value(original: Any) -> Any:
    """The array an original holds: a Variable's value, or the value a nested chain reads."""
    return original.get_value() if is_variable(original) else original


class ParametrizationList(nnx.Module):
    """The parametrizations of one tensor, with its originals and state; torch's
    ``ParametrizationList``.

    Built by :func:`register_parametrization`; reach it as
    ``module.parametrizations["kernel"]``. Calling it returns the constrained value (what
    ``module.kernel`` returns), and indexing it returns the parametrizations in order. It is
    an NNX module, so a parametrization can be registered on its ``original`` (nesting, as in
    torch): the outer chain then reads the inner chain's value.

    Attributes:
      original: The raw tensor (``original0``, ``original1``, ... when the first
        parametrization's ``right_inverse`` returns several), a Variable of the registered
        Variable's type (the registered Variable itself when ``right_inverse`` kept its value).
      params: The links' own learnable arrays as ``nnx.Param``, keyed by link position
        (absent when no link has any).
      state: The links' state as :class:`ParametrizationState`, keyed by link position
        (absent when no link has any).
      chain: The parametrizations, applied in order (static).
      tensor_name: The parametrized attribute's name (static).
      label: ``Class.name`` of the parametrized tensor, used in error messages (static).
      multi: Whether there are several originals (static).
      unsafe: Whether the shape and dtype checks are off for this tensor (static).
      event_ndims: The rank of each original for one tensor (static); originals with more
        axes are a stack (``nnx.vmap`` / ``nnx.scan``), computed per tensor.
      eager: Whether the core runs operation by operation for this tensor instead of as one
        compiled program (static): ``True`` when a link does not declare ``traceable = True``
        (a user's parametrization, whose functions then run exactly once per call), or when a
        link that declares it needed concrete values after all.
      use_running_average: ``False`` (training mode): each read updates the state first.
        ``True``: reads leave state alone. ``model.train()`` / ``model.eval()`` set it.

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.weight_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> plist = layer.parametrizations["kernel"]
      >>> plist.original0.shape, plist.original1.shape, len(plist), plist.eager
      ((1, 2), (3, 2), 1, False)
    """

    def __init__(
        self,
        node: Parametrized,
        like: nnx.Variable,
        tensor_name: str,
        *,
        label: str | None = None,
        originals: tuple[nnx.Variable, ...] | None = None,
        eager: bool | None = None,
    ):
        self.tensor_name = tensor_name
        self.label = label or tensor_name
        self.chain = node.chain
        self.multi = node.multi
        self.unsafe = node.unsafe
        self.event_ndims = tuple(node.event_ndims)
        self.eager = run.needs_eager(node.chain) if eager is None else eager
        self.use_running_average = False
        if originals is None:
            originals = tuple(_like(like, x) for x in node.originals)
        for name, var in zip(original_names(node.multi, len(originals)), originals):
            setattr(self, name, var)
        if node.params:
            self.params = nnx.data(_wrap(node.params, nnx.Param))
        if node.state:
            self.state = nnx.data(_wrap(node.state, ParametrizationState))

    # ----- reading the Variables as a core node ------------------------------------------
    def _names(self) -> list[str]:
        if not self.multi:
            return ["original"]
        n = 0
        while f"original{n}" in vars(self) or lookup(self, f"original{n}") is not None:
            n += 1
        return list(original_names(True, n))

    @property
    def originals(self) -> tuple[Any, ...]:
        """The original Variables, in order (an original with a nested parametrization
        reads as its constrained value)."""
        return tuple(getattr(self, n) for n in self._names())

    def _params(self) -> dict[str, Any]:
        return vars(self).get("params", {})

    def _state(self) -> dict[str, Any]:
        return vars(self).get("state", {})

    def node(self) -> Parametrized:
        """The current values as a :class:`paramx.Parametrized` node (a snapshot)."""
        return Parametrized(
            tuple(_value(v) for v in self.originals),
            self.chain,
            _unwrap(self._params()),
            _unwrap(self._state()),
            multi=self.multi,
            unsafe=self.unsafe,
            event_ndims=self.event_ndims,
        )

    def _variables(self) -> list[nnx.Variable]:
        """Every Variable the value depends on, nested chains included."""
        out: list[nnx.Variable] = []
        for name in self._names():
            inner = lookup(self, name)
            out += inner._variables() if inner is not None else [vars(self)[name]]
        return out + _variable_leaves((self._params(), self._state()))

    def _raw(self) -> tuple[Any, ...]:
        """The arrays every Variable of the value holds (what :func:`cached` compares)."""
        return tuple(v.get_raw_value() for v in self._variables())

    # ----- torch's ParametrizationList API -----------------------------------------------
    def __call__(self) -> jax.Array:
        """The constrained value, updating state first in training mode."""
        hit = cache.lookup(self)
        if hit is not None:
            return hit
        updating = [] if self.use_running_average else self._updating_links()
        if updating:
            (value, new_state), failed = run.materialize(self.node(), self.label, True, self.eager)
            for i in updating:  # write back only what `update_state` computed
                _write(self._state()[i], new_state[i])
        else:
            value, failed = run.materialize(self.node(), self.label, False, self.eager)
        self._remember(failed)
        cache.store(self, value)
        return value

    def _remember(self, failed_trace: bool) -> None:
        if failed_trace:
            self.eager = True  # the compile attempt needed concrete values: do not try again

    def _updating_links(self) -> list[str]:
        """Positions of the links whose state a training-mode read updates."""
        state = self._state()
        return [
            str(i)
            for i, p in enumerate(self.chain)
            if str(i) in state and pz.update_state_fn(p) is not None
        ]

    def right_inverse(self, value: Any) -> None:
        """Sets the originals (and any state) so that the tensor equals ``value``.

        What ``module.kernel = value`` runs: :func:`paramx.assign` on the current node, so a
        value of another shape or dtype is refused unless the tensor was registered with
        ``unsafe=True``. Nothing is modified when an error is raised.
        """
        for var, x in self._plan_assign(value):
            var.set_value(x)

    def _plan_assign(self, value: Any) -> list[tuple[nnx.Variable, Any]]:
        """The Variable writes that assigning ``value`` makes, computed without writing."""
        if is_variable(value):
            value = value.get_value()
        new, failed = run.assign(self.node(), value, self.label, self.eager)
        self._remember(failed)
        writes: list[tuple[nnx.Variable, Any]] = []
        for name, x in zip(self._names(), new.originals):
            inner = lookup(self, name)
            writes += inner._plan_assign(x) if inner is not None else [(vars(self)[name], x)]
        jax.tree_util.tree_map(
            lambda v, x: writes.append((v, x)), self._state(), new.state, is_leaf=is_variable
        )
        return writes

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode; called by ``nnx.view(model, use_running_average=...)``.

        Args:
          use_running_average: if True, reads leave the parametrization state unchanged;
            if False, each read updates it first (training mode).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __len__(self) -> int:
        return len(self.chain)

    def __getitem__(self, i: int) -> Any:
        return self.chain[i]

    def _append(self, node: Parametrized, *, failed_trace: bool = False) -> None:
        """Adopts the links a registration appended to ``node``; originals are untouched."""
        i = str(len(self.chain))
        if i in node.params:
            self.params = nnx.data({**self._params(), i: _wrap(node.params[i], nnx.Param)})
        if i in node.state:
            self.state = nnx.data({**self._state(), i: _wrap(node.state[i], ParametrizationState)})
        self.chain = node.chain
        self.unsafe = node.unsafe
        self.eager = self.eager or failed_trace or run.needs_eager(node.chain)


class Parametrizations(nnx.Dict):
    """``module.parametrizations``: one :class:`ParametrizationList` per parametrized name.

    An ``nnx.Dict``, so both ``parametrizations["kernel"]`` and ``parametrizations.kernel``
    work, as in torch's ``ModuleDict``.

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> list(layer.parametrizations)
      ['kernel']
    """


def lookup(module: Any, name: str) -> ParametrizationList | None:
    """The :class:`ParametrizationList` of ``module.<name>``, or None when not parametrized."""
    container = vars(module).get(CONTAINER) if hasattr(module, "__dict__") else None
    if isinstance(container, Parametrizations):
        plist = vars(container).get(name)
        if isinstance(plist, ParametrizationList):
            return plist
    return None


def is_parametrized(module: Any, name: str | None = None) -> bool:
    """Whether ``module`` has a parametrization (on ``name``, when given); torch's
    ``is_parametrized``.

    Args:
      module: Any object; only NNX modules registered with paramx.nnx can be parametrized.
      name: An attribute name, or ``None`` (the default) for any tensor of the module.

    Returns:
      A bool.

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.weight_norm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> pnx.is_parametrized(layer), pnx.is_parametrized(layer, "kernel")
      (True, True)
      >>> pnx.is_parametrized(layer, "bias")
      False
    """
    container = vars(module).get(CONTAINER) if hasattr(module, "__dict__") else None
    if not isinstance(container, Parametrizations):
        return False
    if name is None:
        return len(container) > 0
    return lookup(module, name) is not None
