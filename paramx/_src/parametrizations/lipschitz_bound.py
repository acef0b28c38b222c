"""Reading Lipschitz bounds: each layer's certified bound and measured norm, and a network's.

:func:`lipschitz` reads, for each selected kernel of a tree, a CERTIFIED upper bound on the
operator norm of its layer (from the parametrization when it declares one, else by Gram
iteration on the kernel's value) and a MEASURED norm (the matrix's exact norm for a Dense
kernel; for a conv, the exact spectrum if its padding is circular, else a converged power
iteration on the actual convolution). :func:`network_bound` multiplies the certified bounds of
a chain of layers.

The protocol is duck-typed, so any parametrization can take part: the last link of a chain
may have a method ``lipschitz_bound(value) -> jax.Array`` (a certified bound on the operator
norm of the layer whose materialized kernel is ``value``), and any link may have a field
``geometry`` (a :class:`~paramx.lipschitz.ConvGeometry`, or ``None``). Nothing here names a
parametrization class.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from paramx._src.core import paths as px_paths
from paramx._src.core.materialize import materialize_tensor
from paramx._src.core.node import is_node
from paramx._src.core.table import is_variables, with_state_collection
from paramx._src.parametrizations import conv_spectral_norm as csn
from paramx._src.parametrizations.convops import ConvGeometry
from paramx._src.parametrizations.numerics import compute_dtype


@dataclasses.dataclass(frozen=True)
class LayerBound:
    """The Lipschitz reading of one kernel (one entry of :func:`lipschitz`'s result).

    Attributes:
      certified: A certified upper bound on the operator norm (l2 -> l2) of the layer, or
        ``None`` when none can be given (a 1-D or integer leaf). A scalar, or one per tensor of
        a stack (``batch_shape``).
      measured: The measured norm (a lower estimate that converges to the norm for
        ``"power"``; exact for ``"svd"`` and ``"fft"``), or ``None`` (not asked, or a conv
        without ``input_size``).
      certified_by: ``"parametrization"`` (its ``lipschitz_bound``), ``"gram"`` (Gram
        iteration on the value), or ``None``.
      measured_by: ``"svd"`` (a Dense kernel), ``"fft"`` (circular padding), ``"power"``, or
        ``None``.
      geometry: The geometry used (from the parametrization, else from the argument).
      chain: The names of the chain's links (empty for a plain leaf).
      shape: The value's shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx import lipschitz
      >>> tree = px.spectral_norm({"dense": {"kernel": jnp.diag(jnp.array([3.0, 1.0]))}},
      ...                         "dense/kernel")
      >>> b = lipschitz.lipschitz(tree)["dense/kernel"]
      >>> b.certified_by, b.measured_by, round(float(b.measured), 4)
      ('gram', 'svd', 1.0)
    """

    certified: jax.Array | None
    measured: jax.Array | None
    certified_by: str | None
    measured_by: str | None
    geometry: ConvGeometry | None
    chain: tuple[str, ...]
    shape: tuple[int, ...]


class LipschitzReport(dict):
    """``{path: LayerBound}``, in tree order; ``str()`` gives a table.

    A plain dict otherwise (no pandas needed): ``report["conv/kernel"].certified``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx import lipschitz
      >>> tree = px.spectral_norm({"dense": {"kernel": jnp.eye(2) * 2.0}}, "dense/kernel")
      >>> print(lipschitz.lipschitz(tree))  # doctest: +ELLIPSIS
      path          shape  chain          certified  measured  by
      dense/kernel  2x2    spectral_norm  1...       1         gram / svd
    """

    def __str__(self) -> str:
        rows = [("path", "shape", "chain", "certified", "measured", "by")]
        for path, b in self.items():
            rows.append(
                (
                    path,
                    "x".join(str(s) for s in b.shape),
                    " -> ".join(b.chain) or "-",
                    _fmt(b.certified),
                    _fmt(b.measured),
                    f"{b.certified_by or '-'} / {b.measured_by or '-'}",
                )
            )
        if len(rows) == 1:
            return "No kernels selected."
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows
        )

    __repr__ = __str__


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return f"{float(a):.6g}"
    return f"max {float(a.max()):.6g} ({a.size})"


# ----- measurement (jitted once per geometry and shape) ------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _measure(value: jax.Array, geometry: ConvGeometry | None, method: str, iterations: Any) -> Any:
    return csn.operator_norm(value, geometry, method=method, iterations=iterations)


@functools.partial(jax.jit, static_argnums=(1,))
def _gram(value: jax.Array, geometry: ConvGeometry | None) -> Any:
    return csn.gram_bound(value, geometry)


def _stacked(fn: Callable[[jax.Array], Any], n_axes: int) -> Callable[[jax.Array], Any]:
    for _ in range(n_axes):
        fn = jax.vmap(fn)
    return fn


def _geometry_for(
    path: str, chain: Sequence[Any], geometry: ConvGeometry | Mapping[str, Any] | None
) -> ConvGeometry | None:
    for p in reversed(tuple(chain)):
        g = getattr(p, "geometry", None)
        if g is not None:
            return g
    if isinstance(geometry, Mapping):
        return geometry.get(path)
    return geometry


def _check_geometry_arg(geometry: Any) -> None:
    if geometry is None or isinstance(geometry, ConvGeometry):
        return
    if isinstance(geometry, Mapping):
        bad = [k for k, v in geometry.items() if v is not None and not isinstance(v, ConvGeometry)]
        if not bad:
            return
        raise TypeError(
            f"geometry[{bad[0]!r}] must be a ConvGeometry (or None); got "
            f"{type(geometry[bad[0]]).__name__}."
        )
    raise TypeError(
        f"geometry must be a ConvGeometry, a dict path -> ConvGeometry, or None; got "
        f"{type(geometry).__name__}: {geometry!r}."
    )


def _is_kernel(value: Any) -> bool:
    shape = tuple(getattr(value, "shape", ()))
    dtype = getattr(value, "dtype", None)
    return 2 <= len(shape) <= 5 and dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _read(
    path: str,
    leaf: Any,
    geometry: Any,
    measure: bool,
    iterations: int | None,
) -> LayerBound:
    if is_node(leaf):
        value = materialize_tensor(leaf, label=path)
        chain = tuple(leaf.chain)
        n_stack = len(leaf.batch_shape)
        names = tuple(leaf.chain_names())
    else:
        value, chain, n_stack, names = leaf, (), 0, ()
    g = _geometry_for(path, chain, geometry)
    one_shape = tuple(getattr(value, "shape", ()))[n_stack:]
    if getattr(value, "dtype", None) is None:  # not an array: nothing to read
        return LayerBound(None, None, None, None, g, names, one_shape)
    certified = measured = None
    certified_by = measured_by = None
    bound_fn = getattr(chain[-1], "lipschitz_bound", None) if chain else None
    try:
        if callable(bound_fn) and g is not None and _geometry_for(path, chain, None) is None:
            bound_fn = _bound_for_geometry(chain[-1], g)
        if callable(bound_fn):
            certified = _stacked(bound_fn, n_stack)(value)
            certified_by = "parametrization"
        elif _is_kernel(jax.ShapeDtypeStruct(one_shape, value.dtype)):
            v = value.astype(compute_dtype(value.dtype))
            certified = _stacked(lambda x: _gram(x, g), n_stack)(v)
            certified_by = "gram"
        if measure and _is_kernel(jax.ShapeDtypeStruct(one_shape, value.dtype)):
            v = value.astype(compute_dtype(value.dtype))
            rank = len(one_shape) - 2
            if rank == 0:
                measured = _stacked(lambda x: jnp.linalg.norm(x, 2), n_stack)(v)
                measured_by = "svd"
            elif g is not None and g.input_size is not None:
                # The spectrum is exact for a circular conv whose strides divide the input
                # size (the polyphase matrices); otherwise it is the stride-1 norm, a bound.
                strides = g._per_axis(g.strides, rank, "strides")
                exact = all(n % s == 0 for n, s in zip(g.input_size, strides))
                method = "fft" if g.is_circular() and exact else "power"
                measured = _stacked(lambda x: _measure(x, g, method, iterations), n_stack)(v)
                measured_by = method
    except (ValueError, TypeError) as e:
        raise type(e)(f"{e} (at {path})") from e
    return LayerBound(
        certified=certified,
        measured=measured,
        certified_by=certified_by,
        measured_by=measured_by,
        geometry=g,
        chain=names,
        shape=one_shape,
    )


def _bound_for_geometry(p: Any, g: ConvGeometry) -> Callable[[jax.Array], Any]:
    """The ``lipschitz_bound`` of ``p`` for the caller's geometry ``g`` (``p`` carries none):
    the bound of ``p`` with ``g`` as its geometry, so that ``p``'s own checks (a padding it
    cannot certify, a Cayley conv's circular padding and size) run on it. A parametrization
    without a ``geometry`` field certifies every geometry itself."""
    if not dataclasses.is_dataclass(p) or "geometry" not in {f.name for f in dataclasses.fields(p)}:
        return cast(Callable[[jax.Array], Any], p.lipschitz_bound)
    try:
        with_g = dataclasses.replace(cast(Any, p), geometry=g)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"the kernel's parametrization does not certify the geometry given for it: {e}"
        ) from None
    return cast(Callable[[jax.Array], Any], with_g.lipschitz_bound)


def _selected(tree: Any, where: Any) -> list[tuple[str, Any]]:
    if is_variables(tree):  # stateful methods read their state from the nodes
        tree = with_state_collection(tree)
    leaves = px_paths.leaves_with_paths(tree)
    if where is None:
        return [(px_paths.format_path(p), x) for p, x in leaves if is_node(x)]
    return [
        (px_paths.format_path(leaves[i][0]), leaves[i][1]) for i in px_paths.select(tree, where)
    ]


def lipschitz(
    tree: Any,
    where: Any = None,
    *,
    geometry: ConvGeometry | Mapping[str, Any] | None = None,
    measure: bool = True,
    iterations: int | None = None,
) -> LipschitzReport:
    """Each selected layer's certified Lipschitz bound and its measured operator norm.

    For each kernel: ``certified`` comes from the last link's ``lipschitz_bound`` when the
    tensor is parametrized by something that declares one; otherwise it is a Gram-iteration
    bound on the kernel's value (certified for any padding and stride; tighter with
    ``input_size``), and ``None`` for a leaf that is not a kernel (fewer than 2 axes).
    ``measured`` is the exact norm of a Dense kernel (SVD), the exact spectrum of a circular
    conv (FFT), or a converged power iteration on the actual conv (``iterations``, default
    500) for other paddings; a conv without ``input_size`` is not measured.

    The geometry of a kernel is the ``geometry`` field of its parametrization when it has one,
    else the ``geometry`` argument (one :class:`~paramx.lipschitz.ConvGeometry` for all, or a
    dict path -> ConvGeometry). A kernel with more than 2 axes is read as a conv kernel
    ``(*spatial, in, out)``; a kernel with 2 axes as a Dense kernel ``(in, out)``.

    Args:
      tree: A tree, registered or not, with its state (``paramx.merge_state(params, state)``),
        or a linen variables dict (its ``'paramx_state'`` collection is merged in).
      where: ``None`` reads every parametrized tensor; a path, tuple of keys or predicate reads
        the selected leaves, parametrized or plain.
      geometry: The conv geometry of the kernels whose parametrization does not carry one.
      measure: Also measure the norms (the slow part).
      iterations: Power iterations for the measurement.

    Returns:
      A :class:`LipschitzReport`: ``{path: LayerBound}``, with a table as its ``str()``.

    Raises:
      ValueError: On a missing path, or a geometry that does not fit a kernel (the message
        names the path).

    Examples:
      >>> import jax
      >>> import paramx as px
      >>> from paramx.lipschitz import conv_spectral_norm
      >>> from paramx.lipschitz import lipschitz
      >>> from paramx.lipschitz import ConvGeometry
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> params = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 4))},
      ...           "dense": {"kernel": jax.random.normal(jax.random.key(1), (16, 3))}}
      >>> params = conv_spectral_norm(params, "conv/kernel", geometry=g, method="fft")
      >>> report = lipschitz(params, lambda path, leaf: px.path_keys(path)[-1] == "kernel")
      >>> round(float(report["conv/kernel"].certified), 4), report["conv/kernel"].certified_by
      (1.0, 'parametrization')
      >>> report["dense/kernel"].certified_by, report["dense/kernel"].measured_by
      ('gram', 'svd')
    """
    _check_geometry_arg(geometry)
    if iterations is not None and (not isinstance(iterations, int) or iterations <= 0):
        raise ValueError(f"lipschitz: iterations must be a positive int, got {iterations!r}.")
    report = LipschitzReport()
    for path, leaf in _selected(tree, where):
        report[path] = _read(path, leaf, geometry, measure, iterations)
    return report


def network_bound(
    tree: Any,
    paths: Sequence[Any] | None = None,
    *,
    geometry: ConvGeometry | Mapping[str, Any] | None = None,
) -> jax.Array:
    """A certified Lipschitz constant of a chain of layers: the product of their bounds.

    For a network ``f = L_n o a_{n-1} o ... o a_1 o L_1`` whose layers ``L_i`` are the
    selected kernels (convs or Dense, plus biases, which do not change a Lipschitz constant)
    and whose activations ``a_i`` are 1-Lipschitz (ReLU, GroupSort, tanh, ...), the product of
    the layers' certified operator-norm bounds bounds ``f``'s Lipschitz constant with respect
    to the l2 norm: ``||f(x) - f(y)|| <= bound * ||x - y||``. A stack (``nn.scan``) counts each
    of its layers. Not covered: residual connections (``x + g(x)`` is ``1 + Lip(g)``-Lipschitz,
    not ``Lip(g)``), normalization layers with running statistics (affine at evaluation:
    multiply by their scale's largest magnitude yourself), attention, and pooling other than
    average pooling (1-Lipschitz up to its window's ``1 / sqrt`` factor) and max pooling
    (1-Lipschitz when windows do not overlap).

    Args:
      tree: A tree, registered or not, with its state (``paramx.merge_state(params, state)``),
        or a linen variables dict (its ``'paramx_state'`` collection is merged in).
      paths: The layers' kernels: a sequence of paths (``"conv1/kernel"`` or tuples of keys),
        each naming one kernel; ``None`` takes every parametrized tensor.
      geometry: As in :func:`lipschitz`, for kernels whose parametrization has none.

    Returns:
      A scalar.

    Raises:
      ValueError: If a selected leaf has no certified bound (naming its path).

    Examples:
      >>> import jax
      >>> from paramx.lipschitz import conv_spectral_norm
      >>> from paramx.lipschitz import network_bound
      >>> from paramx.lipschitz import ConvGeometry
      >>> g = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")
      >>> ks = jax.random.normal(jax.random.key(0), (2, 3, 3, 4, 4))
      >>> params = {"c1": {"kernel": ks[0]}, "c2": {"kernel": ks[1]}}
      >>> params = conv_spectral_norm(params, lambda p, x: x.ndim == 4, geometry=g,
      ...                             method="gram")
      >>> round(float(network_bound(params, ["c1/kernel", "c2/kernel"])), 4)
      1.0
    """
    _check_geometry_arg(geometry)
    if paths is None:
        selected = _selected(tree, None)
    else:
        if isinstance(paths, str) or callable(paths):
            raise TypeError(
                "network_bound: paths is a sequence of paths, one per layer, e.g. "
                "['conv1/kernel', 'conv2/kernel'] (or None for every parametrized tensor); "
                f"got {paths!r}."
            )
        selected = [item for p in paths for item in _selected(tree, p)]
    if not selected:
        raise ValueError("network_bound: no layers selected; the tree has no parametrized tensor.")
    factors = []
    for path, leaf in selected:
        b = _read(path, leaf, geometry, measure=False, iterations=None)
        if b.certified is None:
            raise ValueError(
                f"network_bound: the leaf at {path} (shape {list(b.shape)}) has no certified "
                f"bound: it is not a Dense or conv kernel. Select only the layers' kernels."
            )
        factors.append(jnp.prod(jnp.asarray(b.certified)))
    dtype = max((f.dtype for f in factors), key=lambda d: jnp.dtype(d).itemsize)
    total = jnp.ones((), dtype)
    for f in factors:
        total = total * f.astype(dtype)
    return total


__all__ = ["LayerBound", "LipschitzReport", "lipschitz", "network_bound"]
