"""`product`: one tensor split along an axis into consecutive blocks, each under its own
constraint (a product of sets).

``Product((Sphere(axis=-2), Positive()), sizes=(3, None))`` on a Flax Dense kernel
``(in, out)`` gives the first 3 output units unit-norm weight vectors (columns) and every other
weight a positive entry: the kernel is split along ``axis`` (default ``-1``, the output units)
into blocks of ``sizes`` entries, factor ``i`` constrains block ``i`` as if it were registered
on it alone (it sees an ``(in, sizes[i])`` tensor), and ``forward`` concatenates the factors'
values. On a conv kernel ``(*spatial, in, out)`` the default axis splits the output channels,
each factor seeing ``(*spatial, in, sizes[i])``; ``axis=-2`` splits the input channels
instead. One entry of ``sizes`` may be ``None``: that block takes the entries the others leave.

The axis is negative (counted from the last axis), so that the leading axes of a stack
(``batch_axes``) or of a batch passed to ``sample`` / ``in_manifold`` / ``distance`` never shift
it: the blocks are the same whether a tensor is alone or one of many.

Originals, params and state. When every factor keeps one original of its block's shape (every
built-in but weight norm), the product keeps one original, those originals side by side along
the axis: a plain tensor an optimizer, a torch ``state_dict`` (``original``) or a later link of
a chain sees as any other. Otherwise the originals are those of the factors, in order (a
factor with several, weight norm's ``g`` and ``v``, contributes all of them), the node holds
``original0, original1, ...``, and, as in torch, the product must be the first link of its
chain. How many originals a factor has is read from its ``forward``: the positional
parameters without a default (``forward(self, g, v)``: two); ``right_inverse`` must return as
many. A factor keeping params or state (``Orthogonal``'s base) keeps them under
its index: the product's state is ``{"0": ..., "2": ...}``, one entry per factor that has one.
``Product`` has ``init`` (and so the ``params=`` / ``state=`` convention) exactly when one of its
factors has.

Registration and assignment (``right_inverse``) split the value and run each factor's
``right_inverse`` on its block (a factor without one stores its block as its original, as
torch does). The value's Frobenius norm squared is the sum over blocks, so the nearest point of
the product set is the tuple of each block's nearest point: where every factor's
``right_inverse`` projects to its nearest point (``Sphere``, ``Symmetric``, ``Skew``,
``SpecialOrthogonal``, ...), the product's does too, and it is exact on the set. A block a
factor refuses (a zero vector for ``Sphere``, a negative entry for ``Positive``) is refused
with that factor's message, naming the block: eagerly by ``check_value`` (which the core runs
before it traces anything, so also for stacks and ``paramx.nnx``), which forwards each block to
its factor's ``check_value``. Inside a user's own ``jax.jit`` each factor does what it does
under tracing (see its docstring).

The constraint protocol. ``sample`` concatenates independent draws of the factors;
``in_manifold`` ANDs the factors' answers and ``distance`` is the square root of the sum of the
squared factor distances (the Frobenius distance to the product set), both one value per
matrix in the last two axes (per vector for a 1-D tensor). ``update_base`` re-centres every
factor that has one (a trivialization) and leaves the others as they are. Each of these
methods exists only when every factor has it (``update_base``: when one factor has it), so
:func:`paramx.sampler` and the conformance suite see exactly what the factors offer.

geotorch. geotorch's ``ProductManifold`` is a tuple of manifolds acting on a tuple of tensors,
an abstract building block composed with linear maps inside other manifolds (its low-rank
manifold is a product of two Stiefel manifolds and a vector). ``Product`` is that product
composed with one such map, the split of a single tensor along an axis: it constrains one
registered weight, blockwise.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from paramx._src.core import checks, manifold
from paramx._src.core import parametrization as pz
from paramx._src.parametrizations import numerics

_OWNER = "Product"
_P = inspect.Parameter


def _arity(f: Any) -> int:
    """How many originals factor ``f`` takes: the positional parameters of its ``forward``
    without a default (at least 1; 1 when the signature cannot be read)."""
    try:
        sig = inspect.signature(pz.forward_fn(f))
    except (TypeError, ValueError):
        return 1
    kinds = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
    required = [p for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty]
    return max(1, len(required))


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _pair(out: Any, what: str, f: Any) -> tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"{_OWNER}: the factor {pz.display_name(f)} has `init`, so its `{what}` must return "
            f"a pair; got {type(out).__name__}."
        )
    return out


class _AllFactorsTraceable:
    """``Product.traceable``: ``True`` on the class (the product's own code traces), and on an
    instance whether every factor declares ``traceable = True`` (paramx.nnx then compiles)."""

    def __get__(self, obj: Any, owner: Any = None) -> bool:
        if obj is None:
            return True
        return all(getattr(f, "traceable", False) is True for f in obj.factors)


def _option_factors(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(
            f"{_OWNER}: factors must be a non-empty tuple of parametrizations, one per block; "
            f"got {value!r} ({type(value).__name__})."
        )
    for i, f in enumerate(value):
        try:
            pz.check_parametrization(f)
        except TypeError as e:
            raise TypeError(f"{_OWNER}: factor {i}: {e}") from None
    factors = tuple(value)
    try:
        hash(factors)
    except TypeError as e:
        raise TypeError(
            f"{_OWNER}: every factor must be hashable ({e}): the product is kept in the tree's "
            f"static structure, as every parametrization is. Use frozen dataclasses (the "
            f"built-ins), paramx.Parametrization tuples or functions."
        ) from None
    return factors


def _option_sizes(value: Any, n: int) -> tuple[int | None, ...]:
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(
            f"{_OWNER}: sizes must be a tuple with one entry per factor ({n}); got {value!r}. "
            f"Each entry is how many entries along the axis its block takes (None: the rest)."
        )
    out: list[int | None] = []
    for s in value:
        if s is None:
            out.append(None)
            continue
        s = numerics.option_int(_OWNER, "each entry of sizes", s)
        if s < 1:
            raise ValueError(f"{_OWNER}: every entry of sizes must be >= 1; got sizes={value!r}.")
        out.append(s)
    if out.count(None) > 1:
        raise ValueError(
            f"{_OWNER}: at most one entry of sizes may be None (the block taking the rest); got "
            f"sizes={value!r}."
        )
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Product:
    """A tensor split along ``axis`` into blocks, each constrained by its own factor; register
    it with :func:`product`.

    See the module docstring for originals and state, projection and the protocol.

    Attributes:
      factors: The parametrizations, one per block, in order along the axis.
      sizes: How many entries along ``axis`` each block takes (positive ints; one may be
        ``None``, the rest of the axis).
      axis: The (negative) axis along which the tensor is split; ``-1`` (default): the output
        units of a Dense kernel ``(in, out)``, the output channels of a conv kernel.
      name: The display name.

    Examples:
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.product import Product
      >>> from paramx._src.parametrizations.positive import Positive
      >>> from paramx._src.parametrizations.sphere import Sphere
      >>> p = Product((Sphere(axis=-2), Positive()), sizes=(1, None))
      >>> k = jnp.array([[3.0, 1.0, 2.0], [4.0, 5.0, 3.0]])
      >>> px.materialize(px.register_parametrization({"k": k}, "k", p))["k"]
      Array([[0.6, 1. , 2. ],
             [0.8, 5. , 3. ]], dtype=float32)
    """

    factors: tuple[Any, ...]
    sizes: tuple[int | None, ...]
    axis: int = -1
    name: str = "product"

    traceable = _AllFactorsTraceable()

    def __post_init__(self) -> None:
        factors = _option_factors(self.factors)
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "sizes", _option_sizes(self.sizes, len(factors)))
        axis = numerics.option_int(_OWNER, "axis", self.axis)
        if axis >= 0:
            raise ValueError(
                f"{_OWNER}: axis must be negative (counted from the last axis, so that the "
                f"leading axes of a stack or a batch never shift it); got axis={axis}. On a "
                f"Dense kernel (in, out), axis=-1 splits the output units and axis=-2 the inputs."
            )
        object.__setattr__(self, "axis", axis)
        numerics.option_name(_OWNER, self.name)

    # ----- helpers ------------------------------------------------------------------------
    def _bounds(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """The ``[start, stop)`` of each block along the axis, for a tensor of ``shape``."""
        axis = numerics.normalize_axis(self.axis, len(shape), hint=f"({_OWNER}: axis)")
        n = shape[axis]
        fixed = sum(s for s in self.sizes if s is not None)
        rest = n - fixed
        if (None in self.sizes and rest < 1) or (None not in self.sizes and rest != 0):
            raise ValueError(
                f"{_OWNER}: sizes={self.sizes!r} do not fit the {n} entries along axis "
                f"{self.axis} of a tensor of shape {list(shape)} (the fixed sizes add up to "
                f"{fixed}{'; the None block needs at least 1' if None in self.sizes else ''}). "
                f"Give sizes that add up to {n}, or make one of them None."
            )
        out, start = [], 0
        for s in self.sizes:
            stop = start + (rest if s is None else s)
            out.append((start, stop))
            start = stop
        return out

    def _blocks(self, x: Any) -> list[Any]:
        axis = self.axis % x.ndim
        idx = [slice(None)] * x.ndim
        blocks = []
        for a, b in self._bounds(x.shape):
            idx[axis] = slice(a, b)
            blocks.append(x[tuple(idx)])
        return blocks

    def _block_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        axis = self.axis % len(shape)
        return [(*shape[:axis], b - a, *shape[axis + 1 :]) for a, b in self._bounds(shape)]

    def _counts(self) -> list[int]:
        return [_arity(f) for f in self.factors]

    def _group(self, originals: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The originals of each factor: the blocks of one packed original, or the factors'
        own originals in order."""
        counts = self._counts()
        if len(originals) == 1 and len(self.factors) > 1 and all(c == 1 for c in counts):
            return [(b,) for b in self._blocks(originals[0])]
        if len(originals) != sum(counts):
            raise ValueError(
                f"{_OWNER}: got {len(originals)} originals, but the factors take {counts} "
                f"(read from the positional parameters of their forward), {sum(counts)} in all "
                f"(or one, packed, when each takes one). A product whose factors have originals "
                f"of other shapes than their blocks has several originals, so it must be the "
                f"first parametrization of its chain (as in torch)."
            )
        groups, i = [], 0
        for c in counts:
            groups.append(tuple(originals[i : i + c]))
            i += c
        return groups

    def _pack(self, groups: list[tuple[Any, ...]], blocks: Sequence[Any]) -> Any:
        """One original when every factor has one of its block's shape and a common dtype (the
        blocks side by side); else the tuple of all the factors' originals."""
        flat = tuple(x for xs in groups for x in xs)
        if len(flat) != len(groups) or not all(
            hasattr(x, "shape") and tuple(x.shape) == tuple(b.shape) for x, b in zip(flat, blocks)
        ):
            return flat
        if len({jnp.dtype(x.dtype) for x in flat}) != 1:
            return flat
        return jnp.concatenate(flat, axis=self.axis)

    @property
    def _has_arrays(self) -> bool:
        return any(pz.has_arrays(f) for f in self.factors)

    @staticmethod
    def _kwargs(f: Any, i: int, params: Any, state: Any) -> dict[str, Any]:
        if not pz.has_arrays(f):
            return {}
        return {
            "params": None if params is None else params.get(str(i)),
            "state": None if state is None else state.get(str(i)),
        }

    def _hooks(self, find: Callable[[Any], Any], what: str) -> list[Callable[..., Any]]:
        fns = [find(f) for f in self.factors]
        missing = [pz.display_name(f) for f, fn in zip(self.factors, fns) if fn is None]
        if missing:
            raise AttributeError(
                f"{_OWNER} has `{what}` only when every factor has it; {missing} do not."
            )
        return fns

    # ----- the parametrization ------------------------------------------------------------
    @property
    def init(self) -> Callable[[jax.Array, jax.Array], tuple[Any, Any]]:
        """``init(value, key) -> (params, state)``: each factor's ``init`` on its block (with
        its own key), kept under the factor's index. Present only when a factor has ``init``."""
        if not self._has_arrays:
            raise AttributeError(f"{_OWNER} has `init` only when one of its factors has one.")
        return self._init

    def _init(self, value: jax.Array, key: jax.Array) -> tuple[Any, Any]:
        blocks = self._blocks(value)
        keys = jax.random.split(key, len(self.factors))
        params, state = {}, {}
        for i, (f, block) in enumerate(zip(self.factors, blocks)):
            fn = pz.init_fn(f)
            if fn is None:
                continue
            p, s = _pair(fn(block, keys[i]), "init", f)
            if p is not None:
                params[str(i)] = p
            if s is not None:
                state[str(i)] = s
        return params or None, state or None

    def forward(self, *originals: jax.Array, params: Any = None, state: Any = None) -> jax.Array:
        outs = []
        for i, (f, xs) in enumerate(zip(self.factors, self._group(originals))):
            outs.append(pz.forward_fn(f)(*xs, **self._kwargs(f, i, params, state)))
        return jnp.concatenate(outs, axis=self.axis)

    def right_inverse(self, value: jax.Array, *, params: Any = None, state: Any = None) -> Any:
        """Each factor's ``right_inverse`` on its block; the originals of all factors, in order
        (and, when a factor has ``init``, the new state)."""
        numerics.check_dtype(value, _OWNER)
        groups: list[tuple[Any, ...]] = []
        new_state: dict[str, Any] = {}
        blocks = self._blocks(value)
        for i, (f, block, n) in enumerate(zip(self.factors, blocks, self._counts())):
            fn = pz.right_inverse_fn(f)
            kw = self._kwargs(f, i, params, state)
            out, s = block, kw.get("state")
            if fn is not None:
                try:
                    out = fn(block, **kw)
                except NotImplementedError:  # as torch: the block itself is the original
                    out = block
                else:
                    if kw:
                        out, s_new = _pair(out, "right_inverse", f)
                        s = s if s_new is None else s_new
            if s is not None:
                new_state[str(i)] = s
            xs = _as_tuple(out)
            if len(xs) != n:
                raise ValueError(
                    f"{_OWNER}: the right_inverse of factor {i} ({pz.display_name(f)}) returned "
                    f"{len(xs)} originals, but its forward takes {n} positional originals. A "
                    f"factor with several originals must name each as a positional parameter "
                    f"of its forward."
                )
            groups.append(xs)
        originals = self._pack(groups, blocks)
        if self._has_arrays:
            return originals, new_state or None
        return originals

    def check_value(self, value: jax.Array, *, batch_axes: int | None = None) -> None:
        """Runs each factor's ``check_value`` on its block of a concrete ``value`` (a stack's
        leading axes included); a refusal names the block. Does nothing for a traced value.

        ``batch_axes`` (how many leading axes are a stack; the core passes it) goes on to a
        factor whose ``check_value`` takes it, so a factor counting axes from the front
        (``Ordered(axis=0)``) checks each tensor of the stack, not along the stack."""
        if isinstance(value, jax.core.Tracer | jax.ShapeDtypeStruct):
            return
        numerics.check_dtype(value, _OWNER)
        blocks = self._blocks(value)
        bounds = self._bounds(value.shape)
        for i, (f, block, (a, b)) in enumerate(zip(self.factors, blocks, bounds)):
            fn = getattr(f, "check_value", None)
            if not (callable(fn) and callable(getattr(f, "forward", None))):
                continue
            try:
                if batch_axes is not None and checks.takes_batch_axes(fn):
                    fn(block, batch_axes=batch_axes)
                else:
                    fn(block)
            except ValueError as e:
                raise ValueError(
                    f"{_OWNER}: block {i} (entries {a}:{b} along axis {self.axis}, factor "
                    f"{pz.display_name(f)}): {e}"
                ) from e

    # ----- the constraint protocol (paramx._src.core.manifold) -----------------------------
    @property
    def update_base(self) -> Callable[..., Any]:
        """``update_base(*originals, params=, state=)``: re-centres every factor that has an
        ``update_base`` (the value is kept); the others' originals are unchanged. Present when
        one factor has it."""
        if not any(manifold.update_base_fn(f) for f in self.factors):
            raise AttributeError(f"{_OWNER} has `update_base` only when a factor has one.")
        return self._update_base

    def _update_base(self, *originals: jax.Array, params: Any = None, state: Any = None) -> Any:
        new: list[tuple[Any, ...]] = []
        new_state = dict(state or {})
        groups = self._group(originals)
        for i, (f, xs) in enumerate(zip(self.factors, groups)):
            fn = manifold.update_base_fn(f)
            if fn is None:
                new.append(xs)
                continue
            kw = self._kwargs(f, i, params, state)
            if kw:
                out, s = _pair(fn(*xs, **kw), "update_base", f)
                if s is not None:
                    new_state[str(i)] = s
            else:
                out = fn(*xs)
            new.append(_as_tuple(out))
        # Packed again as registration packed them (each group keeps its shapes).
        packed = self._pack(new, [xs[0] for xs in groups]) if len(originals) == 1 else None
        out_originals = packed if packed is not None else tuple(x for xs in new for x in xs)
        if self._has_arrays:
            return out_originals, new_state or None
        return out_originals

    @property
    def sample(self) -> Callable[..., jax.Array]:
        """``sample(key, shape, dtype=float32)``: independent draws of the factors on their
        blocks, concatenated (each factor's own distribution; leading axes of ``shape`` are a
        batch, as for the factors). Present when every factor has ``sample``.

        Examples:
          >>> import jax
          >>> from paramx._src.parametrizations.product import Product
          >>> from paramx._src.parametrizations.positive import Positive
          >>> from paramx._src.parametrizations.sphere import Sphere
          >>> p = Product((Sphere(axis=-2), Positive()), sizes=(2, 1))
          >>> w = p.sample(jax.random.key(0), (4, 3))
          >>> bool(p.in_manifold(w)), w.shape
          (True, (4, 3))
        """
        fns = self._hooks(manifold.sample_fn, "sample")

        def sample(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
            shape = tuple(shape)
            numerics.check_dtype(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), _OWNER)
            keys = jax.random.split(key, len(fns))
            parts = [fn(k, s, dtype) for fn, k, s in zip(fns, keys, self._block_shapes(shape))]
            return jnp.concatenate(parts, axis=self.axis)

        return sample

    @staticmethod
    def _per_matrix(r: jax.Array, batch: tuple[int, ...], reduce: Callable[..., Any]) -> Any:
        """A factor's per-slice result as one value per matrix of ``batch``: reduced over the
        axes after the batch, or, if its leading axes are not the batch, over all of them."""
        r = jnp.asarray(r)
        if r.shape[: len(batch)] != batch:
            return jnp.broadcast_to(reduce(r, axis=tuple(range(r.ndim))), batch)
        return reduce(r, axis=tuple(range(len(batch), r.ndim)))

    @property
    def in_manifold(self) -> Callable[..., jax.Array]:
        """``in_manifold(x, atol=None)``: whether every block is in its factor's set (each with
        ``atol``, default its factor's own); one bool per matrix in the last two axes. Present
        when every factor has ``in_manifold``."""
        fns = self._hooks(manifold.in_manifold_fn, "in_manifold")

        def in_manifold(x: jax.Array, atol: float | jax.Array | None = None) -> jax.Array:
            batch = tuple(x.shape[:-2])
            out = jnp.ones(batch, bool)
            for fn, block in zip(fns, self._blocks(x)):
                r = fn(block) if atol is None else fn(block, atol)
                out = out & self._per_matrix(r, batch, jnp.all)
            return out

        return in_manifold

    @property
    def distance(self) -> Callable[..., jax.Array]:
        """``distance(x)``: the Frobenius distance to the product set, the square root of the
        sum of the factors' squared distances; one per matrix in the last two axes. Present
        when every factor has ``distance``."""
        fns = self._hooks(manifold.distance_fn, "distance")

        def distance(x: jax.Array) -> jax.Array:
            batch = tuple(x.shape[:-2])
            total = jnp.zeros(batch, numerics.compute_dtype(jnp.finfo(x.dtype).dtype))
            for fn, block in zip(fns, self._blocks(x)):
                d = jnp.abs(jnp.asarray(fn(block))).astype(total.dtype)
                total = total + self._per_matrix(d**2, batch, jnp.sum)
            return jnp.sqrt(total)

        return distance

    # ----- paramx.nnx: its function (paramx._src.integrations.nnx.wrappers) ---------------
    torch_function = "product"
    torch_function_positional = ()
    torch_function_keyword = ("factors", "sizes", "axis")
    torch_function_takes_key = False
    nnx_doc = """Splits ``module.<name>`` along an axis into blocks, each under its own
    constraint, in place.

    Registers :class:`paramx.constraints.Product`: factor ``i`` constrains the ``sizes[i]``
    entries of block ``i`` along ``axis`` (default ``-1``: the output units of an
    ``nnx.Linear`` kernel ``(in, out)``), and the value is the blocks' values side by side.
    Registration and assignment run each factor's ``right_inverse`` on its block; a block a
    factor refuses is refused, naming the block.

    Args:
      module: The module (``nnx.Linear``, ``nnx.Conv``, ...).
      name: The attribute to constrain.
      factors: The parametrizations, one per block.
      sizes: The entries along ``axis`` of each block (one may be ``None``: the rest).
      axis: The negative axis to split along.
      batch_axes: Leading stack axes of an already-stacked module (``nnx.vmap``).

    Returns:
      ``module``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> import paramx.nnx as pnx
      >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> layer.kernel[...] = jnp.abs(layer.kernel[...]) + 0.1
      >>> layer = pnx.product(layer, factors=(px.constraints.Sphere(axis=-2),
      ...                 px.constraints.Positive()), sizes=(2, None))
      >>> k = layer.kernel
      >>> bool(jnp.allclose(jnp.linalg.norm(k[:, :2], axis=0), 1.0)), bool(jnp.all(k > 0))
      (True, True)
    """


def product(
    tree: Any,
    where: Any,
    factors: Sequence[Any],
    sizes: Sequence[int | None],
    *,
    axis: int = -1,
    batch_axes: int = 0,
) -> Any:
    """Registers :class:`Product`: the selected tensors are split along ``axis`` into blocks of
    ``sizes`` entries, block ``i`` constrained by ``factors[i]``.

    Args:
      tree: The tree to register on.
      where: A path, a tuple of keys, or a predicate over key paths.
      factors: The parametrizations, one per block, in order along the axis.
      sizes: The entries along ``axis`` of each block (positive ints; one may be ``None``,
        the rest).
      axis: The negative axis to split along (default ``-1``: a Dense kernel's output units).
      batch_axes: How many leading axes index a stack of independent tensors (an
        ``nn.scan`` / ``nn.vmap`` stack). See :func:`paramx.register_parametrization`.

    Returns:
      The new tree.

    Raises:
      ValueError: If ``sizes`` do not fit a selected tensor, or a factor refuses its block
        (the message names the block and the path).
      TypeError: If an option has the wrong type, or a factor is not a parametrization.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import paramx as px
      >>> from paramx._src.parametrizations.product import product
      >>> from paramx._src.parametrizations.positive import Positive
      >>> from paramx._src.parametrizations.special_orthogonal import SpecialOrthogonal
      >>> kernel = jnp.concatenate([jnp.eye(3), jnp.ones((3, 2))], axis=-1)
      >>> tree = product({"kernel": kernel}, "kernel", (SpecialOrthogonal(), Positive()), (3, 2))
      >>> bool(jnp.allclose(px.materialize(tree)["kernel"], kernel))
      True
      >>> tree["kernel"].state["0"]["0"]["base"].shape  # factor 0's base, under its index
      (3, 3)
    """
    from paramx._src.core.register import register_parametrization

    p = Product(tuple(factors), tuple(sizes), axis)
    return register_parametrization(tree, where, p, batch_axes=batch_axes)
