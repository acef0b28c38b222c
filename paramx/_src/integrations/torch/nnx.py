"""NNX modules: a module (plain, or registered with ``paramx.nnx``) seen as a paramx tree.

:func:`nnx_view` turns the module into a tree of arrays and ``Parametrized`` nodes (each
``ParametrizationList`` of ``paramx.nnx`` gives its node), with torch's names for BatchNorm's
statistics and ``nnx.Sequential``'s extra ``layers`` level; :func:`nnx_state` turns read
values back into an ``nnx.State`` for ``nnx.update``. ``flax.nnx`` is used only when the
caller already imported it (no NNX object exists otherwise).

Examples:
  >>> is_nnx({"kernel": 1.0})
  False
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from paramx._src.core import paths
from paramx._src.core.node import is_node
from paramx._src.integrations.torch.keys import PARAMETRIZATIONS
from paramx._src.integrations.torch.plan import NNX_PARTS, Tensor


def _nnx() -> Any:
    """``flax.nnx`` when it is imported (no NNX object exists otherwise), else None."""
    return sys.modules.get("flax.nnx")


def is_nnx(x: Any) -> bool:
    """Whether ``x`` is an NNX module, state, or a tree of ``nnx.Variable``."""
    nnx = _nnx()
    if nnx is None:
        return False
    if isinstance(x, (nnx.Module, nnx.State)):
        return True
    is_var = lambda v: isinstance(v, nnx.Variable)
    return any(is_var(v) for v in jax.tree_util.tree_leaves(x, is_leaf=is_var))


@dataclasses.dataclass
class NNXView:
    """An NNX module (or state) seen as a paramx tree, with the way back to its Variables."""

    tree: dict[str, Any]
    variables: dict[tuple[str, ...], tuple[tuple[Any, ...], Any]]  # str path -> (path, Var)
    renames: dict[tuple[str, ...], str]
    auto: list[tuple[tuple[str, ...], tuple[str, ...]]]


def nnx_view(obj: Any, *, doing: str) -> NNXView:
    """The tree the interop reads or writes for an NNX module or state."""
    nnx = _nnx()
    from paramx._src.integrations import nnx as pnx  # flax.nnx is imported already

    skip = tuple(
        c for c in (nnx.RngState, nnx.Intermediate, getattr(nnx, "Cache", None)) if c is not None
    )
    plists: dict[tuple[Any, ...], Any] = {}
    sequentials: list[tuple[Any, ...]] = []
    found: list[tuple[tuple[Any, ...], Any]] = []
    tied: list[tuple[tuple[Any, ...], Any]] = []
    canonical: dict[int, tuple[Any, ...]] = {}
    if isinstance(obj, nnx.Module):
        from paramx._src.integrations.nnx.tie import Tied

        # nnx.state files a shared Variable under the first path NNX meets; torch's
        # state_dict lists a shared parameter under each of its names.
        for path, node in nnx.iter_graph(obj):
            if isinstance(node, nnx.Variable):
                canonical.setdefault(id(node), tuple(path))
        for path, node in _every_path(obj, Tied):
            if isinstance(node, pnx.ParametrizationList):
                plists[path] = node
            elif isinstance(node, nnx.Sequential):
                sequentials.append(path)
            elif isinstance(node, nnx.Variable):
                found.append((path, node))
            elif isinstance(node, Tied):
                tied.append((path, node))
            elif isinstance(node, nnx.Module):
                _refuse_stacked_kernel(path, node)
    else:
        is_var = lambda v: isinstance(v, nnx.Variable)
        for path, v in jax.tree_util.tree_flatten_with_path(obj, is_leaf=is_var)[0]:
            keys = paths.path_keys(path)
            if not is_var(v):
                raise ValueError(
                    f"The leaf at {paths.format_path(path)} of the {type(obj).__name__} is a "
                    f"{type(v).__name__}, not an nnx.Variable; pass the NNX module itself."
                )
            if PARAMETRIZATIONS in keys[:-1]:
                raise ValueError(
                    f"{doing} needs the NNX module, not its state: the state at "
                    f"{paths.format_path(path)} belongs to a tensor registered with paramx.nnx, "
                    f"and which parametrizations produced it (spectral_norm's u and v, an "
                    f"orthogonal base, their layouts) lives in the module's graph, not in the "
                    f"nnx.State. Pass the module (or nnx.merge(graphdef, state))."
                )
            found.append((tuple(keys), v))

    def inside_plist(path: tuple[Any, ...]) -> bool:
        return any(path[: len(q)] == q for q in plists)

    def as_str(path: Sequence[Any]) -> tuple[str, ...]:
        return tuple(str(k) for k in path)

    tree: dict[str, Any] = {}
    variables: dict[tuple[str, ...], tuple[tuple[Any, ...], Any]] = {}
    renames: dict[tuple[str, ...], str] = {}
    for path, var in found:
        variables[as_str(path)] = (canonical.get(id(var), path), var)
        if isinstance(var, skip) or inside_plist(path) or not hasattr(var.get_value(), "shape"):
            continue
        keys = as_str(path)
        _nest(tree, keys, var.get_value())
        if isinstance(var, nnx.BatchStat) and keys[-1] in ("mean", "var"):
            renames[keys] = "running_" + keys[-1]  # torch BatchNorm's buffers
    for path, plist in plists.items():
        if len(path) < 2 or path[-2] != PARAMETRIZATIONS:
            raise ValueError(
                f"A ParametrizationList at {'/'.join(as_str(path))} is not under a module's "
                f"`parametrizations`; only modules registered with paramx.nnx are supported."
            )
        keys = as_str((*path[:-2], path[-1]))
        _nest(tree, keys, plist.node())
    for path, t in tied:
        var = _shared_variable(path, t, doing)
        keys = as_str(path)
        variables[keys] = (canonical[id(var)], var)
        _nest(tree, keys, var.get_value())
    auto = [(as_str(p), (*as_str(p), "layers")) for p in sequentials]
    return NNXView(tree, variables, renames, auto)


def _refuse_stacked_kernel(path: tuple[Any, ...], module: Any) -> None:
    """A ValueError for an ``nnx.Linear`` / ``nnx.Conv`` whose plain kernel has more axes than
    the layer's own (a stack from ``nnx.vmap``), which would be read as a conv weight."""
    nnx = _nnx()
    # vars(), not getattr: reading a parametrized attribute runs it (a training-mode update).
    kernel = vars(module).get("kernel")
    if not isinstance(kernel, nnx.Variable) or not hasattr(kernel.get_value(), "ndim"):
        return
    if isinstance(module, nnx.Linear):
        rank = 2
    elif isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
        size = module.kernel_size
        rank = (len(size) if isinstance(size, Sequence) else 1) + 2
    else:
        return
    shape = tuple(kernel.get_value().shape)
    if len(shape) > rank:
        where = "/".join(str(k) for k in (*path, "kernel"))
        extra = len(shape) - rank
        raise ValueError(
            f"The {type(module).__name__} kernel at {where} has shape {shape}, {extra} "
            f"{'axis' if extra == 1 else 'axes'} more than the layer's own: a stack of "
            f"{'x'.join(map(str, shape[:extra]))} layers (nnx.vmap), which has no "
            f"torch keys. Convert one layer at a time (index the stack), with `modules=` naming "
            f"each layer's torch module."
        )


def _every_path(root: Any, tied_type: type) -> list[tuple[tuple[Any, ...], Any]]:
    """Every ``(path, node)`` of the module graph, a shared node under each of its paths (in
    NNX's order), and a :class:`~paramx.nnx.Tied` attribute as itself: its ``source`` is the
    other module, whose parameters are listed at that module's own paths."""
    from flax.nnx import graph

    out: list[tuple[tuple[Any, ...], Any]] = []

    def walk(path: tuple[Any, ...], node: Any, ancestors: frozenset[int]) -> None:
        out.append((path, node))
        if isinstance(node, tied_type) or id(node) in ancestors or not graph.is_node(node):
            return
        impl = graph.get_node_impl(node)
        if impl is None:
            return
        for key, child in impl.node_dict(node).items():
            walk((*path, key), child, ancestors | {id(node)})

    walk((), root, frozenset())
    return out


def _shared_variable(path: tuple[Any, ...], t: Any, doing: str) -> Any:
    """The Variable a plain :func:`paramx.nnx.tie` shares (torch's shared parameter), or a
    ValueError for a tie through a transform or to a parametrized tensor."""
    nnx = _nnx()
    where = "/".join(str(k) for k in path)
    holder = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path[:-1])
    fix = f"`paramx.nnx.untie(model{holder}, {path[-1]!r})`"
    while True:
        if t.transform is not None:
            raise ValueError(
                f"{doing}: the attribute at {where} is tied to another module's "
                f"{t.source_name!r} through {getattr(t.transform, '__name__', t.transform)!r}; "
                f"torch shares parameters, not values through a transform. Untie it first "
                f"({fix}) to give it its own Variable."
            )
        value = vars(t.source).get(t.source_name)  # not getattr: that runs a parametrization
        if isinstance(value, nnx.Variable):
            return value
        if not isinstance(value, type(t)):
            raise ValueError(
                f"{doing}: the attribute at {where} is tied to {t.source_name!r}, a tensor "
                f"registered with paramx.nnx whose value is computed; torch shares raw "
                f"parameters. Untie it first ({fix}) to give it its own "
                f"Variable."
            )
        t = value


def _nest(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _plist_paths(view: NNXView) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Tree keys of each parametrized tensor -> the str path of its ParametrizationList."""
    out = {}
    for keys in view.variables:
        for n in range(len(keys) - 2):
            if keys[n] == PARAMETRIZATIONS and keys[n + 2].startswith(NNX_PARTS):
                out[(*keys[:n], keys[n + 1])] = keys[: n + 2]
    return out


def nnx_state(view: NNXView, tensors: list[Tensor], new_leaves: Mapping[int, Any]) -> Any:
    """The new values as an ``nnx.State`` of new Variables (for ``nnx.update``)."""
    nnx = _nnx()
    plist_paths = _plist_paths(view)
    out: dict[tuple[Any, ...], Any] = {}
    seen: dict[tuple[Any, ...], tuple[str, Any]] = {}

    def put(keys: tuple[str, ...], x: Any) -> None:
        path, var = view.variables[keys]
        where = "/".join(keys)
        if path in seen:  # a shared Variable (or a plain tie) read under a second name
            first, y = seen[path]
            if not (np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))):
                raise ValueError(
                    f"The arrays read for {first} and {where} differ, but both are one shared "
                    f"Variable of the NNX module (torch's shared parameter, listed under each "
                    f"name): the state dict does not come from a model that shares them."
                )
            return
        seen[path] = (where, x)
        out[path] = var.copy(x)

    for t in tensors:
        new = new_leaves[t.index]
        if not is_node(new):
            put(t.keys, new)
            continue
        base = plist_paths[t.keys]
        arrays = dict(zip(new.original_names, new.originals))
        for kind in ("params", "state"):
            flat = jax.tree_util.tree_flatten_with_path(getattr(new, kind))[0]
            for p, x in flat:
                arrays[".".join((kind, *(str(k) for k in paths.path_keys(p))))] = x
        for rel, x in arrays.items():
            put((*base, *rel.split(".")), x)
    return nnx.from_flat_state(list(out.items()))
