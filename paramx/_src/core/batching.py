"""Batched materialization: equal parametrized tensors computed in one vmapped call.

A deep model often holds many parametrized tensors that differ only in their numbers: the
same chain (compared by ``==``, as ``jax.jit`` compares a tree's static structure: frozen
dataclasses and ``Parametrization`` tuples by value, plain functions by identity), the same
originals, ``params`` and ``state`` layout (tree structure, shapes, dtypes, weak types).
:func:`batched_values` stacks each such group along a new leading axis, runs the per-tensor
computation (``update_state`` included) once under ``jax.vmap`` and splits the results
again (``stacks.stack`` / ``stacks.unstack``: slices XLA compiles once for the whole group).
The traced program holds one copy of the chain per group instead of one per tensor, and the
group's products run as batched products: fewer, larger kernels. Whether that pays depends on
the backend (``auto_batches`` says when ``batch="auto"`` uses it, and why).

What is never batched (computed per tensor, exactly as before):

* a tensor with a sharding target (``materialize(..., shardings=)``) or arrays sharded along
  explicit mesh axes or concrete arrays spread over several devices: stacking would move
  sharded data into one new array whose layout the compiler picks, while the point of
  ``shardings=`` is to keep each value where its original lives; concrete arrays on
  different devices, or committed to one and not the other, are not grouped together either
  (eagerly, stacking would move them to one device and commit them there);
* a chain that cannot be hashed or compared (a dataclass with an array field, say), or
  arrays that have no JAX type;
* a group whose batched run raises anything (a link that reads concrete values, an ordered
  ``io_callback``, a ``pure_callback`` without a ``vmap_method``): the group falls back to
  the per-tensor path, so errors name the failing tensor's path as before.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, cast

import jax

from paramx._src.core import chain as ch
from paramx._src.core import paths, sharding, stacks
from paramx._src.core.node import Parametrized, is_node

MODES = (True, False, "auto")
"""The values of ``materialize(..., batch=)``."""


def auto_batches() -> bool:
    """Whether ``batch="auto"`` stacks groups: on GPU and TPU backends, not on CPU.

    On accelerators each per-tensor kernel is a launch, and the matrix functions' default plan
    there has no control flow. On XLA:CPU (measured, ``benchmarks/README.md``) batching pays
    only for many small tensors: 64 equal 64 x 64 spectral-norm or weight-norm layers step in
    0.82-0.97x / 0.88-1.01x of the per-tensor time (three runs), but batched 4-layer MLPs of
    128 to 512 wide kernels stepped in 1.07x to 1.26x of the hand-written per-layer step (not
    profiled; the likely cost is the stacking copies, with no launches to save on the CPU); and
    chains with LAPACK calls step slower batched at every size measured (1.15-1.23x for
    64 x 64 orthogonal layers, 1.32-1.36x for 16 x 256 x 256). Such a stack reaches jaxlib's
    thread-pool threshold, so ``stacks.per_tensor`` runs the chain in chunks of one tensor,
    two side by side, under ``lax.map``: the same products and LAPACK calls as per tensor
    (a profile of the 16 x 256 step, summed over threads: 72 against 66 ms of products, 14.5
    against 14.8 ms of LU and solves), plus the chunks' slicing and stacking copies (about
    44 against 19 ms of copies). ``batch=True`` batches on the CPU too, for the compile time
    of deep stacks of small layers (one or two copies of the chain instead of one per tensor).
    """
    return not stacks.on_cpu()


def check_mode(batch: object) -> bool | str:
    """``batch`` if it is one of :data:`MODES`; else a ValueError that says what to pass."""
    if isinstance(batch, bool) or batch == "auto":
        return batch
    raise ValueError(
        f'`batch` has to be True, False or "auto" (the default); got {batch!r}. "auto" and '
        f"True compute equal parametrized tensors (same chain, shapes and dtypes) in one "
        f"vmapped call; False computes each tensor separately."
    )


def group_key(node: Parametrized, target: Any) -> Hashable | None:
    """What two nodes must share to be computed together, or None if ``node`` is never
    batched (see the module notes)."""
    if target is not None:
        return None
    parts = (node.originals, node.params, node.state)
    leaves, treedef = jax.tree_util.tree_flatten(parts)
    types, placement = [], []
    for x in leaves:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if len(x.sharding.device_set) > 1:
                return None
            # Eagerly, stacking moves every member to one device, and commits it there: only
            # arrays on the same device, committed alike, are grouped.
            device: Any = next(iter(x.sharding.device_set))
            placement.append((device.id, x.committed))
        try:
            t = jax.typeof(x)
        except TypeError:
            return None
        types.append((tuple(t.shape), t.dtype, bool(getattr(t, "weak_type", False))))
    if sharding.explicit_axes(parts)[1]:
        return None
    key = (node.chain, node.multi, node.event_ndims, treedef, tuple(types), tuple(placement))
    try:
        hash(key)
        if not bool(key == key):
            return None  # e.g. a NaN option: the group would never match itself
    except Exception:  # an unhashable or non-comparable chain is simply not batched
        return None
    return key


def groups(nodes: Sequence[tuple[int, Parametrized, Any]]) -> list[list[int]]:
    """The indices of the nodes that form groups of at least two equal nodes."""
    found: dict[Hashable, list[int]] = {}
    for index, node, target in nodes:
        key = group_key(node, target)
        if key is None:
            continue
        try:
            found.setdefault(key, []).append(index)
        except Exception:  # a chain whose == raises against another group's: not batched
            continue
    return [members for members in found.values() if len(members) >= 2]


def group_value(
    nodes: Sequence[Parametrized], update_state: bool, where: str
) -> list[tuple[Any, Any]]:
    """Each node's ``(value, new_state)``, computed in one vmapped call over the group."""
    first = nodes[0]

    def one(parts: tuple[Any, Any, Any]) -> tuple[Any, Any]:
        originals, params, state = parts
        node = first.replace(originals=originals, params=params, state=state)
        return ch.node_value(node, update_state=update_state, where=where)

    stacked = jax.tree_util.tree_map(
        lambda *xs: stacks.stack(list(xs)), *[(n.originals, n.params, n.state) for n in nodes]
    )

    out = ch.per_tensor(one, 1)(stacked)  # vmap, under jaxlib's LAPACK threshold on the CPU
    flat, treedef = jax.tree_util.tree_flatten(out)
    unflatten = cast(Any, treedef).unflatten
    pieces = [stacks.unstack(x) for x in flat]
    return [cast(tuple[Any, Any], unflatten([p[i] for p in pieces])) for i in range(len(nodes))]


def batched_values(
    with_paths: Sequence[tuple[Any, Any]],
    targets: Sequence[Any],
    update_state: bool,
    batch: bool | str,
) -> dict[int, tuple[Any, Any]]:
    """``(value, new_state)`` by position in ``with_paths`` for the nodes computed in groups.

    ``with_paths`` holds ``(key_path, leaf)`` pairs in the tree's order; nodes left out of the
    result (not batchable, alone, or in a group whose batched run failed) are for the caller
    to compute one by one.
    """
    if batch is False or (batch == "auto" and not auto_batches()):
        return {}
    nodes = [(i, leaf, t) for i, ((_, leaf), t) in enumerate(zip(with_paths, targets))]
    nodes = [entry for entry in nodes if is_node(entry[1])]
    done: dict[int, tuple[Any, Any]] = {}
    for members in groups(nodes):
        where = ", ".join(paths.format_path(with_paths[i][0]) for i in members)
        group = [cast(Parametrized, with_paths[i][1]) for i in members]
        try:
            results = group_value(group, update_state, where)
        except Exception:  # computed per tensor instead, whose errors name the path
            continue
        done.update(zip(members, results))
    return done
