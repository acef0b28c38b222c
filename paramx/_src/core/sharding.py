"""Keeping parametrized values on their originals' devices.

Sharding. JAX's own sharding is the distributed engine; paramx adds no collective of its own
(except spectral norm's optional ``axis_name``). Two cases:

* Explicit sharding (``jax.make_mesh``'s default axis types in this JAX): the sharding is part
  of each array's type, also under ``jit``. A parametrized tensor whose arrays are sharded
  along explicit mesh axes has its chain run in auto mode over those axes
  (``jax.sharding.auto_axes``), where the compiler may lay out a QR or a matrix exponential as
  it likes, and its value comes out with the sharding of its original of the same shape
  (replicated if there is none); new state keeps the sharding of the old. The gradients of the
  originals have the originals' shardings by type. Without this, elementwise ops between
  differently sharded operands (``A - A^T`` in ``orthogonal``) fail to type-check.
* Auto sharding (GSPMD, the default of ``jax.sharding.Mesh``): under ``jit`` a tracer carries
  no sharding, and XLA's propagation does not keep the originals' shardings through QR- or
  exponential-based maps (they come out replicated or sharded otherwise). Pass
  ``shardings=`` (the shardings of the tree you pass, e.g.
  ``jax.tree.map(lambda x: x.sharding, params)`` taken outside ``jit``) and paramx constrains
  each value to its original's sharding and each original to its own, which also makes the
  gradients come back sharded like the originals. :func:`paramx.precompute` does this for trees
  whose arrays span several devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from paramx._src.core import chain as ch
from paramx._src.core import checks
from paramx._src.core.node import Parametrized, is_node


def explicit_axes(tree: Any) -> tuple[Any, tuple[str, ...]]:
    """The mesh, and the explicit mesh axes, along which some array of ``tree`` is sharded.

    With explicit sharding the sharding is part of an array's type (``jax.typeof(x).sharding``),
    also under ``jit``. Returns ``(None, ())`` when no array is sharded along an explicit axis.
    """
    mesh: Any = None
    used: list[str] = []
    for x in jax.tree_util.tree_leaves(tree):
        try:
            s = jax.typeof(x).sharding
        except TypeError:
            continue
        m = getattr(s, "mesh", None)
        if m is None or m.empty or not m.explicit_axes:
            continue
        for entry in s.spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            used.extend(n for n in names if n in m.explicit_axes and n not in used)
        mesh = mesh or m
    return (mesh, tuple(used)) if used else (None, ())


def same_shape_shardings(inputs: Any) -> Callable[[Any, Any], Any]:
    """An ``out_sharding`` rule for :func:`run_auto`: each output array gets the sharding of the
    first array of ``inputs`` with its shape, or ``default`` (replicated) if there is none."""
    leaves = jax.tree_util.tree_leaves(inputs)
    by_shape: dict[tuple[int, ...], Any] = {}
    for x in leaves:
        by_shape.setdefault(tuple(np.shape(x)), jax.typeof(x).sharding)

    def rule(shapes: Any, default: Any) -> Any:
        return jax.tree_util.tree_map(lambda sd: by_shape.get(tuple(sd.shape), default), shapes)

    return rule


def run_auto(
    fn: Callable[..., Any],
    *args: Any,
    out_sharding: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """``fn(*args)``, run in auto sharding mode when ``args`` are sharded along explicit axes.

    Under explicit sharding, operations such as ``A - A^T`` on a sharded matrix or a QR of
    one do not type-check. Inside ``jax.sharding.auto_axes`` over the axes in use, the compiler
    lays them out freely; the outputs are then resharded by ``out_sharding(shapes, replicated)``,
    which maps the tree of output shapes to a tree of shardings (default:
    :func:`same_shape_shardings` of ``args``). Without explicit sharding this is ``fn(*args)``.
    """
    mesh, axes = explicit_axes(args)
    if not axes:
        return fn(*args)
    replicated = NamedSharding(mesh, PartitionSpec())
    rule = out_sharding or same_shape_shardings(args)
    concrete = [
        cast(Any, x.sharding).mesh
        for x in jax.tree_util.tree_leaves(args)
        if isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and isinstance(getattr(x.sharding, "mesh", None), jax.sharding.Mesh)
    ]

    def call() -> Any:
        probe = jax.sharding.auto_axes(fn, axes=axes, out_sharding=replicated)
        shapes = jax.eval_shape(probe, *args)
        return jax.sharding.auto_axes(fn, axes=axes, out_sharding=rule(shapes, replicated))(*args)

    if not concrete:
        return call()
    try:  # eager: operations on concrete arrays need the concrete mesh
        context: Any = jax.set_mesh(concrete[0])
    except ValueError:  # inside a trace (arrays closed over by a jitted function): abstract
        context = jax.sharding.use_abstract_mesh(concrete[0].abstract_mesh)
    with context:
        return call()


def targets(tree: Any, shardings: Any) -> list[Any]:
    """``shardings`` cut at ``tree``'s leaves, a parametrized tensor counting as one leaf."""
    treedef: Any = jax.tree_util.tree_structure(tree, is_leaf=is_node)
    try:
        return cast(list[Any], treedef.flatten_up_to(shardings))
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`shardings` does not match the tree: give the shardings of the tree you pass "
            "(`jax.tree.map(lambda x: x.sharding, tree)`, taken outside jit), with one sharding "
            f"or None per plain leaf and per parametrized tensor or its node. ({e})"
        ) from None


def constrain(x: Any, s: Any) -> Any:
    if s is None or not checks.is_array(x) or isinstance(x, jax.ShapeDtypeStruct):
        return x
    if not isinstance(s, (Sharding, PartitionSpec)):
        raise ValueError(
            f"`shardings` holds a {checks.type_name(s)} where a jax.sharding.Sharding, a "
            f"PartitionSpec or None is expected."
        )
    mesh = getattr(s, "mesh", None)
    if mesh is not None and not mesh.empty and mesh.explicit_axes:
        return jax.sharding.reshard(x, s)  # explicit axes: the sharding is part of the type
    return jax.lax.with_sharding_constraint(x, s)


def constrain_tree(xs: Any, ss: Any) -> Any:
    """Constrains each array of ``xs`` to the matching entry of ``ss`` (None: left alone)."""
    try:
        xs_def: Any = jax.tree_util.tree_structure(xs)
        flat_s = xs_def.flatten_up_to(ss)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`shardings` holds a node whose `params` or `state` do not match the tree's: take "
            f"the shardings from the same registered tree. ({e})"
        ) from None
    flat_x, treedef = jax.tree_util.tree_flatten(xs)
    return cast(Any, treedef).unflatten([constrain(x, s) for x, s in zip(flat_x, flat_s)])


def value_target(target: Any, node: Parametrized, shape: tuple[int, ...]) -> Any:
    """The sharding the value should have: the target itself, or its same-shape original's."""
    if not isinstance(target, Parametrized):
        return target
    for x, s in zip(node.originals, target.originals):
        if tuple(x.shape) == tuple(shape) and s is not None:
            return s
    return None


def same_shape_sharding(node: Parametrized, shape: tuple[int, ...]) -> Any:
    for x in node.originals:
        if tuple(x.shape) == tuple(shape):
            return jax.typeof(x).sharding
    return None


def node_value(node: Parametrized, target: Any, update_state: bool, where: str) -> tuple[Any, Any]:
    if explicit_axes(node)[1]:
        return node_value_explicit(node, target, update_state, where)
    if isinstance(target, Parametrized):
        node = node.replace(
            originals=tuple(constrain(x, s) for x, s in zip(node.originals, target.originals)),
            params=constrain_tree(node.params, target.params),
        )
    value, new = ch.node_value(node, update_state=update_state, where=where)
    if update_state and isinstance(target, Parametrized) and target.state:
        new = constrain_tree(new, target.state)
    return constrain(value, value_target(target, node, value.shape)), new


def node_value_explicit(
    node: Parametrized, target: Any, update_state: bool, where: str
) -> tuple[Any, Any]:
    """The chain run in auto mode over the explicit axes in use (see ``chain.run_auto``): the
    value gets its target's or its same-shape original's sharding, new state the old one's."""

    def run(n: Parametrized) -> tuple[Any, Any]:
        return ch.node_value(n, update_state=update_state, where=where)

    def out_sharding(shapes: Any, replicated: Any) -> Any:
        value_shape = shapes[0].shape
        value_s = value_target(target, node, value_shape)
        if value_s is None:
            value_s = same_shape_sharding(node, value_shape) or replicated
        state_s = jax.tree_util.tree_map(lambda x: jax.typeof(x).sharding, node.state)
        return value_s, state_s

    return cast(tuple[Any, Any], run_auto(run, node, out_sharding=out_sharding))
