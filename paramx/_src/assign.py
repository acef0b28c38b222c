"""`assign`: torch's ``module.weight = value``, through the right_inverse chain."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp

from paramx._src import chain as ch
from paramx._src import parametrization as pz
from paramx._src import paths


def assign(tree: Any, where: paths.Where, value: Any) -> Any:
    """Sets a parametrized tensor to ``value``; returns a new tree.

    Runs every link's ``right_inverse`` in reverse order, as torch does on
    ``module.weight = value``, and stores the resulting originals (and any state a
    ``right_inverse`` returns, e.g. a new orthogonal base). The parametrizations' own
    learnable arrays are kept. Unless the tensor was registered with ``unsafe=True``, the
    originals must keep their shapes (torch does not check this; a silent shape change would
    break optimizer state), and they always keep their dtypes, as in torch.

    Args:
      tree: A registered tree.
      where: The path of one parametrized tensor (a string or a tuple of keys), or a
        predicate selecting several; each gets the same value.
      value: The new value of the tensor.

    Returns:
      The new tree.

    Raises:
      RuntimeError: If a link has no ``right_inverse``. A ``NotImplementedError`` raised by a
        ``right_inverse`` reaches you unchanged.
      ValueError: If the tensor is not parametrized, if ``value`` has the wrong shape or dtype,
        or if the chain returns something of the wrong type, length or dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> positive = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log)
      >>> tree = px.register_parametrization({"s": jnp.ones(2)}, "s", positive)
      >>> tree = px.assign(tree, "s", jnp.array([2.0, 3.0]))
      >>> px.materialize(tree)["s"]
      Array([2., 3.], dtype=float32)
    """
    if not ch.is_array(value):
        raise ValueError(f"Can only assign an array; got {ch.type_name(value)}.")
    value = jnp.asarray(value)
    replacements = {}
    for i, where_s, node in paths.select_parametrized(
        tree, where, doing="there is no right_inverse to run (replace the leaf directly)"
    ):
        replacements[i] = ch.run_auto(functools.partial(_assign_one, where_s=where_s), node, value)
    return paths.replace_leaves(tree, replacements)


def _assign_one(node: Any, value: Any, *, where_s: str) -> Any:
    state = dict(node.state)
    x: Any = value
    for k in reversed(range(len(node.chain))):
        p = node.chain[k]
        try:
            x, state = ch.link_right_inverse(p, k, x, node.params, state)
        except ch.NoRightInverse:
            raise RuntimeError(
                f"parametrization {pz.display_name(p)} does not implement right_inverse, so "
                f"a value cannot be assigned to {where_s}. Give it a `right_inverse`, or "
                f"remove the parametrizations and register them again on the new value."
            ) from None
    originals = ch.check_assigned(x, node, where=where_s)
    if not node.unsafe:
        for k, (new, old) in enumerate(zip(originals, node.originals)):
            if new.shape != old.shape:
                name = f"original{k}" if node.multi else "original"
                raise ValueError(
                    f"Assigning a value may not change the shape of `{name}` unless the tensor "
                    f"was registered with `unsafe=True`. At {where_s}: `{name}` is "
                    f"{ch.describe(old)}, the assigned value {ch.describe(value)} gives "
                    f"{ch.describe(new)}. Pass a value of the tensor's shape."
                )
    return node.replace(originals=originals, state=state)
