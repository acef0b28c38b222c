"""`table(module)`: the parameter table of an NNX module, parametrized tensors included.

The rows are the module's Variables at their ``nnx.state`` paths; the Variables of each
:class:`~paramx.nnx.ParametrizationList` (``.../parametrizations/<name>/original``,
``params``, ``state``) are read as one :class:`paramx.Parametrized` node, so they carry their
chain, their roles and the tensor's health figures, as :func:`paramx.table` gives them for a
registered tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from jax.tree_util import DictKey

from paramx._src.core import paths
from paramx._src.core import table as core
from paramx._src.integrations.nnx.container import CONTAINER, ParametrizationList


def table(module: Any, *, health: bool = True) -> core.Table:
    """The parameter table of an NNX module: every Variable's path, shape, dtype, size, role,
    Variable type, chain and health figures, with totals per role and per top-level module.

    The same table as :func:`paramx.table` (``str()`` for the terminal, ``.to_dict()`` for
    logs, treescope for notebooks). A parametrized attribute's originals, ``params`` and
    ``state`` appear at their ``nnx.state`` paths (``.../parametrizations/kernel/original``)
    with the chain, and the tensor's health figures (``orth_error``, ``sigma``, ...) on its
    first original's row; ``row.tensor`` is the attribute's path (``.../kernel``). Reading
    the table changes nothing (no state update).

    Args:
      module: An NNX module (or any graph node ``nnx.state`` accepts).
      health: Compute the health figures; ``False`` reads shapes only.

    Returns:
      The table (see :func:`paramx.table`).

    Examples:
      >>> from flax import nnx
      >>> import paramx.nnx as pnx
      >>> layer = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> t = pnx.table(layer)
      >>> [(r.path, r.role, r.collection) for r in t.rows]  # doctest: +NORMALIZE_WHITESPACE
      [('bias', 'plain', 'Param'),
       ('parametrizations/kernel/original', 'original', 'Param'),
       ('parametrizations/kernel/state/0/u', 'state', 'ParametrizationState'),
       ('parametrizations/kernel/state/0/v', 'state', 'ParametrizationState')]
      >>> sorted(t.health["kernel"]), t.by_role["original"].size
      (['sigma', 'sigma_true'], 6)
    """
    flat = core.entries(nnx.state(module))
    lists = [(tuple(p), x) for p, x in nnx.iter_graph(module) if isinstance(x, ParametrizationList)]
    lists.sort(key=lambda item: -len(item[0]))  # the deepest (a nested chain's) claims first
    entries: list[core.Entry] = []
    placed: set[tuple[Any, ...]] = set()
    kinds: dict[str, str] = {}
    for e in flat:
        keys = paths.path_keys(e.path)
        kinds[paths.format_path(e.path)] = e.collection
        owner = next((p for p, _ in lists if keys[: len(p)] == p), None)
        if owner is None:
            entries.append(e)
        elif owner not in placed:  # the node stands where its first Variable is
            placed.add(owner)
            plist = dict(lists)[owner]
            entries.append(core.Entry(tuple(DictKey(k) for k in owner), plist.node()))
    rows = []
    pending: dict[str, Any] = {}  # health of a tensor whose first original is not a Variable
    for r in core.rows(entries, health=health):
        if r.path not in kinds:  # an original that is a nested chain's value, not a Variable
            if r.health:
                pending[r.tensor] = r.health
            continue
        if r.tensor in pending and not r.health:
            r = dataclasses.replace(r, health=pending.pop(r.tensor))
        rows.append(_attribute_view(r, kinds[r.path]))
    return core.finish(rows)


def _attribute_view(r: core.Row, kind: str) -> core.Row:
    """The row with its Variable type, and the tensor and module named by the attributes
    (``a/kernel``, ``a/kernel/original`` for a nested chain), not the containers
    (``a/parametrizations/kernel``)."""
    keys = r.path.split("/")
    if r.tensor:
        parts = r.tensor.split("/")
        # The module holding the outermost chain, and the tensor named by attributes.
        owner = parts.index(CONTAINER) if CONTAINER in parts else len(parts) - 1
        keys = parts[:owner]
        tensor = "/".join(k for k in parts if k != CONTAINER)
    else:
        tensor = ""
    module = keys[0] if len(keys) >= (1 if r.tensor else 2) else core.ROOT
    return dataclasses.replace(r, collection=kind, tensor=tensor, module=module)
