"""Flax linen: declare parametrizations inside a model definition with `Parametrize`.

`Parametrize` wraps any linen module (one layer or a whole submodule tree). It is
transparent in the variable layout: the wrapped module's variables sit exactly where they
would without the wrapper, parametrized leaves become :class:`paramx.Parametrized` nodes
in the ``'params'`` collection, and state (power-iteration vectors, an orthogonal base)
lives in its own collection, ``'paramx_state'`` by default, at the same paths.

At ``model.init`` the initializer runs as usual and the wrapper registers the rules on its
output, so the stored originals are ``right_inverse(initializer output)`` and the output
of ``init`` equals the output of a later ``apply`` with those variables. At ``apply`` the
wrapper materializes its subtree once per ``apply``, however often the wrapped module
reads a parameter or is called. The state is updated by a training step only: the
``use_running_average`` flag (BatchNorm's) says which calls are training.

The wrapper keeps no record of its own: whether a subtree is already registered is read off
the variables (they hold ``Parametrized`` nodes), so lifted transforms that trace the body
several times (``nn.scan``, ``nn.vmap``, ``nn.remat``, ``nn.jit``) see the same thing each
time.

With ``layout="arrays"`` the ``'params'`` collection holds plain arrays only: each
parametrized tensor is a dict of its originals (``{"original": w}`` or ``{"original0": g,
"original1": v}``, plus ``"params"`` for links with learnable arrays), and the wrapper
rebuilds the nodes from its own rules at every call. NNX (``nnx.bridge.ToNNX``) needs this
layout: it merges all collections of a module into one namespace and trains arrays only.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import yaml

from paramx._src.core import checks, paths, tie
from paramx._src.core import parametrization as pz
from paramx._src.core.materialize import materialize
from paramx._src.core.node import Parametrized, is_node
from paramx._src.core.register import register_parametrization
from paramx._src.core.state import merge_state, split_state
from paramx._src.parametrizations.convops import ConvGeometry, flax_conv_geometry, uncovered

_STATE_COLLECTION = "paramx_state"
_FLAG = "use_running_average"
_LAYOUTS = ("nodes", "arrays")
_ORIGINAL = re.compile(r"original\d*")
_PARAMS_KEY = "params"


def normalize_rules(rules: Any) -> tuple[tuple[Any, Any], ...]:
    """``{where: p}``, ``[(where, p), ...]`` or ``(where, p)`` as ``((where, p), ...)``.

    A value that is a list or tuple of parametrizations is a chain: registered in order on
    the same selection.
    """
    if isinstance(rules, Mapping):
        pairs = list(rules.items())
    elif (
        isinstance(rules, tuple)
        and len(rules) == 2
        and not (isinstance(rules[0], tuple) and len(rules[0]) == 2)
        and (isinstance(rules[0], str) or callable(rules[0]))
    ):
        pairs = [rules]
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        pairs = list(rules)
    else:
        raise TypeError(
            "`rules` must be a mapping {where: parametrization}, a sequence of "
            f"(where, parametrization) pairs, or one such pair; got {type(rules).__name__}."
        )
    out: list[tuple[Any, Any]] = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(
                f"Each rule must be a (where, parametrization) pair; got {pair!r}. Write rules as "
                '{"kernel": paramx.Orthogonal()} or [("kernel", paramx.Orthogonal())].'
            )
        where, p = pair
        chain = tuple(p) if isinstance(p, list) or type(p) is tuple else (p,)
        out.extend((where, link) for link in chain)
    return tuple(out)


# ----- the state collection <-> the nodes' state ---------------------------------------------
def _nested_get(tree: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _nested_set(tree: dict, keys: tuple[Any, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _node_or_box(x: Any) -> bool:
    return is_node(x) or paths.is_box(x)


def _map_nodes(fn: Callable[[Any, Parametrized], Any], tree: Any) -> Any:
    """``fn(path, node)`` for each node, also inside a Flax metadata box (which is kept)."""

    def visit(path: Any, x: Any) -> Any:
        box, inner = paths.unbox(x)
        return paths.rebox(box, fn(path, inner)) if is_node(inner) else x

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_node_or_box)


def _nodes(tree: Any) -> list[Parametrized]:
    return [leaf for _, leaf in paths.leaves_with_paths(tree) if is_node(leaf)]


def _updates_state(tree: Any) -> bool:
    """Whether a training step would update any state of ``tree`` (nodes holding their state):
    a link with an ``update_state`` and state of its own (the chain runs no other; a stateless
    method such as ``ConvSpectralNorm(method="gram")`` has the method but no state)."""
    return any(
        pz.update_state_fn(p) is not None and str(i) in n.state
        for n in _nodes(tree)
        for i, p in enumerate(n.chain)
    )


def _takes_flag(module: nn.Module) -> bool:
    """Whether the wrapped module's ``__call__`` names a ``use_running_average`` parameter."""
    try:
        return _FLAG in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):  # no introspectable signature: do not pass it on
        return False


def _held_modules(value: Any, where: str) -> list[tuple[str, nn.Module]]:
    """The modules in an attribute's value (a module, or lists, tuples and dicts of them)."""
    if isinstance(value, nn.Module):
        return [(where, value)]
    if isinstance(value, list | tuple):
        return [m for i, v in enumerate(value) for m in _held_modules(v, f"{where}[{i}]")]
    if isinstance(value, Mapping):
        return [m for k, v in value.items() for m in _held_modules(v, f"{where}[{k!r}]")]
    return []


def _foreign_submodules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules held in ``module``'s attributes (at any depth) whose parent is a module
    outside it: built in an enclosing module's compact method (``nn.Sequential([nn.Dense(3),
    ...])`` there), so Flax made them that module's children. Their variables are not the
    wrapped module's, and a wrapper of it cannot map them."""
    inside: set[int] = set()
    held: list[tuple[str, nn.Module]] = []

    def visit(m: nn.Module, where: str) -> None:
        if id(m) in inside:
            return
        inside.add(id(m))
        for f in dataclasses.fields(m):
            if f.name not in ("parent", "name"):
                found = _held_modules(getattr(m, f.name, None), f"{where}.{f.name}")
                held.extend(found)
                for w, sub in found:
                    visit(sub, w)

    visit(module, type(module).__name__)
    return [
        (w, m) for w, m in held if isinstance(m.parent, nn.Module) and id(m.parent) not in inside
    ]


# ----- layout="arrays": a node as a dict of plain arrays, and back ---------------------------
def _is_group(x: Any) -> bool:
    """Whether ``x`` looks like a node stored in the arrays layout: a dict with an
    ``original`` / ``original0`` entry holding an array (never a dict)."""
    if not isinstance(x, Mapping):
        return False
    firsts = [x[k] for k in ("original", "original0") if k in x]
    return bool(firsts) and not isinstance(paths.unbox(firsts[0])[1], Mapping)


def _group_or_leaf(x: Any) -> bool:
    return _is_group(x) or _node_or_box(x)


def _groups(tree: Any) -> dict[tuple[Any, ...], Any]:
    """The arrays-layout groups in ``tree``, by their plain key paths."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_group_or_leaf)[0]
    return {paths.path_keys(path): x for path, x in flat if _is_group(x)}


def _as_arrays(tree: Any, plain: Any) -> Any:
    """Each (boxed) node of a registered ``tree`` as a dict of its originals and params.

    A metadata box around a node goes onto each original with the shape of the tensor it
    stood for (``plain``, the tree before registration), where its per-axis names still apply.
    """
    shapes = {
        paths.path_keys(path): getattr(leaf, "shape", None)
        for path, leaf in paths.leaves_with_paths(plain)
    }

    def expand(path: Any, x: Any) -> Any:
        box, node = paths.unbox(x)
        if not is_node(node):
            return x
        shape = shapes.get(paths.path_keys(path))
        out: dict[str, Any] = {
            name: paths.rebox(box, a) if box is not None and a.shape == shape else a
            for name, a in zip(node.original_names, node.originals)
        }
        if node.params:
            out[_PARAMS_KEY] = dict(node.params)
        return out

    return jax.tree_util.tree_map_with_path(expand, tree, is_leaf=_node_or_box)


def _spec(group: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
    """What a predicate sees for a stored group: the first original's shape and dtype."""
    first = paths.unbox(group["original" if "original" in group else "original0"])[1]
    return jax.ShapeDtypeStruct(first.shape, first.dtype)


def normalize_ties(ties: Any) -> tuple[tuple[Any, Any, Any], ...]:
    """``{where: source}``, ``{where: (source, transform)}`` or a sequence of
    ``(where, source)`` / ``(where, source, transform)`` as ``((where, source, transform), ...)``.
    """
    if ties is None:
        return ()
    items = list(ties.items()) if isinstance(ties, Mapping) else list(ties)
    out = []
    for item in items:
        ok = isinstance(item, tuple | list) and len(item) in (2, 3)
        if ok and len(item) == 2:
            where, value = item
            if isinstance(value, tuple | list) and len(value) == 2 and callable(value[1]):
                item = (where, *value)
            else:
                item = (where, value, None)
        if not ok:
            raise TypeError(
                f"Each tie must be where -> source, where -> (source, transform), or a "
                f"(where, source, transform) triple; got {item!r}. Write ties as "
                '{"decoder/kernel": ("encoder/kernel", jnp.transpose)}.'
            )
        out.append(tuple(item))
    return tuple(out)


def _register(wrapper: Parametrize, plain: Any, key: jax.Array) -> Any:
    """Registers ``wrapper``'s rules on ``plain``, then makes its ties."""
    tree = plain
    try:
        for where, p in normalize_rules(wrapper.rules):
            tree = register_parametrization(
                tree, where, p, unsafe=wrapper.unsafe, key=key, batch_axes=wrapper.batch_axes
            )
        for where, source, transform in normalize_ties(wrapper.ties):
            tree = tie.tie(tree, where, source, transform=transform)
    except ValueError as e:
        raise ValueError(
            f"paramx.linen.Parametrize around {type(wrapper.module).__name__} "
            f"(paths are relative to it): {e}"
        ) from None
    return tree


class _Memo:
    """The materialized view of one bound wrapper, reused by its later calls.

    Created in ``setup``, which Flax runs anew on every bound copy of the module (each
    ``init`` / ``apply``, each trace of a lifted transform), so it never outlives one call of
    the model. An entry is reused only for the very arrays it was computed from, and only
    where its values can be used: not after the JAX trace that computed them has ended (a
    call inside ``jax.lax.fori_loop``'s body, then one after the loop).
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple[tuple[Any, ...], bool, Any, Any] | None = None

    def get(self, leaves: tuple[Any, ...], update: bool) -> Any:
        if self.entry is None:
            return None
        old, old_update, trace, plain = self.entry
        same = len(old) == len(leaves) and all(a is b for a, b in zip(old, leaves))
        if not (same and old_update == update):
            return None
        return plain if checks.reusable(trace, plain) else None

    def put(self, leaves: tuple[Any, ...], update: bool, plain: Any) -> None:
        self.entry = (leaves, update, checks.current_trace(), plain)


class Parametrize(nn.Module):
    """Parametrizes variables of a linen module, declared in the model definition.

    Wrap a layer (``Parametrize(nn.Dense(64), {"kernel": paramx.Orthogonal()})``) or a
    whole submodule tree, selecting leaves with paths relative to the wrapped module or a
    predicate (``lambda path, leaf: paramx.path_keys(path)[-1] == "kernel"``). The wrapper
    adds no level to the variable tree: the variables are where the unwrapped module would
    put them, so removing the wrapper (or exporting with
    :func:`paramx.remove_parametrizations`) gives the plain model's tree.

    - ``init`` stores ``right_inverse`` of the initializer's output: the model's output at
      init equals its output at apply, and equals the unwrapped model's output whenever the
      parametrization's ``right_inverse`` is exact (weight norm, orthogonal on an
      orthogonal init).
    - ``apply`` computes each parametrized tensor once per call of the wrapper, however often
      the wrapped module reads it (a module called several times inside the wrapped tree,
      a cell under ``nn.scan``), and within one ``apply`` a second call of the same wrapper
      reuses the first one's values.
    - **Training or evaluation** is said as for ``nn.BatchNorm``: ``use_running_average``,
      an attribute or a keyword of the call (not both). ``False`` is a training step: the
      state (spectral norm's ``u, v``) takes one ``update_state`` step, and its collection
      must be mutable (``mutable=["paramx_state"]``). ``True`` is evaluation: the state is
      read, never changed, whatever is mutable. Without the flag, an ``apply`` in which the
      collection is immutable is evaluation, and one in which it is mutable raises (an
      evaluation reusing the training ``mutable=[...]`` list would otherwise run a power
      iteration). The call keyword is also passed on to the wrapped module when its
      ``__call__`` takes ``use_running_average`` (a wrapped ``BatchNorm``).
    - **Stacks.** Wrap the layer inside ``nn.scan`` / ``nn.vmap`` (the scanned or vmapped
      body) and each layer's kernel is registered on its own; ``px.materialize`` outside the
      model then runs the chain per layer. Wrapping the transformed module instead sees the
      stacked kernels: pass ``batch_axes=1`` (the number of stack axes) so that each layer is
      still parametrized on its own.
    - **Submodules** of the wrapped module must be its own. Modules built in an enclosing
      module's compact method and handed to it (``nn.Sequential([nn.Dense(3), ...])`` built
      there), or the enclosing module's own layers shared with it, are Flax children of the
      enclosing module, whose variables the wrapper cannot map: it refuses them with a
      ``ValueError``. Build them in a ``setup`` method, wrap each layer on its own, or wrap
      the enclosing module.
    - **Layout.** ``layout="nodes"`` (the default) stores each parametrized tensor in the
      ``'params'`` collection as a :class:`paramx.Parametrized` node, which
      :func:`paramx.materialize` and the other tree functions read outside the model.
      ``layout="arrays"`` stores plain arrays only: a dict of the node's fields
      (``{"original": w}``, or ``{"original0": g, "original1": v}``, plus ``"params"``
      for links with learnable arrays), and the wrapper rebuilds the nodes from its rules
      at each call. ``flax.nnx.bridge.ToNNX`` needs ``layout="arrays"`` (with the default,
      NNX fails in ``lazy_init`` with ``argument of type 'Parametrized' is not iterable``).
      In this layout a predicate in ``rules`` is called, at apply time, with a
      ``jax.ShapeDtypeStruct`` of the stored original (the first one when there are
      several) as its leaf, the value itself not being stored: select by path. Variables
      created with the other layout raise a ``ValueError`` saying so.

    Put the wrapper outside an ``nn.scan`` over time (wrap the scanned module, whose
    parameters are broadcast) to compute the parametrization once per sequence; a wrapper
    inside the scanned cell runs every step.

    Attributes:
      module: The linen module to wrap (unbound, as in any module definition).
      rules: ``{where: parametrization}``, or a sequence of ``(where, parametrization)``
        pairs (the same ``where`` twice chains); a list of parametrizations as a value is a
        chain. ``where`` is a path relative to the wrapped module (``"kernel"``,
        ``"Dense_0/kernel"``), a tuple of keys, or a predicate over key paths.
      state_collection: Collection holding the parametrizations' state.
      use_running_average: ``False``: training (update the state); ``True``: evaluation;
        ``None`` (default): given at call time, or decided as described above.
      update_state: The earlier spelling of the same flag, inverted: ``update_state=True``
        is ``use_running_average=False`` and ``update_state=False`` is
        ``use_running_average=True``. Give at most one of the two attributes.
      unsafe: Passed to :func:`paramx.register_parametrization`.
      collection: The collection whose variables the rules select (``'params'``).
      batch_axes: Leading axes of the selected variables that index a stack of layers (the
        wrapped module is an ``nn.scan`` or ``nn.vmap`` over layers): each layer is
        parametrized on its own. Passed to :func:`paramx.register_parametrization`.
      layout: ``"nodes"`` (default) or ``"arrays"`` (plain arrays in ``'params'``, for
        ``nnx.bridge.ToNNX``), as described above.
      ties: Tied parameters, made after the rules are registered (see :func:`paramx.tie`):
        ``{where: source}`` or ``{where: (source, transform)}`` (or a sequence of
        ``(where, source, transform)`` triples), paths relative to the wrapped module. The
        variables hold one copy, the source's; the tied leaf is a :class:`paramx.Tied`
        marker and reads ``transform(source's value)`` (the constrained value, if the source
        is parametrized) at every apply. At ``init`` the model's output still uses the tied
        leaf's own initial value. Needs ``layout="nodes"``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> layer = px.linen.Parametrize(nn.Dense(3), {"kernel": px.SpectralNorm()})
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> variables["params"]["kernel"].chain_names()
      ['spectral_norm']
      >>> w = px.materialize(variables["params"], variables["paramx_state"])["kernel"]
      >>> round(float(jnp.linalg.norm(w, 2)), 4)
      1.0
      >>> # A training step: one power iteration, new state returned.
      >>> y, updates = layer.apply(
      ...     variables, jnp.ones((1, 3)), use_running_average=False, mutable=["paramx_state"]
      ... )
      >>> sorted(updates)
      ['paramx_state']
      >>> # Evaluation: the state is read and left as it is.
      >>> y = layer.apply(variables, jnp.ones((1, 3)), use_running_average=True)
      >>> y.shape
      (1, 3)

      The arrays layout, for the NNX bridge: ``'params'`` holds plain arrays only.

      >>> import optax
      >>> from flax import nnx
      >>> layer = px.linen.Parametrize(nn.Dense(3), {"kernel": px.SpectralNorm()}, layout="arrays")
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'bias': (3,), 'kernel': {'original': (3, 3)}}
      >>> model = nnx.bridge.ToNNX(layer, rngs=nnx.Rngs(0))
      >>> model = model.lazy_init(jnp.ones((1, 3)))
      >>> opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
      >>> @nnx.jit
      ... def train_step(model, opt, x):
      ...     def loss(m):
      ...         y = m(x, use_running_average=False, mutable=["paramx_state"])
      ...         return jnp.mean(y**2)
      ...     value, grads = nnx.value_and_grad(loss)(model)
      ...     opt.update(model, grads)
      ...     return value
      >>> value = train_step(model, opt, jnp.ones((2, 3)))
      >>> model(jnp.ones((1, 3))).shape  # evaluation: the state is read, not changed
      (1, 3)

      Tied weights: the decoder reads the transpose of the orthogonal encoder kernel.

      >>> class AutoEncoder(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(4, name="decoder")(nn.Dense(2, name="encoder")(x))
      >>> model = px.linen.Parametrize(
      ...     AutoEncoder(), {"encoder/kernel": px.Orthogonal()},
      ...     ties={"decoder/kernel": ("encoder/kernel", jnp.transpose)})
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> variables["params"]["decoder"]["kernel"]
      Tied(source='../encoder/kernel', transform=transpose, float32[2, 4])
      >>> model.apply(variables, jnp.ones((1, 4))).shape
      (1, 4)
    """

    module: nn.Module
    rules: Any = ()
    state_collection: str = _STATE_COLLECTION
    use_running_average: bool | None = None
    update_state: bool | None = None
    unsafe: bool = False
    collection: str = "params"
    batch_axes: int = 0
    layout: str = "nodes"
    ties: Any = None

    def setup(self) -> None:
        if self.layout not in _LAYOUTS:
            raise ValueError(
                f"{self._where()}: `layout` must be 'nodes' (the params collection holds "
                f"paramx.Parametrized nodes) or 'arrays' (it holds plain arrays, as "
                f"nnx.bridge.ToNNX needs); got {self.layout!r}."
            )
        if self.ties and self.layout == "arrays":
            raise ValueError(
                f"{self._where()}: `ties` needs layout='nodes' (the tied leaf is stored as a "
                f"paramx.Tied marker, which the arrays layout cannot hold). With NNX, tie "
                f"natively instead: share the Variable, or use paramx.nnx.tie."
            )
        foreign = _foreign_submodules(self.module)
        if foreign:
            where, sub = foreign[0]
            raise ValueError(
                f"{self._where()}: the wrapped module holds {where} ({type(sub).__name__}), "
                f"a child of {type(sub.parent).__name__} (built in its compact method, or one "
                f"of its own layers): its variables are not the wrapped module's, and the "
                f"wrapper would lose them. Build the submodules inside the wrapped module (in "
                f"a setup method, e.g. `self.net = paramx.linen.Parametrize(nn.Sequential("
                f"[...]), rules)` in the enclosing module's setup), wrap each layer on its "
                f"own (paramx.linen.Parametrize(nn.Dense(...), rules)), or, for a layer shared "
                f"with {type(sub.parent).__name__}, wrap {type(sub.parent).__name__} instead."
            )
        nn.share_scope(self, self.module)
        self._memo = _Memo()

    def __call__(self, *args: Any, use_running_average: bool | None = None, **kwargs: Any) -> Any:
        """Calls the wrapped module with the parametrized variables.

        Args:
          *args: Passed to the wrapped module.
          use_running_average: ``False`` for a training step (the state is updated), ``True``
            for evaluation. Give it here or as the attribute, not both.
            Passed on to the wrapped module too when its ``__call__`` takes it.
          **kwargs: Passed to the wrapped module.
        """
        if use_running_average is not None and _takes_flag(self.module):
            kwargs[_FLAG] = use_running_average
        self._check_conv_geometry(args[0] if args else None)
        return self._run(
            lambda module, *a, **k: module(*a, **k), use_running_average, *args, **kwargs
        )

    # ----- helpers --------------------------------------------------------------------------
    # `nn.nowrap`: `model.tabulate` records every wrapped method call with its inputs and
    # outputs, and cannot show registered nodes inside a metadata box (they refuse to act as
    # arrays); these helpers are not part of the model's computation.
    @nn.nowrap
    def _check_conv_geometry(self, x: Any) -> None:
        """A rule that declares a conv geometry (a Lipschitz bound's padding, strides,
        dilation, input size) must declare the wrapped ``nn.Conv``'s: else its bound is for
        another operator (a SAME power iteration applied as a CIRCULAR conv measured 1.11)."""
        if type(self.module) is not nn.Conv:
            return
        conv: Any = self.module  # the fields as Flax keeps them (ints or sequences)
        rank = len(tuple(conv.kernel_size))
        actual = flax_conv_geometry(conv)
        size = tuple(x.shape[-(rank + 1) : -1]) if hasattr(x, "shape") else None
        in_features = x.shape[-1] // (conv.feature_group_count or 1) if size else 0
        kernel_shape = (*conv.kernel_size, in_features, conv.features) if size else None
        for where, p in normalize_rules(self.rules):
            declared = getattr(p, "geometry", None)
            if declared is None:
                sized = dataclasses.replace(actual, input_size=size)
                why = uncovered(p, sized, kernel_shape)
                if why:
                    raise ValueError(
                        f"{self._where()}: {pz.display_name(p)} (for {where!r}) declares no "
                        f"geometry, and its bound does not cover the wrapped Conv "
                        f"(padding={conv.padding!r}, strides={conv.strides or 1}, "
                        f"kernel_dilation={conv.kernel_dilation or 1}): {why}"
                    )
            if not isinstance(declared, ConvGeometry):
                continue
            wrong = declared.mismatches(actual, rank, size)
            if wrong:
                raise ValueError(
                    f"{self._where()}: the geometry declared for {where!r} "
                    f"({pz.display_name(p)}) is not the wrapped Conv's ({'; '.join(wrong)}), so "
                    f"its bound would be for another operator. Declare the Conv's own: "
                    f"ConvGeometry(input_size={size}, strides={conv.strides or 1}, "
                    f"padding={conv.padding!r}, kernel_dilation={conv.kernel_dilation or 1})."
                )

    @nn.nowrap
    def _where(self) -> str:
        scope_path = "/".join(map(str, self.scope.path)) if self.scope is not None else ""
        return (
            f"paramx.linen.Parametrize around {type(self.module).__name__}"
            f"{f' at {scope_path}' if scope_path else ''}"
        )

    @nn.nowrap
    def _flag(self, at_call: bool | None) -> bool | None:
        """``use_running_average`` from the attributes and the call, as BatchNorm merges it."""
        attribute = self.use_running_average
        if self.update_state is not None:
            if attribute is not None:
                raise ValueError(
                    f"{self._where()}: give either `use_running_average` or its older "
                    f"spelling `update_state` (update_state=True is use_running_average=False), "
                    f"not both."
                )
            attribute = not self.update_state
        if attribute is None and at_call is None:
            return None
        return nn.merge_param(_FLAG, attribute, at_call)

    @nn.nowrap
    def _should_update(self, flag: bool | None, tree: Any) -> bool:
        if self.is_initializing():
            return False  # registration already ran the warm-up
        scol = self.state_collection
        mutable = self.is_mutable_collection(scol)
        if flag is None:
            if mutable and _updates_state(tree):
                raise ValueError(
                    f"{self._where()}: the state collection '{scol}' is mutable in this call, "
                    f"but nothing says whether it is a training step (update the state: one "
                    f"power-iteration step) or an evaluation that reuses the training "
                    f"`mutable=[...]` list. Say it as for nn.BatchNorm: "
                    f"`use_running_average=False` for training, `True` for evaluation, as an "
                    f"attribute (Parametrize(..., use_running_average=not train)) or at call time "
                    f"(layer(x, use_running_average=not train))."
                )
            return False
        if flag or not _updates_state(tree):
            return False
        if not mutable:
            raise ValueError(
                f"{self._where()}: use_running_average=False (a training step) updates the state "
                f"in collection '{scol}', which is immutable in this call. Pass "
                f"mutable=['{scol}'] to apply (and keep the updated collection), or "
                f"use_running_average=True for evaluation."
            )
        return True

    @nn.nowrap
    def _holds_nodes(self) -> bool:
        """Whether the variables this wrapper selects from are registered already."""
        if self.scope is None:
            return False
        found = self.variables.get(self.collection, {})
        return bool(_nodes(found)) or bool(_groups(found)) or tie.has_ties(found)

    @nn.nowrap
    def _layout_error(self, at: str, found: str, made: str) -> ValueError:
        return ValueError(
            f"{self._where()} (layout={self.layout!r}): the variable at {at} {found}, so the "
            f"variables were created with {made}. Create them with this model's init, or give "
            f"the wrapper the layout they were created with."
        )

    @nn.nowrap
    def _check_not_arrays(self, raw: Any) -> None:
        """In the nodes layout, refuses variables created with layout='arrays'."""
        if _nodes(raw):
            return
        groups = _groups(raw)
        if groups:
            at = "/".join(map(str, next(iter(groups))))
            raise self._layout_error(
                repr(at),
                f"is a dict of plain arrays {sorted(groups[next(iter(groups))])}",
                "layout='arrays'",
            )

    @nn.nowrap
    def _rebuild(self, raw: Any) -> Any:
        """The arrays layout's collection with each stored group as a node again.

        The chain of each tensor comes from the rules, selected as registration selects them
        (paths relative to the wrapped module; a predicate sees a ``jax.ShapeDtypeStruct`` of
        the stored original, the value itself not being stored).
        """
        groups = _groups(raw)

        # Each group as one leaf, where registration saw the tensor.
        skeleton = jax.tree_util.tree_map(
            lambda x: _spec(x) if _is_group(x) else x, raw, is_leaf=_group_or_leaf
        )
        leaves = paths.leaves_with_paths(skeleton)
        chains: dict[tuple[Any, ...], list[Any]] = {}
        for where, p in normalize_rules(self.rules):
            try:
                hits = paths.select(skeleton, where)
            except ValueError as e:
                raise ValueError(
                    f"{self._where()} (paths are relative to it; layout='arrays'): {e}"
                ) from None
            for i in hits:
                path, leaf = leaves[i]
                keys = paths.path_keys(path)
                if keys in groups:
                    chains.setdefault(keys, []).append(p)
                elif is_node(leaf):
                    raise self._layout_error(
                        paths.format_path(path),
                        "is a paramx.Parametrized node",
                        "layout='nodes' (the default)",
                    )
                else:
                    raise ValueError(
                        f"{self._where()} (layout='arrays'): the rule on "
                        f"{paths.describe_where(where)} selects {paths.format_path(path)}, which "
                        f"holds a plain array, not the originals of a parametrized tensor "
                        f"({{'original': ...}}). The variables were not created by this model's "
                        f"init (the unwrapped model's, or an export): create them with it."
                    )
        nodes = {keys: self._node(keys, groups[keys], chain) for keys, chain in chains.items()}

        def put(path: Any, x: Any) -> Any:
            return nodes.get(paths.path_keys(path), x) if _is_group(x) else x

        return jax.tree_util.tree_map_with_path(put, raw, is_leaf=_group_or_leaf)

    @nn.nowrap
    def _node(self, keys: tuple[Any, ...], group: Mapping[str, Any], chain: list[Any]) -> Any:
        """One node from its stored dict, checked against what registration stores."""
        at = "/".join(map(str, keys))
        multi = "original" not in group
        n = sum(1 for k in group if isinstance(k, str) and _ORIGINAL.fullmatch(k))
        names = ("original",) if not multi else tuple(f"original{i}" for i in range(n))
        links = {str(i) for i in range(len(chain))}
        params = group.get(_PARAMS_KEY, {})
        extra = sorted(set(group) - set(names) - {_PARAMS_KEY}, key=str)
        missing = [k for k in names if k not in group]
        bad_params = (
            sorted(set(params) - links, key=str) if isinstance(params, Mapping) else [params]
        )
        if extra or missing or bad_params:
            raise ValueError(
                f"{self._where()} (layout='arrays'): the stored tensor at {at!r} has keys "
                f"{sorted(group, key=str)}"
                f"{f' (params for links {sorted(params, key=str)})' if params else ''}, but "
                f"registering its chain ({len(chain)} link(s)) stores {list(names)}, plus "
                f"'params' keyed by the position of each link with learnable arrays (one of "
                f"{sorted(links)}). The variables were created with other rules or another "
                f"layout; create them with this model's init."
            )
        boxed = [paths.unbox(group[k]) for k in names]
        box = next((b for b, _ in boxed if b is not None), None)
        originals = tuple(a for _, a in boxed)
        event_ndims = tuple(a.ndim - self.batch_axes for a in originals)
        node = Parametrized(
            originals,
            tuple(chain),
            dict(params),
            multi=multi,
            unsafe=self.unsafe,
            event_ndims=event_ndims,
        )
        return paths.rebox(box, node)

    @nn.nowrap
    def _run(self, fn: Callable[..., Any], at_call: bool | None, *args: Any, **kwargs: Any) -> Any:
        col, scol = self.collection, self.state_collection
        flag = self._flag(at_call)
        # Registration happens on the call that creates the variables; a later call (a shared
        # wrapper called again, a lifted transform tracing its body once more) finds nodes in
        # the variables and reads them as `apply` does.
        registering = self.is_initializing() and not self._holds_nodes()
        memo = self._memo
        arrays = self.layout == "arrays"
        seen: dict[str, Any] = {}

        def view(cols: dict) -> dict:
            raw = cols.get(col, {})
            state = cols.get(scol, {})
            seen["raw"] = raw
            leaves = tuple(jax.tree_util.tree_leaves(raw))
            if arrays:
                registered = self._rebuild(raw)
            else:
                self._check_not_arrays(raw)
                registered = raw
            tree = merge_state(registered, state)
            update = self._should_update(flag, tree)
            plain = memo.get(leaves, update)
            if plain is not None:
                seen["state"] = state
                return {**cols, col: plain, scol: {}}
            try:
                if update:
                    plain, new_state = materialize(tree, update_state=True)
                else:
                    plain, new_state = materialize(tree), state
            except (ValueError, TypeError) as e:
                if state:
                    raise
                raise type(e)(
                    f"{e}\n{self._where()}: the collection '{scol}' is empty here. Inside a "
                    f"lifted transform, list it next to '{col}': nn.scan(..., "
                    f"variable_broadcast=['{col}', '{scol}']) or variable_axes={{'{col}': 0, "
                    f"'{scol}': 0}}; nn.vmap(..., variable_axes={{'{col}': 0, '{scol}': 0}}). "
                    f"With model.apply, pass variables['{scol}'] with variables['{col}']."
                ) from e
            memo.put(leaves, update, plain)
            # The wrapped module sees plain arrays, and no state: a Parametrize inside it
            # finds its tensors computed already (this one ran their chains) and passes them on.
            seen["state"] = new_state
            return {**cols, col: plain, scol: {}}

        def unview(cols: dict) -> dict:
            out = dict(cols)
            if "raw" in seen:
                if col in out:
                    out[col] = seen["raw"]
                out[scol] = seen["state"]  # written back only where the collection is mutable
            elif col in out and registering:
                # Drawn after the wrapped module's initializers ran: their draws are the
                # ones the unwrapped module would make. A Parametrize inside the wrapped
                # module has registered its tensors already: their state is kept.
                held = out.get(scol) or {}
                tree = merge_state(out[col], held) if held else out[col]
                tree = _register(self, tree, self.make_rng("params"))
                registered, new_state = split_state(tree)
                out[col] = _as_arrays(registered, out[col]) if arrays else registered
                if new_state:
                    out[scol] = new_state
            return out

        mapped = nn.map_variables(fn, (col, scol), view, unview, init=registering, mutable=True)
        return mapped(self.module, *args, **kwargs)


# ----- model.tabulate ------------------------------------------------------------------------
def _represent_node(dumper: yaml.SafeDumper, node: Parametrized) -> yaml.Node:
    """A node as ``{chain: ..., original: float32[4,4], ...}`` in ``model.tabulate``'s table.

    Flax's table renders each variable collection with ``yaml.safe_dump``, after replacing
    every array leaf by its text (``float32[4,4]``); a node then holds those texts as its
    children. Flax offers no hook for pytree nodes of its own there, so paramx registers
    this representer for its own type only.
    """
    keyed, _ = node.tree_flatten_with_keys()
    shown: dict[str, Any] = {"chain": ", ".join(node.chain_names())}
    for key, child in keyed:
        shown[key.name] = child
    if node.batch_shape:
        shown["stack"] = list(node.batch_shape)
    return dumper.represent_dict(shown)


yaml.SafeDumper.add_representer(Parametrized, _represent_node)
yaml.SafeDumper.add_representer(  # a tied leaf in model.tabulate: the leaf it reads
    tie.Tied, lambda dumper, t: dumper.represent_dict({"tied": t.source})
)
