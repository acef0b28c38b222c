"""Flax NNX: torch's parametrize API on NNX modules, which are mutable objects.

``register_parametrization(module, "kernel", p)`` mutates ``module`` in place, as torch
does and as NNX code expects, but every number goes through paramx's pure core: the
Variables are read into a :class:`paramx.Parametrized` node, and
:func:`paramx.register_parametrization`, :func:`paramx.materialize`,
:func:`paramx.assign` and :func:`paramx.remove_parametrizations` compute on it.

Layout (torch's, with NNX Variables):

* ``module.parametrizations`` is a :class:`Parametrizations` (an ``nnx.Dict``) holding one
  :class:`ParametrizationList` per parametrized name;
* ``module.parametrizations["kernel"]`` (or ``.kernel``) holds the raw ``original`` (or
  ``original0``, ``original1``, ...) as Variables of the registered Variable's type
  (``nnx.Param`` for a kernel), the links' learnable ``params`` as ``nnx.Param`` and their
  ``state`` as :class:`ParametrizationState`, keyed by link position as in the core;
  ``nnx.state(model)`` paths read ``parametrizations/kernel/original``.

How ``module.kernel`` keeps working. As in torch, the module's class is swapped for a
generated subclass (``ParametrizedLinear``, one per original class and cached, so graph
definitions compare equal and ``nnx.jit`` does not retrace). The subclass has a property
per parametrized name: reading it computes the constrained value, assigning to it runs
``right_inverse``. NNX's graph and pytree code only sees the instance's attributes, so
``nnx.split`` / ``nnx.merge`` / ``nnx.clone`` / ``nnx.state`` / ``nnx.jit`` see plain
Variables. (An overridden ``Variable.get_value`` cannot do this: a Variable holds one
value of one type, while a parametrized tensor needs trainable originals and
non-trainable state side by side.)

When state changes. Exactly as NNX's ``BatchNorm``: every :class:`ParametrizationList`
has ``use_running_average`` (``False`` on registration, torch's training mode). While it is
``False``, each read runs the links' ``update_state`` (a power-iteration step) before
``forward`` and writes the new state back into the :class:`ParametrizationState`
Variables; NNX carries those writes out of ``nnx.jit`` and ``nnx.grad``. ``model.eval()``,
``model.train()``, ``nnx.view(model, use_running_average=...)`` and ``set_attributes``
toggle it. No gradient reaches state.

Speed. Eager calls (registering, reading ``module.kernel`` outside ``nnx.jit``, assigning,
removing) run the core as one compiled program per chain and shape instead of one
dispatch per operation; inside a trace they run inline. A parametrization whose functions
need concrete values (numpy inside ``right_inverse``, say) falls back to eager execution.
Each read computes the tensor again (and, in training mode, updates state again); inside
``with cached():`` it is computed once.

Tied weights. When the first parametrization's ``right_inverse`` keeps the value (spectral
norm, a parametrization without ``right_inverse``), the registered Variable itself becomes
``original``, as torch keeps the Parameter object: a Variable shared with another module
stays shared, and both uses train one array. When the originals must differ from the value
(orthogonal's -I, weight norm's g and v), a Variable held elsewhere is refused with an error
naming its other holders, instead of being silently untied.

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

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paramx._src.core import chain as ch
from paramx._src.core import parametrization as pz
from paramx._src.core.assign import assign as _assign_tree
from paramx._src.core.materialize import materialize
from paramx._src.core.node import Parametrized
from paramx._src.core.register import register_parametrization as _register_tree
from paramx._src.core.remove import remove_parametrizations as _remove_tree
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.spectral_norm import SpectralNorm
from paramx._src.parametrizations.weight_norm import WeightNorm

_CONTAINER = "parametrizations"


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


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _wrap(tree: Any, variable_type: type[nnx.Variable]) -> Any:
    return jax.tree_util.tree_map(variable_type, tree)


def _unwrap(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda v: v.get_value(), tree, is_leaf=_is_variable)


def _variable_leaves(tree: Any) -> list[nnx.Variable]:
    return jax.tree_util.tree_leaves(tree, is_leaf=_is_variable)


def _write(variables: Any, values: Any) -> None:
    """Sets each Variable of a tree to the matching array of a tree of the same structure."""
    jax.tree_util.tree_map(lambda v, x: v.set_value(x), variables, values, is_leaf=_is_variable)


def _like(variable: nnx.Variable, value: jax.Array) -> nnx.Variable:
    """A new Variable of ``variable``'s type holding ``value``; metadata (sharding, ...) is
    kept when the rank is the same."""
    if value.ndim == variable.get_value().ndim:
        return variable.copy(value)
    return type(variable)(value)


def _value(original: Any) -> Any:
    """The array an original holds: a Variable's value, or the value a nested chain reads."""
    return original.get_value() if _is_variable(original) else original


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
      use_running_average: ``False`` (training mode): each read updates the state first.
        ``True``: reads leave state alone. ``model.train()`` / ``model.eval()`` set it.

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.weight_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> plist = layer.parametrizations["kernel"]
      >>> plist.original0.shape, plist.original1.shape, len(plist)
      ((1, 2), (3, 2), 1)
    """

    def __init__(
        self,
        node: Parametrized,
        like: nnx.Variable,
        tensor_name: str,
        *,
        label: str | None = None,
        originals: tuple[nnx.Variable, ...] | None = None,
    ):
        self.tensor_name = tensor_name
        self.label = label or tensor_name
        self.chain = node.chain
        self.multi = node.multi
        self.unsafe = node.unsafe
        self.event_ndims = tuple(node.event_ndims)
        self.use_running_average = False
        if originals is None:
            originals = tuple(_like(like, x) for x in node.originals)
        for name, var in zip(_original_names(node.multi, len(originals)), originals):
            setattr(self, name, var)
        if node.params:
            self.params = nnx.data(_wrap(node.params, nnx.Param))
        if node.state:
            self.state = nnx.data(_wrap(node.state, ParametrizationState))

    # ----- reading the Variables as a core node ------------------------------------------
    def _names(self) -> list[str]:
        return _original_names(self.multi, _count_originals(self))

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
            inner = _lookup(self, name)
            out += inner._variables() if inner is not None else [vars(self)[name]]
        return out + _variable_leaves((self._params(), self._state()))

    def _raw(self) -> tuple[Any, ...]:
        return tuple(v.get_raw_value() for v in self._variables())

    # ----- torch's ParametrizationList API -----------------------------------------------
    def __call__(self) -> jax.Array:
        """The constrained value, updating state first in training mode."""
        entry = _cache_lookup(self)
        if entry is not None:
            return entry
        updating = [] if self.use_running_average else self._updating_links()
        value, new_state = _core(
            _materialize_one, self.node(), name=self.label, update_state=bool(updating)
        )
        for i in updating:  # write back only what `update_state` computed
            _write(self._state()[i], new_state[i])
        _cache_store(self, value)
        return value

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
        if _is_variable(value):
            value = value.get_value()
        if ch.is_array(value):
            new = _core(_assign_one, self.node(), value, name=self.label)
        else:  # the core's error
            new = _assign_one(self.node(), value, name=self.label)
        writes: list[tuple[nnx.Variable, Any]] = []
        for name, x in zip(self._names(), new.originals):
            inner = _lookup(self, name)
            writes += inner._plan_assign(x) if inner is not None else [(vars(self)[name], x)]
        jax.tree_util.tree_map(
            lambda v, x: writes.append((v, x)), self._state(), new.state, is_leaf=_is_variable
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

    def _append(self, node: Parametrized) -> None:
        """Adopts the links a registration appended to ``node``; originals are untouched."""
        i = str(len(self.chain))
        if i in node.params:
            self.params = nnx.data({**self._params(), i: _wrap(node.params[i], nnx.Param)})
        if i in node.state:
            self.state = nnx.data({**self._state(), i: _wrap(node.state[i], ParametrizationState)})
        self.chain = node.chain
        self.unsafe = node.unsafe


# ----- running the core ---------------------------------------------------------------------------
_NEEDS_CONCRETE = getattr(
    ch,
    "NEEDS_CONCRETE",
    (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerBoolConversionError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
    ),
)


@functools.cache
def _compiled(fn: Callable[..., Any], static: tuple[str, ...]) -> Callable[..., Any]:
    return jax.jit(fn, static_argnames=static)


# Parametrizations whose functions turned out to need concrete values (numpy inside a
# `right_inverse`, say): their calls run eagerly from then on, without a compile attempt, so
# a user's function runs once per call. A memo like `_compiled`'s cache: it holds facts about
# code, never values.
_EAGER: set[Any] = set()


def _eager_key(fn: Callable[..., Any], args: Any, static: dict[str, Any]) -> Any:
    """What decides whether ``fn(*args, **static)`` can be traced: the parametrizations it
    runs, and whether it runs their ``right_inverse`` (register, assign) or ``forward``."""
    links: list[Any] = [static["parametrization"]] if "parametrization" in static else []
    for x in jax.tree_util.tree_leaves(args, is_leaf=lambda y: isinstance(y, Parametrized)):
        if isinstance(x, Parametrized):
            links += x.chain
    role = "inverse" if fn in (_register_one, _assign_one) else fn
    return role, frozenset(links)  # hashable: `_hashable` checked the chains


def _hashable(args: Any, static: dict[str, Any]) -> bool:
    """Whether jit can cache on the arguments' static parts (the chains) and options."""
    try:
        hash((jax.tree_util.tree_structure(args), tuple(static.items())))
    except TypeError:
        return False
    return True


def _core(fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
    """Runs the pure core function ``fn(*args, **static)``.

    Called eagerly (reading ``module.kernel`` outside ``nnx.jit``, registering), it runs as
    one compiled program, cached by shapes and by the static options (chains included),
    instead of dispatching every operation separately. Inside a trace it runs inline. It
    runs op by op when the options are unhashable or a user's function needs concrete
    values; the latter is remembered, so later calls do not trace that function again.
    """
    leaves = jax.tree_util.tree_leaves(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves) or not _hashable(args, static):
        return fn(*args, **static)
    key = _eager_key(fn, args, static)
    if key in _EAGER:
        return fn(*args, **static)
    try:
        return _compiled(fn, tuple(sorted(static)))(*args, **static)
    except _NEEDS_CONCRETE:
        _EAGER.add(key)
        return fn(*args, **static)


def _register_one(
    leaf: Any, key: Any, *, name: str, parametrization: Any, unsafe: bool, batch_axes: int
) -> Parametrized:
    tree = _register_tree(
        {name: leaf}, (name,), parametrization, unsafe=unsafe, key=key, batch_axes=batch_axes
    )
    return tree[name]


def _assign_one(node: Parametrized, value: Any, *, name: str) -> Parametrized:
    return _assign_tree({name: node}, (name,), value)[name]


def _remove_one(node: Parametrized, *, name: str, leave_parametrized: bool) -> Any:
    return _remove_tree({name: node}, (name,), leave_parametrized=leave_parametrized)[name]


def _materialize_one(node: Parametrized, *, name: str, update_state: bool) -> Any:
    """``(value, new state dict)`` (the state is ``None`` without an update)."""
    if not update_state:
        return materialize({name: node})[name], None
    plain, new_state = materialize({name: node}, update_state=True)
    return plain[name], new_state[name]


def _original_names(multi: bool, n: int) -> list[str]:
    return [f"original{i}" for i in range(n)] if multi else ["original"]


def _count_originals(plist: ParametrizationList) -> int:
    if not plist.multi:
        return 1
    n = 0
    while f"original{n}" in vars(plist) or _lookup(plist, f"original{n}") is not None:
        n += 1
    return n


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


# ----- the generated subclass ----------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def _lookup(module: Any, name: str) -> ParametrizationList | None:
    container = vars(module).get(_CONTAINER)
    if isinstance(container, Parametrizations):
        plist = vars(container).get(name)
        if isinstance(plist, ParametrizationList):
            return plist
    return None


def _rebuild(base: type, state: dict[str, Any]) -> Any:
    """Unpickles a module of a generated class (the class itself is not importable)."""
    obj = object.__new__(_parametrized_class(base))
    obj.__setstate__(state)
    return obj


def _parametrized_class(cls: type) -> type:
    """The generated subclass of ``cls`` (cached, so all instances share it)."""
    base = getattr(cls, "_paramx_base", None)
    if base is not None and cls is _CLASSES.get(base):
        return cls
    if cls in _CLASSES:
        return _CLASSES[cls]

    def __setattr__(self, name: str, value: Any) -> None:
        plist = _lookup(self, name)
        if plist is not None:
            plist.right_inverse(value)
        else:
            cls.__setattr__(self, name, value)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild, (cls, self.__getstate__())

    namespace = {
        "__module__": __name__,
        "__qualname__": f"Parametrized{cls.__name__}",
        "__doc__": f"{cls.__name__} with parametrized tensors (generated by paramx.nnx).",
        "_paramx_base": cls,
        "__setattr__": __setattr__,
        "__reduce_ex__": __reduce_ex__,
    }
    kwds = {"pytree": getattr(cls, "_pytree__is_pytree", False)}
    new = types.new_class(
        f"Parametrized{cls.__name__}", (cls,), kwds, lambda ns: ns.update(namespace)
    )
    _CLASSES[cls] = new
    return new


def _install_property(gen: type, name: str) -> None:
    """Adds the property ``name`` to a generated class, once."""
    if name in vars(gen):
        return

    def fget(self: Any) -> Any:
        plist = _lookup(self, name)
        if plist is not None:
            return plist()
        attrs = vars(self)
        if name in attrs:  # an instance of the same class that does not parametrize `name`
            return attrs[name]
        return getattr(super(gen, self), name)

    def fset(self: Any, value: Any) -> None:
        plist = _lookup(self, name)
        if plist is not None:
            plist.right_inverse(value)
        else:
            vars(self)[name] = value  # NNX's own bookkeeping already ran in __setattr__

    def fdel(self: Any) -> None:
        if _lookup(self, name) is not None:
            raise AttributeError(
                f"{name!r} is parametrized; use paramx.nnx.remove_parametrizations(module, "
                f"{name!r}) to remove it."
            )
        try:
            del vars(self)[name]
        except KeyError:
            raise AttributeError(name) from None

    doc = f"The parametrized tensor {name!r} (set to assign through right_inverse)."
    setattr(gen, name, property(fget, fset, fdel, doc))


# ----- cache -----------------------------------------------------------------------------------
class _CacheState(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.entries: dict[int, tuple[tuple[Any, ...], jax.Array]] = {}


_CACHE = _CacheState()


def _cache_lookup(plist: ParametrizationList) -> jax.Array | None:
    if not _CACHE.depth:
        return None
    entry = _CACHE.entries.get(id(plist))
    if entry is None:
        return None
    raw, value = entry
    now = plist._raw()
    if len(raw) == len(now) and all(a is b for a, b in zip(raw, now)):
        return value
    return None


def _cache_store(plist: ParametrizationList, value: jax.Array) -> None:
    if _CACHE.depth:
        _CACHE.entries[id(plist)] = (plist._raw(), value)


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Computes each parametrized tensor once while the context is open; torch's ``cached``.

    Inside the block, the first read of a parametrized tensor computes it (and, in training
    mode, updates its state once); later reads return the same array as long as its
    originals, params and state Variables still hold the arrays it was computed from, so an
    optimizer update or an assignment makes it compute again. Use it when a module reads a
    tensor several times per step (a layer applied in a loop, shared weights), inside the
    function you give ``nnx.jit``, or around an evaluation loop. Nested blocks share one
    cache, which is emptied when the outermost block closes.

    Yields:
      Nothing.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
      >>> with pnx.cached():
      ...     a, b = layer.kernel, layer.kernel
      >>> a is b
      True
    """
    _CACHE.depth += 1
    try:
        yield
    finally:
        _CACHE.depth -= 1
        if not _CACHE.depth:
            _CACHE.entries.clear()


# ----- the public functions --------------------------------------------------------------------
def _check_module(module: Any) -> None:
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"Expected an nnx.Module, got {type(module).__name__}. For a pytree of arrays use "
            f"paramx.register_parametrization; for a linen model, paramx.linen."
        )


def _variable(module: Any, name: str) -> nnx.Variable:
    """The Variable ``module.<name>``; raises a ValueError naming the closest names."""
    attrs = vars(module)
    if not isinstance(name, str) or name not in attrs:
        names = sorted(k for k, v in attrs.items() if _is_variable(v))
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
    if not _is_variable(var) or not ch.is_array(var.get_value()):
        what = type(var.get_value()).__name__ if _is_variable(var) else type(var).__name__
        raise ValueError(
            f"The attribute {name!r} of {type(module).__name__} is a {what}, not a Variable "
            f"holding an array; only arrays held by Variables (nnx.Param, nnx.BatchStat, ...) "
            f"can be parametrized."
        )
    return var


def _label(module: Any, name: str) -> str:
    """``Linear.kernel`` (``Linear.kernel.original`` for a nested registration): how errors
    name a tensor, since a module does not know its path in the model."""
    if isinstance(module, ParametrizationList):
        return f"{module.label}.{name}"
    return f"{type_before_parametrizations(module).__name__}.{name}"


def _keeps_value(node: Parametrized, value: Any) -> bool:
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


# References a Variable has when only its module holds it, counted inside
# `register_parametrization`: the module's attribute, the local name, getrefcount's argument.
_OWN_REFS = 3


def _other_holders(module: Any, name: str, var: nnx.Variable) -> list[str]:
    """Where NNX objects other than ``module.<name>`` hold ``var`` (tied weights), as
    ``Class.attribute`` strings. NNX objects have no parent links, so this asks the garbage
    collector which objects refer to the Variable (only when its reference count says some
    object other than the module does)."""
    found = [
        f"{type_before_parametrizations(module).__name__}.{attr}"
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
    cls = type_before_parametrizations(owner).__name__
    return f"{cls}.{attrs[0]}" if attrs else cls


def _refuse_shared(label: str, holders: list[str], parametrization: Any, multi: bool) -> None:
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
    computation is :func:`paramx.register_parametrization` on ``{name: value}``: the
    checks and error messages are the same, naming the tensor as ``Class.name``. Nothing is
    modified when an error is raised.

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
        optionally ``right_inverse``, ``init``, ``update_state``), or a plain function.
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
    _check_module(module)
    label = _label(module, name)
    options = dict(name=label, parametrization=parametrization, unsafe=unsafe)
    plist = _lookup(module, name)
    if plist is not None:
        node = _core(_register_one, plist.node(), key, batch_axes=batch_axes, **options)
        plist._append(node)
        return module
    var = _variable(module, name)
    refs = sys.getrefcount(var) if hasattr(sys, "getrefcount") else _OWN_REFS + 1
    value = var.get_value()
    node = _core(_register_one, value, key, batch_axes=batch_axes, **options)
    keep = _keeps_value(node, value)
    if not keep and refs > _OWN_REFS:
        holders = _other_holders(module, name, var)
        if holders:
            gc.collect()  # dropped modules in reference cycles hold nothing
            holders = _other_holders(module, name, var)
        if holders:
            _refuse_shared(label, holders, parametrization, node.multi)
    originals = (var,) if keep else None
    plist = ParametrizationList(node, var, name, label=label, originals=originals)
    container = vars(module).get(_CONTAINER)
    if container is None:
        if _CONTAINER in vars(module) or hasattr(type(module), _CONTAINER):
            raise ValueError(
                f"Module {type(module).__name__} already has an attribute {_CONTAINER!r} that "
                f"paramx did not create; rename it to parametrize this module."
            )
        # Everything is computed: only now is the module modified.
        setattr(module, _CONTAINER, Parametrizations())
        container = vars(module)[_CONTAINER]
    delattr(module, name)
    container[name] = plist
    gen = _parametrized_class(type(module))
    _install_property(gen, name)
    if type(module) is not gen:
        object.__setattr__(module, "__class__", gen)
    return module


def is_parametrized(module: Any, name: str | None = None) -> bool:
    """Whether ``module`` has a parametrization (on ``name``, when given); torch's
    ``is_parametrized``.

    Args:
      module: Any object; only NNX modules registered with paramx.nnx can be parametrized.
      name: An attribute name, or ``None`` for any.

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
    container = vars(module).get(_CONTAINER) if hasattr(module, "__dict__") else None
    if not isinstance(container, Parametrizations):
        return False
    if name is None:
        return len(container) > 0
    return _lookup(module, name) is not None


def type_before_parametrizations(module: Any) -> type:
    """The module's class before paramx swapped it; torch's ``type_before_parametrizations``.

    Args:
      module: Any object.

    Returns:
      The original class (``type(module)`` when it is not parametrized).

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
      >>> type(layer).__name__, pnx.type_before_parametrizations(layer).__name__
      ('ParametrizedLinear', 'Linear')
    """
    cls = type(module)
    base = getattr(cls, "_paramx_base", None)
    return base if base is not None and _CLASSES.get(base) is cls else cls


def remove_parametrizations(
    module: nnx.Module, name: str, leave_parametrized: bool = True
) -> nnx.Module:
    """Removes the parametrizations on ``module.<name>``, in place; torch's
    ``remove_parametrizations``.

    With ``leave_parametrized=True`` the attribute becomes a plain Variable (of the
    original's type) holding the current constrained value, computed without a state
    update; with ``False`` it becomes the ``original`` Variable itself, which needs a single
    original. The computation is :func:`paramx.remove_parametrizations`. When no
    parametrization is left, ``module.parametrizations`` is deleted and the module gets its
    class back.

    Args:
      module: A module with a parametrization on ``name``.
      name: The attribute name.
      leave_parametrized: Keep the constrained value (True) or the raw original (False).

    Returns:
      ``module`` (modified in place).

    Raises:
      ValueError: If ``name`` is not parametrized, or for ``leave_parametrized=False`` with
        several originals (weight norm's g and v), as in torch.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
      >>> q = layer.kernel
      >>> _ = pnx.remove_parametrizations(layer, "kernel")
      >>> type(layer).__name__, type(layer.kernel).__name__
      ('Linear', 'Param')
      >>> bool(jnp.array_equal(layer.kernel[...], q))
      True
    """
    _check_module(module)
    plist = _lookup(module, name)
    if plist is None:
        names = list(vars(module).get(_CONTAINER, {}) or [])
        raise ValueError(
            f"Module {type(module).__name__} does not have a parametrization on {name!r}. "
            f"Parametrized names: {', '.join(map(repr, names)) or 'none'}."
        )
    nested = [n for n in plist._names() if _lookup(plist, n) is not None]
    if nested:
        raise ValueError(
            f"The original {nested[0]!r} of {plist.label} has parametrizations of its own "
            f"(nested registration). Remove those first: "
            f"`paramx.nnx.remove_parametrizations(module.parametrizations[{name!r}], "
            f"{nested[0]!r})`, then remove {name!r}."
        )
    value = _core(
        _remove_one, plist.node(), name=plist.label, leave_parametrized=leave_parametrized
    )
    originals = plist.originals
    if not leave_parametrized:
        restored = originals[0]
    elif (
        len(originals) == 1
        and jnp.shape(originals[0].get_value()) == jnp.shape(value)
        and jnp.result_type(originals[0].get_value()) == jnp.result_type(value)
    ):
        # torch sets the original Parameter to the value: the same object stays, so a
        # Variable shared with another module (tied weights) stays shared.
        restored = originals[0]
        restored.set_value(value)
    else:
        same = [v for v in originals if v.get_value().shape == value.shape]
        restored = same[0].copy(value) if same else type(originals[0])(value)
    container = vars(module)[_CONTAINER]
    del container[name]
    if len(container) == 0:
        delattr(module, _CONTAINER)
        object.__setattr__(module, "__class__", type_before_parametrizations(module))
    setattr(module, name, restored)
    return module


def orthogonal(
    module: nnx.Module,
    name: str = "kernel",
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
    batch_axes: int = 0,
) -> nnx.Module:
    """Makes ``module.<name>`` orthogonal, in place; torch's ``orthogonal``.

    Registers :class:`paramx.Orthogonal` with the shape and dtype checks on (torch skips
    them), so assigning a value of another shape or dtype raises. Right after
    registration the kernel reads as the Q factor of its value; with the default
    trivialization the original is -I and the orthogonal ``base`` is
    :class:`ParametrizationState`, set only at registration and on assignment. On a Flax
    kernel (in, out) it computes the transpose of torch's result on the (out, in) weight;
    a conv kernel gets one orthogonal (in, out) matrix per spatial tap.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      orthogonal_map: ``"matrix_exp"``, ``"cayley"``, ``"householder"`` or ``None`` (torch's
        rule: ``matrix_exp`` if square or complex, else ``householder``).
      use_trivialization: Keep an orthogonal base as state (default True).
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``): one
        orthogonal matrix per layer.

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.orthogonal(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
      >>> k = layer.kernel
      >>> bool(jnp.allclose(k @ k.T, jnp.eye(3), atol=1e-5))
      True
    """
    p = Orthogonal(orthogonal_map, use_trivialization)
    return register_parametrization(module, name, p, batch_axes=batch_axes)


def spectral_norm(
    module: nnx.Module,
    name: str = "kernel",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    axis_name: Any = None,
    key: jax.Array | None = None,
    batch_axes: int = 0,
) -> nnx.Module:
    """Divides ``module.<name>`` by its spectral norm, in place; torch's ``spectral_norm``.

    Registers :class:`paramx.SpectralNorm`. ``u`` and ``v`` are
    :class:`ParametrizationState`: 15 power iterations at registration, then
    ``n_power_iterations`` on each read while the module is in training mode
    (``use_running_average=False``, the default; ``module.eval()`` freezes them). The raw
    kernel is never overwritten, unlike ``nnx.SpectralNorm`` (flax#5576).

    Args:
      module: The module.
      name: The attribute to normalize.
      n_power_iterations: Power iterations per read in training mode.
      eps: Floor of the norms.
      dim: Axis of output features; ``None`` is the last axis (Flax's layout).
      axis_name: Average u and v over this named axis after each update.
      key: PRNG key for the initial u and v.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``): each
        layer is normalized by its own spectral norm, with its own u and v.

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = pnx.spectral_norm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> round(float(jnp.linalg.norm(layer.kernel, 2)), 4)
      1.0
    """
    p = SpectralNorm(n_power_iterations, eps, dim, axis_name)
    return register_parametrization(module, name, p, key=key, batch_axes=batch_axes)


def weight_norm(
    module: nnx.Module, name: str = "kernel", dim: int | None = -1, *, batch_axes: int = 0
) -> nnx.Module:
    """Splits ``module.<name>`` into a norm g and a direction v, in place; torch's
    ``weight_norm``.

    Registers :class:`paramx.WeightNorm`: ``original0`` is g (one norm per output feature,
    shape (1, out) for a Dense kernel) and ``original1`` is v, both ``nnx.Param``, so the
    optimizer trains g (``nnx.WeightNorm``'s scales never train, flax#5577). The module's
    output is unchanged by registration.

    Args:
      module: The module.
      name: The attribute to reparametrize.
      dim: The axis of output features (default: the last); ``None`` for one norm over the
        whole tensor. Counted without the ``batch_axes`` stack axes.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> kernel = layer.kernel[...]
      >>> layer = pnx.weight_norm(layer)
      >>> bool(jnp.allclose(layer.kernel, kernel))
      True
    """
    return register_parametrization(module, name, WeightNorm(dim), batch_axes=batch_axes)
