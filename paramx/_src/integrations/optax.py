"""Labels and masks for optax, read off what is registered: `param_labels`, `param_mask`.

Every array of a registered tree has one of four roles:

* ``"original"``: a raw original of a parametrized tensor (``...['kernel'].original``, or
  ``.original0``, ``.original1``, ...);
* ``"parametrization"``: a learnable array owned by a parametrization
  (``...['kernel'].params['<i>']``);
* ``"plain"``: every other leaf (biases, unregistered kernels, ...);
* ``"state"``: a parametrization's non-trainable state (``...['kernel'].state['<i>']``). The
  trainable half from :func:`paramx.split_state` has none, and that half is what the optimizer
  should see.

The helpers return a tree with exactly the structure of their input, ``Parametrized`` nodes
included, with a label (or a bool) in place of each array. That is the structure
``optax.multi_transform`` (``optax.partition``) and ``optax.masked`` expect, so the trees can be
given to them as they are, built once outside ``jit`` or computed from the params by optax.

A tree that still holds state (not split) gets the label ``"state"`` on its state arrays, so
``optax.multi_transform`` refuses it. Such a tree cannot be trained anyway: paramx refuses to
differentiate state (an optimizer's weight decay would shrink it), so give the optimizer the
trainable half from :func:`paramx.split_state`. :func:`param_mask` leaves state out of the mask
by default.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax

from paramx._src.core.node import Parametrized, is_node
from paramx._src.core.paths import format_path, path_keys
from paramx._src.core.table import ROLES, label_node, plain_array_role, state_collections

DEFAULT_LABELS: dict[str, str] = {role: role for role in ROLES}

Labels = (
    Mapping[str, Hashable]
    | Callable[[tuple[Any, ...], Any], Hashable | Mapping[str, Hashable] | None]
    | None
)


def param_labels(tree: Any, labels: Labels = None) -> Any:
    """A tree of labels, one per array, from what is registered; for ``optax.multi_transform``.

    The result has the structure of ``tree``: each ``Parametrized`` node stays a node whose
    originals, ``params`` and ``state`` hold labels. Give it (or this function itself) as the
    ``param_labels`` of ``optax.multi_transform``. It works on the trainable half from
    :func:`paramx.split_state`, on a full registered tree, on a Flax variables dict
    (``{'params': ...}``) and on its gradients or updates, which share that structure. It only
    reads the tree's structure, so it also works under ``jax.jit``.

    Args:
      tree: A registered tree (or any pytree; a tree without registrations is all ``"plain"``).
      labels: What to call each role. ``None`` uses the role names: ``"original"``,
        ``"parametrization"``, ``"plain"`` and ``"state"``. A dict overrides some of them,
        e.g. ``{"original": "raw"}``. A callable ``labels(key_path, leaf)`` decides per leaf of
        the registered tree, where a parametrized tensor is one leaf (its ``Parametrized`` node,
        as for selectors in :func:`paramx.register_parametrization`). It returns ``None`` (the
        defaults), a label (for a plain leaf; for a node, for its originals and ``params``,
        while its state keeps the state label), or a dict overriding roles for this leaf. For a
        node with several originals, that dict may also name ``"original0"``,
        ``"original1"``, ... to label them separately.

    Returns:
      The tree of labels.

    Raises:
      ValueError: If a dict names something other than a role (or, for a node, one of its
        originals), naming the leaf and the accepted keys.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import paramx as px
      >>> params = {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}
      >>> params = px.orthogonal(params, "kernel")
      >>> params, state = px.split_state(params)
      >>> labels = px.param_labels(params)
      >>> labels["bias"], labels["kernel"]
      ('plain', Parametrized(chain=[orthogonal], original='original'))
      >>> tx = optax.multi_transform(
      ...     {"original": optax.set_to_zero(), "plain": optax.sgd(0.1)}, px.param_labels)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["bias"], updates["kernel"].original
      (Array([-0.1, -0.1], dtype=float32), Array([[0., 0.],
             [0., 0.]], dtype=float32))
    """
    if labels is None or isinstance(labels, Mapping):
        names = _with_overrides(DEFAULT_LABELS, labels or {}, ROLES, where="`labels`")
        decide = None
    elif callable(labels):
        names, decide = DEFAULT_LABELS, labels
    else:
        raise TypeError(
            f"`labels` must be None, a dict from roles {_roles()} to labels, or a callable "
            f"(key_path, leaf) -> label | dict | None. Got {type(labels).__name__}."
        )

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    held = state_collections(tree)
    out = []
    for path, leaf in leaves:
        here = names
        if decide is not None:
            here = _decided(decide(path, leaf), names, path, leaf)
        # An array outside a node may still have a role: paramx.nnx's layout keeps originals
        # and state as plain arrays (`.../parametrizations/kernel/original`), and a linen
        # variables dict keeps state in its own collection.
        role = "plain" if is_node(leaf) else plain_array_role(path_keys(path), held)
        out.append(_label_leaf(leaf, here, role))
    return jax.tree_util.tree_unflatten(treedef, out)


def param_mask(
    tree: Any,
    *,
    original: bool = True,
    parametrization: bool = True,
    plain: bool = True,
    state: bool = False,
) -> Any:
    """A tree of bools, one per array, chosen by role; for ``optax.masked`` and ``mask=``.

    The roles are those of :func:`param_labels`. The result has the structure of ``tree``
    (``Parametrized`` nodes included), which is what ``optax.masked`` and the ``mask`` argument
    of optax's optimizers (``optax.adamw(..., mask=...)``) expect. Build it once from the
    params, or pass ``functools.partial(px.param_mask, original=False)`` and let optax call it.

    Args:
      tree: A registered tree, its trainable half, a Flax variables dict, or their gradients.
      original: Value for the raw originals of parametrized tensors.
      parametrization: Value for the parametrizations' own learnable arrays.
      plain: Value for every other leaf.
      state: Value for state arrays. These are only present in a tree that was not split
        with :func:`paramx.split_state`; the default keeps them out of what the mask
        selects (so weight decay, say, never reaches them).

    Returns:
      The tree of bools.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import paramx as px
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]]), "bias": jnp.ones(2)}
      >>> params = px.weight_norm(params, "kernel")
      >>> mask = px.param_mask(params, original=False)
      >>> mask
      {'bias': True, 'kernel': Parametrized(chain=[weight_norm], original0=False, original1=False)}
      >>> tx = optax.adamw(0.1, weight_decay=0.5, mask=mask)  # no decay on g and v
      >>> updates, _ = tx.update(params, tx.init(params), params)
    """
    chosen = {"original": original, "parametrization": parametrization, "plain": plain}
    chosen["state"] = state
    return param_labels(tree, {role: bool(chosen[role]) for role in ROLES})


# ----- helpers -------------------------------------------------------------------------------


def _roles(extra: tuple[str, ...] = ()) -> str:
    return ", ".join(repr(r) for r in (*ROLES, *extra))


def _with_overrides(
    base: Mapping[str, Any], overrides: Mapping[str, Any], allowed: tuple[str, ...], where: str
) -> dict[str, Any]:
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ValueError(
            f"{where} names {', '.join(repr(k) for k in unknown)}, which is not a role. The keys "
            f"can be {', '.join(repr(a) for a in allowed)}."
        )
    return {**base, **overrides}


def _decided(out: Any, names: Mapping[str, Any], path: Any, leaf: Any) -> dict[str, Any]:
    """The role -> label table for one leaf, from what the user's callable returned."""
    if out is None:
        return dict(names)
    if isinstance(out, Mapping):
        extra = tuple(leaf.original_names) if is_node(leaf) and leaf.multi else ()
        return _with_overrides(
            names,
            out,
            (*ROLES, *extra),
            where=f"The dict that `labels` returned for {format_path(path)}",
        )
    table = dict(names)
    table.update(original=out, parametrization=out, plain=out)
    return table


def _label_leaf(leaf: Any, names: Mapping[str, Any], role: str = "plain") -> Any:
    if not is_node(leaf):
        return names[role]
    node: Parametrized = leaf
    return label_node(node, names)  # the roles are the core's (paramx.table reads them too)
