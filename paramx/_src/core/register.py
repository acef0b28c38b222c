"""`register_parametrization`: right_inverse as the initialization transform."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np

from paramx._src.core import chain as ch
from paramx._src.core import checks, paths, sharding
from paramx._src.core import parametrization as pz
from paramx._src.core.node import Parametrized, is_node

_DEFAULT_SEED = 0


def register_parametrization(
    tree: Any,
    where: paths.Where,
    parametrization: Any,
    *,
    unsafe: bool = False,
    key: jax.Array | None = None,
    batch_axes: int = 0,
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
      batch_axes: How many leading axes of each selected leaf index a stack of independent
        tensors (the layer axis of an ``nn.scan`` / ``nn.vmap`` stack). Each tensor of the stack
        is registered, initialized (with its own key) and later computed separately: a
        spectral norm normalizes each layer, not the whole stack. Leaves registered inside the
        scanned or vmapped module (``paramx.linen.Parametrize`` there) are stacks already and
        need nothing.

    Returns:
      The new tree.

    Raises:
      ValueError: On a missing path (the closest existing paths are listed), on a leaf that is
        not an array, on a ``right_inverse`` returning something other than a tensor or a
        sequence of tensors, or moving it to another device, and on a shape or dtype change
        without ``unsafe``. Errors raised by the parametrization itself name the path.
      TypeError: On a ``where`` or ``parametrization`` of the wrong type.

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
    _check_options(parametrization, unsafe, batch_axes)
    if key is None:
        key = jax.random.key(_DEFAULT_SEED)
    leaves = paths.leaves_with_paths(tree)
    replacements = {}
    for i in paths.select(tree, where):
        path, leaf = leaves[i]
        where_s = paths.format_path(path)
        leaf_key = jax.random.fold_in(key, zlib.crc32(where_s.encode()) & 0x7FFFFFFF)
        box, leaf = paths.unbox(leaf)
        node = _register_leaf(leaf, parametrization, unsafe, leaf_key, batch_axes, where_s)
        replacements[i] = paths.rebox(box, node)
    return paths.replace_leaves(tree, replacements)


def register_tensor(
    value: Any,
    parametrization: Any,
    *,
    unsafe: bool = False,
    key: jax.Array | None = None,
    batch_axes: int = 0,
    label: str = "<tensor>",
) -> Parametrized:
    """Registers a parametrization on one array (or appends to one node); returns the node.

    The per-tensor form of :func:`paramx.register_parametrization`, for code that holds one
    tensor rather than a tree (the NNX and linen integrations are built on it). The same
    checks run; errors name ``label`` where the tree form names the path.

    Args:
      value: An array, or a :class:`paramx.Parametrized` node to append to.
      parametrization: As for :func:`paramx.register_parametrization`.
      unsafe: As for :func:`paramx.register_parametrization`.
      key: PRNG key for parametrizations with ``init`` (used as given, not folded with a
        path). Defaults to a fixed key.
      batch_axes: Leading stack axes of ``value``.
      label: How errors name the tensor (``"Linear.kernel"``, say).

    Returns:
      The :class:`paramx.Parametrized` node.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> node = px.tensor.register(jnp.eye(2), px.Orthogonal())
      >>> node.chain_names()
      ['orthogonal']
      >>> px.tensor.materialize(node)
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """
    _check_options(parametrization, unsafe, batch_axes)
    if key is None:
        key = jax.random.key(_DEFAULT_SEED)
    box, leaf = paths.unbox(value)
    if box is not None:
        raise TypeError(
            f"register_tensor takes an array or a node; {label} is a Flax metadata box "
            f"({type(box).__name__}). Pass its value, or use paramx.register_parametrization on "
            f"the tree, which keeps the box."
        )
    return _register_leaf(leaf, parametrization, unsafe, key, batch_axes, label)


def check_input(p: Any, leaf: Any, where: str, batch_axes: int = 0) -> None:
    """The link's declared ``check_value`` on what it will be registered on (the leaf, or a
    node's current value when appending), run eagerly on concrete values; ``batch_axes`` is the
    leaf's (a node's own stack axes when appending)."""
    if not callable(getattr(p, "check_value", None)):
        return
    if is_node(leaf):
        value, batch_axes = ch.node_value(leaf, where=where)[0], ch.stack_axes(leaf, where)
    else:
        value = leaf
    checks.check_value(p, value, where, batch_axes)


def _check_options(parametrization: Any, unsafe: Any, batch_axes: Any) -> None:
    pz.check_parametrization(parametrization)
    if isinstance(unsafe, bool) is False:
        raise TypeError(f"`unsafe` must be a bool; got {type(unsafe).__name__}: {unsafe!r}.")
    if isinstance(batch_axes, bool) or not isinstance(batch_axes, int) or batch_axes < 0:
        raise ValueError(
            f"`batch_axes` must be a non-negative int (the number of leading stack axes); got "
            f"{batch_axes!r}."
        )


def _register_leaf(
    leaf: Any, p: Any, unsafe: bool, key: jax.Array, batch_axes: int, where: str
) -> Parametrized:
    check_input(p, leaf, where, batch_axes)
    step = _append if is_node(leaf) else _first
    # Under explicit sharding, QR and friends only type-check in auto mode (a no-op
    # otherwise); the new node's arrays keep their inputs' shardings.
    work = functools.partial(step, p=p, unsafe=unsafe, key=key, where=where, batch_axes=batch_axes)
    with checks.at_path(where):
        node: Parametrized = sharding.run_auto(work, leaf)
    return node


def _init(p: Any, value: Any, key: jax.Array, *, where: str) -> tuple[Any, Any]:
    """Runs ``init`` of a link that has one; returns its (params, state), ``None`` if absent."""
    init = pz.init_fn(p)
    if init is None:
        return None, None
    out = init(value, key)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"`init` of parametrization {pz.display_name(p)} must return a pair (params, state); "
            f"either may be None. Got {checks.type_name(out)}. (at {where})"
        )
    return out


def _check_forward(out: Any, value: Any, where: str) -> None:
    checks.check_same(
        out,
        value,
        producer="A parametrization",
        what="Registering a parametrization",
        where=where,
        hint="Make `forward` keep the tensor's shape and dtype, or pass `unsafe=True`.",
    )


def is_concrete(tree: Any) -> bool:
    """Whether every array of ``tree`` holds a value (no tracer, no ShapeDtypeStruct)."""
    return all(
        not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))
        for x in jax.tree_util.tree_leaves(tree)
    )


def shape_of(fn: Any, *args: Any) -> Any:
    """``jax.eval_shape(fn, *args)``; when ``fn`` needs concrete values (ordinary Python
    validation such as ``if not jnp.allclose(w, w.T): raise``) and the arguments are concrete,
    ``fn(*args)`` itself, as torch runs it."""
    try:
        return jax.eval_shape(fn, *args)
    except checks.NEEDS_CONCRETE:
        if not is_concrete(args):
            raise
        return fn(*args)


def _check_devices(new: Any, value: Any, where: str) -> None:
    """torch refuses a right_inverse that moves the tensor to another device; so does paramx."""
    if not (isinstance(value, jax.Array) and is_concrete(value)):
        return
    want = value.sharding.device_set
    for x in jax.tree_util.tree_leaves(new):
        if isinstance(x, jax.Array) and is_concrete(x) and x.sharding.device_set != want:
            raise ValueError(
                f"`right_inverse` may not change the device of the tensor (this holds even with "
                f"`unsafe=True`). At {where}: the tensor is on {sorted(map(str, want))}, "
                f"`right_inverse` returned an array on {sorted(map(str, x.sharding.device_set))}."
                f" Move arrays inside `forward` instead, or move the tree before registering."
            )


def _check_batch_axes(value: Any, batch_axes: int, where: str) -> None:
    if batch_axes > value.ndim:
        raise ValueError(
            f"`batch_axes={batch_axes}` asks for more stack axes than the tensor at {where} has "
            f"({checks.describe(value)})."
        )


def _first(
    leaf: Any, p: Any, *, unsafe: bool, key: jax.Array, where: str, batch_axes: int
) -> Parametrized:
    if not checks.is_array(leaf):
        raise ValueError(
            f"The leaf at {where} is a {checks.type_name(leaf)}, not an array; only arrays can be "
            f"parametrized."
        )
    value = jax.numpy.asarray(leaf)
    _check_batch_axes(value, batch_axes, where)

    def one(value: Any, key: jax.Array) -> Parametrized:
        p_init, s_init = _init(p, value, key, where=where)
        params = {} if p_init is None else {"0": p_init}
        state = {} if s_init is None else {"0": s_init}
        try:
            new, state = ch.link_right_inverse(p, 0, value, params, state)
        except (ch.NoRightInverse, NotImplementedError):
            new = value  # torch: a missing or unimplemented right_inverse is the identity here
        originals, multi = checks.as_originals(new, value, where=where)
        _check_devices(originals, value, where)
        return Parametrized(originals, (p,), params, state, multi=multi, unsafe=unsafe)

    node = _per_tensor(one, value, key, batch_axes)
    if not unsafe:
        out = shape_of(lambda n: ch.node_value(n, where=where)[0], node)
        _check_forward(out, value, where)
    return node


def _per_tensor(
    one: Callable[[Any, jax.Array], Parametrized], value: Any, key: jax.Array, batch_axes: int
) -> Parametrized:
    """``one(value, key)``, or, for a stack, ``one`` on each tensor with its own key.

    A stack is mapped with ``jax.vmap``; a parametrization whose ``right_inverse`` or ``init``
    needs concrete values is run tensor by tensor and the results stacked.
    """
    if batch_axes == 0:
        return one(value, key)
    batch = value.shape[:batch_axes]
    keys = jax.random.split(key, batch)
    try:
        return cast(Parametrized, ch.per_tensor(one, batch_axes)(value, keys))
    except checks.NEEDS_CONCRETE:
        if not is_concrete(value):
            raise
    nodes = [one(value[idx], keys[idx]) for idx in np.ndindex(*batch)]
    flat: list[tuple[list[Any], Any]] = [jax.tree_util.tree_flatten(n) for n in nodes]
    treedef = flat[0][1]
    if any(t != treedef for _, t in flat):
        raise ValueError(
            "The tensors of the stack were registered with different structures (different "
            "numbers of originals or different state); a stack needs one structure for all."
        )
    stacked = [
        jax.numpy.stack(xs).reshape(*batch, *np.shape(xs[0]))
        for xs in zip(*(leaves for leaves, _ in flat))
    ]
    return cast(Parametrized, jax.tree_util.tree_unflatten(treedef, stacked))


def _append(
    node: Parametrized, p: Any, *, unsafe: bool, key: jax.Array, where: str, batch_axes: int
) -> Parametrized:
    n_stack = ch.stack_axes(node, where)
    if batch_axes not in (0, n_stack):
        raise ValueError(
            f"The tensor at {where} is already parametrized as a stack of {n_stack} leading "
            f"axes; `batch_axes={batch_axes}` does not match. Leave `batch_axes` out when "
            f"appending: the stack axes are the registered tensor's."
        )
    i = len(node.chain)
    needs_value = pz.has_arrays(p) or not unsafe
    current = ch.node_value(node, where=where)[0] if needs_value else None

    new_params, new_state = dict(node.params), dict(node.state)
    if pz.init_fn(p) is not None:

        def init_one(value: Any, key: jax.Array) -> tuple[Any, Any]:
            return _init(p, value, key, where=where)

        if n_stack:
            assert current is not None  # an `init` needs the value
            keys = jax.random.split(key, current.shape[:n_stack])
            p_init, s_init = ch.per_tensor(init_one, n_stack)(current, keys)
        else:
            p_init, s_init = init_one(current, key)
        if p_init is not None:
            new_params[str(i)] = p_init
        if s_init is not None:
            new_state[str(i)] = s_init
    new = node.replace(
        chain=(*node.chain, p), params=new_params, state=new_state, unsafe=node.unsafe or unsafe
    )
    if not unsafe:
        _check_appended(current, n_stack, new, p, i, where)
    return new


def _check_appended(
    current: Any, n_stack: int, new: Parametrized, p: Any, i: int, where: str
) -> None:
    """torch's checks on an appended link: forward and right_inverse keep shape and dtype.

    Run on one tensor of a stack, abstractly, or concretely when the link needs values.
    """

    def first(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: x[(0,) * n_stack], tree)

    y = first(current) if n_stack else current
    kw = ch.link_kwargs(new.params, new.state, i, p)
    kw = first(kw) if n_stack else kw
    try:
        x = shape_of(lambda v, kw: pz.forward_fn(p)(v, **kw), y, kw)
    except TypeError as e:
        raise ValueError(
            f"Parametrization {pz.display_name(p)} cannot be appended to the chain at "
            f"{where}: calling its forward on the tensor's current value failed ({e}). A "
            f"parametrization appended to a chain receives one tensor; only the first "
            f"parametrization of a chain may take several originals (as in torch). Register "
            f"it first, or on a plain leaf."
        ) from e
    _check_forward(x, y, where)
    params_i = first(new.params) if n_stack else new.params
    state_i = first(new.state) if n_stack else new.state

    def inverse(v: Any, s: Any) -> Any:
        return ch.link_right_inverse(p, i, v, params_i, s)[0]

    try:
        try:
            z = jax.eval_shape(inverse, x, state_i)
        except checks.NEEDS_CONCRETE:
            if not is_concrete((y, kw, state_i)):
                raise
            # torch runs right_inverse on the concrete value of forward; so does paramx when
            # the right_inverse is ordinary Python validation.
            z = inverse(pz.forward_fn(p)(y, **kw), state_i)
    except (ch.NoRightInverse, NotImplementedError):
        return
    what = "parametrization.right_inverse"
    hint = "A parametrization appended to a chain must map values back to one tensor."
    checks.check_same(z, y, producer=what, what=what, where=where, hint=hint)
