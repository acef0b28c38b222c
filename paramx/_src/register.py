"""`register_parametrization`: right_inverse as the initialization transform."""

from __future__ import annotations

import functools
import zlib
from typing import Any

import jax

from paramx._src import chain as ch
from paramx._src import parametrization as pz
from paramx._src import paths
from paramx._src.node import Parametrized, is_node

_DEFAULT_SEED = 0


def register_parametrization(
    tree: Any,
    where: paths.Where,
    parametrization: Any,
    *,
    unsafe: bool = False,
    key: jax.Array | None = None,
) -> Any:
    """Registers a parametrization on one or more leaves; returns a new tree.

    Works on what ``model.init`` returns (the full variables dict, or its ``'params'``) and on
    any other pytree. The selected leaf is replaced by a :class:`paramx.Parametrized` node
    holding the raw originals, computed by running ``right_inverse`` on the leaf's value, so
    :func:`paramx.materialize` gives back the registered value. ``tree`` is not modified, also
    when an error is raised.

    Registering on a tensor that is already parametrized appends to its chain, as in
    PyTorch: the originals are not re-initialized, and the new link's ``forward`` and
    ``right_inverse`` are checked to keep shape and dtype unless ``unsafe``.

    Args:
      tree: The pytree to register on.
      where: A ``/``-joined path (``"params/Dense_0/kernel"``), a tuple of keys, or a predicate
        ``(key_path, leaf) -> bool`` selecting several leaves at once.
      parametrization: A :class:`paramx.Parametrization`, an object with ``forward`` (and
        optionally ``right_inverse``, ``init``, ``update_state``), or a plain function.
      unsafe: Skip the checks that ``forward`` keeps the tensor's shape and dtype. The check
        that a single-tensor ``right_inverse`` keeps the dtype runs regardless, as in torch.
      key: PRNG key for parametrizations with ``init`` (e.g. spectral norm's random start).
        Each selected leaf gets its own key folded from its path. Defaults to a fixed key, so
        registration is reproducible.

    Returns:
      The new tree.

    Raises:
      ValueError: On a missing path (the closest existing paths are listed), on a leaf that is
        not an array, on a ``right_inverse`` returning something other than a tensor or a
        sequence of tensors, and on a shape or dtype change without ``unsafe``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> def symmetric(x):
      ...     return jnp.triu(x) + jnp.triu(x, 1).T
      >>> params = {"Dense_0": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}}
      >>> params = px.register_parametrization(params, "Dense_0/kernel", symmetric)
      >>> px.is_parametrized(params, "Dense_0/kernel")
      True
      >>> is_kernel = lambda path, leaf: px.path_keys(path)[-1] == "kernel"
      >>> params = px.register_parametrization(params, is_kernel, jnp.tanh)
      >>> params["Dense_0"]["kernel"].chain_names()
      ['symmetric', 'tanh']
    """
    pz.check_parametrization(parametrization)
    if key is None:
        key = jax.random.key(_DEFAULT_SEED)
    leaves = paths.leaves_with_paths(tree)
    replacements = {}
    for i in paths.select(tree, where):
        path, leaf = leaves[i]
        where_s = paths.format_path(path)
        leaf_key = jax.random.fold_in(key, zlib.crc32(where_s.encode()) & 0x7FFFFFFF)
        step = _append if is_node(leaf) else _first
        # Under explicit sharding, QR and friends only type-check in auto mode (a no-op
        # otherwise); the new node's arrays keep their inputs' shardings.
        work = functools.partial(
            step, p=parametrization, unsafe=unsafe, key=leaf_key, where=where_s
        )
        replacements[i] = ch.run_auto(work, leaf)
    return paths.replace_leaves(tree, replacements)


def _init(p: Any, value: Any, key: jax.Array, *, where: str) -> tuple[Any, Any]:
    """Runs ``init`` of a link that has one; returns its (params, state), ``None`` if absent."""
    init = pz.init_fn(p)
    if init is None:
        return None, None
    out = init(value, key)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"`init` of parametrization {pz.display_name(p)} must return a pair (params, state); "
            f"either may be None. Got {ch.type_name(out)}. (at {where})"
        )
    return out


def _check_forward(out: Any, value: Any, where: str) -> None:
    ch.check_same(
        out,
        value,
        producer="A parametrization",
        what="Registering a parametrization",
        where=where,
        hint="Make `forward` keep the tensor's shape and dtype, or pass `unsafe=True`.",
    )


def _first(leaf: Any, p: Any, *, unsafe: bool, key: jax.Array, where: str) -> Parametrized:
    if not ch.is_array(leaf):
        raise ValueError(
            f"The leaf at {where} is a {ch.type_name(leaf)}, not an array; only arrays can be "
            f"parametrized."
        )
    value = jax.numpy.asarray(leaf)
    p_init, s_init = _init(p, value, key, where=where)
    params = {} if p_init is None else {"0": p_init}
    state = {} if s_init is None else {"0": s_init}
    try:
        new, state = ch.link_right_inverse(p, 0, value, params, state)
    except (ch.NoRightInverse, NotImplementedError):
        new = value  # torch: a missing or unimplemented right_inverse is the identity here
    originals, multi = ch.as_originals(new, value, where=where)
    node = Parametrized(originals, (p,), params, state, multi=multi, unsafe=unsafe)
    if not unsafe:
        out = jax.eval_shape(lambda n: ch.node_value(n)[0], node)
        _check_forward(out, value, where)
    return node


def _append(
    node: Parametrized, p: Any, *, unsafe: bool, key: jax.Array, where: str
) -> Parametrized:
    i = len(node.chain)
    needs_value = pz.has_arrays(p) or not unsafe
    current = ch.node_value(node)[0] if needs_value else None
    p_init, s_init = _init(p, current, key, where=where)
    new_params, new_state = dict(node.params), dict(node.state)
    if p_init is not None:
        new_params[str(i)] = p_init
    if s_init is not None:
        new_state[str(i)] = s_init
    if not unsafe:
        y = ch.abstract(current)
        kw = ch.link_kwargs(new_params, new_state, i, p)
        try:
            x = jax.eval_shape(lambda v, kw: pz.forward_fn(p)(v, **kw), y, kw)
        except TypeError as e:
            raise ValueError(
                f"Parametrization {pz.display_name(p)} cannot be appended to the chain at "
                f"{where}: calling its forward on the tensor's current value failed ({e}). A "
                f"parametrization appended to a chain receives one tensor; only the first "
                f"parametrization of a chain may take several originals (as in torch). Register "
                f"it first, or on a plain leaf."
            ) from e
        _check_forward(x, y, where)
        try:
            z = jax.eval_shape(
                lambda v, s: ch.link_right_inverse(p, i, v, new_params, s)[0], x, new_state
            )
        except (ch.NoRightInverse, NotImplementedError):
            z = None
        if z is not None:
            what = "parametrization.right_inverse"
            hint = "A parametrization appended to a chain must map values back to one tensor."
            ch.check_same(z, y, producer=what, what=what, where=where, hint=hint)
    return node.replace(
        chain=(*node.chain, p), params=new_params, state=new_state, unsafe=node.unsafe or unsafe
    )
