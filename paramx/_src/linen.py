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
reads a parameter or is called; state is updated only when its collection is mutable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from paramx._src import paths
from paramx._src.materialize import materialize
from paramx._src.node import is_node
from paramx._src.register import register_parametrization
from paramx._src.state import merge_state

_STATE_COLLECTION = "paramx_state"


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
    out = []
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


def state_of(tree: Any) -> dict:
    """The state collection for a registered params tree: each node's state at its path."""
    out: dict = {}
    for path, leaf in paths.leaves_with_paths(tree):
        if is_node(leaf) and leaf.state:
            _nested_set(out, paths.path_keys(path), dict(leaf.state))
    return out


def with_state(tree: Any, state: Any) -> Any:
    """Puts a state collection (as :func:`state_of` builds it) back into the nodes."""

    def put(path: Any, leaf: Any) -> Any:
        if not is_node(leaf):
            return leaf
        found = _nested_get(state, paths.path_keys(path)) if state else None
        return leaf.replace(state=dict(found) if found else {})

    return jax.tree_util.tree_map_with_path(put, tree, is_leaf=is_node)


def strip_state(tree: Any) -> Any:
    """The params collection for a registered tree: nodes without their state."""
    return jax.tree_util.tree_map(
        lambda x: x.replace(state={}) if is_node(x) else x, tree, is_leaf=is_node
    )


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
    - State lives in ``state_collection`` and is updated (one power-iteration step, say)
      only when that collection is mutable: ``model.apply(variables, x,
      mutable=["paramx_state"])`` is a training step, a plain ``apply`` is evaluation. Set
      ``update_state=False`` to never update it, ``True`` to require it.

    Put the wrapper outside an ``nn.scan`` (wrap the scanned module) to compute the
    parametrization once per sequence; a wrapper inside the scanned cell runs every step.

    Attributes:
      module: The linen module to wrap (unbound, as in any module definition).
      rules: ``{where: parametrization}``, or a sequence of ``(where, parametrization)``
        pairs (the same ``where`` twice chains); a list of parametrizations as a value is a
        chain. ``where`` is a path relative to the wrapped module (``"kernel"``,
        ``"Dense_0/kernel"``), a tuple of keys, or a predicate over key paths.
      state_collection: Collection holding the parametrizations' state.
      update_state: ``None`` (default): update state when ``state_collection`` is mutable.
        ``False``: never. ``True``: always, and raise if the collection is immutable.
      unsafe: Passed to :func:`paramx.register_parametrization`.
      collection: The collection whose variables the rules select (``'params'``).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import paramx as px
      >>> layer = px.linen.Parametrize(nn.Dense(3), {"kernel": px.Orthogonal()})
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> variables["params"]["kernel"].chain_names()
      ['orthogonal']
      >>> w = px.materialize(variables["params"], variables["paramx_state"])["kernel"]
      >>> bool(jnp.allclose(w.T @ w, jnp.eye(3), atol=1e-5))
      True
      >>> y = layer.apply(variables, jnp.ones((1, 3)))
      >>> y.shape
      (1, 3)
    """

    module: nn.Module
    rules: Any
    state_collection: str = _STATE_COLLECTION
    update_state: bool | None = None
    unsafe: bool = False
    collection: str = "params"

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped module with the parametrized variables."""
        return self._run(lambda module, *a, **k: module(*a, **k), *args, **kwargs)

    def _should_update(self) -> bool:
        if self.is_initializing() or self.update_state is False:
            return False
        mutable = self.is_mutable_collection(self.state_collection)
        if self.update_state and not mutable:
            raise ValueError(
                f"Parametrize(update_state=True) updates the state in collection "
                f"'{self.state_collection}', which is immutable in this call. Pass "
                f"mutable=['{self.state_collection}'] to apply, or set update_state=None to "
                f"update only when it is mutable."
            )
        return mutable

    def _register(self, plain: Any, key: jax.Array) -> Any:
        tree = plain
        for where, p in normalize_rules(self.rules):
            try:
                tree = register_parametrization(tree, where, p, unsafe=self.unsafe, key=key)
            except ValueError as e:
                raise ValueError(
                    f"paramx.linen.Parametrize around {type(self.module).__name__} "
                    f"(paths are relative to it): {e}"
                ) from None
        return tree

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        col, scol = self.collection, self.state_collection
        # Within one `init`, only the wrapper's first call creates and registers variables;
        # later calls find them registered and read them like `apply` does.
        initializing = self.is_initializing() and not getattr(self, "_paramx_registered", False)
        update = self._should_update()
        seen: dict[str, Any] = {}

        def view(cols: dict) -> dict:
            raw = cols.get(col, {})
            state = cols.get(scol, {})
            leaves = jax.tree_util.tree_leaves(raw)
            cache = getattr(self, "_paramx_cache", None)
            if cache is not None and len(cache[0]) == len(leaves):
                if all(a is b for a, b in zip(cache[0], leaves)):
                    seen["raw"] = raw
                    return {**cols, col: cache[1], scol: state}
            tree = with_state(raw, state)
            if update:
                plain, half = materialize(tree, update_state=True)
                new_state = state_of(merge_state(tree, half))
            else:
                plain, new_state = materialize(tree), state
            object.__setattr__(self, "_paramx_cache", (leaves, plain))
            seen["raw"] = raw
            return {**cols, col: plain, scol: new_state}

        def unview(cols: dict) -> dict:
            out = dict(cols)
            if col in out:
                if "raw" in seen:
                    out[col] = seen["raw"]
                elif initializing:
                    # Drawn after the wrapped module's initializers ran: their draws are the
                    # ones the unwrapped module would make.
                    tree = self._register(out[col], self.make_rng("params"))
                    out[col] = strip_state(tree)
                    registered = state_of(tree)
                    if registered:
                        out[scol] = registered
            return out

        mapped = nn.map_variables(fn, (col, scol), view, unview, init=initializing, mutable=True)
        out = mapped(self.module, *args, **kwargs)
        if initializing:
            object.__setattr__(self, "_paramx_registered", True)
        return out
