"""The conformance suite: every parametrization passes the same checks, with no special cases.

Every parametrization class that paramx exports is found by `exported_parametrizations`
(conftest.py) and checked with its default options, on a value in the image of its own
`forward`; a new built-in is covered without touching this file. Options and the toy
parametrizations of the core tests are added as explicit `Case`s. Each check registers the
parametrization on a small tree, then: materializes under jit, keeps shape and dtype (float32,
float64, bfloat16), gives back the registered value when `right_inverse` is exact, has finite
gradients, vmaps, and keeps state out of the gradient.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toys
from conftest import assert_close, exported_parametrizations, suitable_shape

import paramx as px

XDIST_SPLIT = "case"  # conftest.py: how xdist may spread this file over workers

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    parametrization: Any
    sample: Callable[[jax.Array, tuple, Any], jax.Array]  # a value in the image of forward
    shape: tuple = (4, 4)
    exact_inverse: bool = True
    dtypes: tuple = tuple(DTYPES)
    # The inverse is exact in exact arithmetic; bf16 rounding may cost a few ulps more.
    scale: float = 1.0


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _uniform(lo, hi):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(
        dtype
    )


def _sym_sample(key, shape, dtype):
    x = _normal(key, shape, dtype)
    return x + jnp.swapaxes(x, -1, -2)


def _skew_sample(key, shape, dtype):
    x = _normal(key, shape, dtype)
    return x - jnp.swapaxes(x, -1, -2)


def _rank_one_sample(key, shape, dtype):
    ka, kb = jax.random.split(key)
    a = jax.random.uniform(ka, shape[:-1], jnp.float32, 0.5, 1.5)
    b = jax.random.uniform(kb, shape[:-2] + shape[-1:], jnp.float32, 0.5, 1.5)
    a, b = a.astype(dtype), b.astype(dtype)
    b = b / b[..., :1]
    return a[..., :, None] * b[..., None, :]


def _orthogonal_sample(key, shape, dtype):
    work = jnp.float32 if dtype == jnp.bfloat16 else dtype
    x = jax.random.normal(key, shape, jnp.float32).astype(work)
    flip = shape[-2] <= shape[-1]
    t = jnp.swapaxes(x, -1, -2) if flip else x
    q, r = jnp.linalg.qr(t)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    return (jnp.swapaxes(q, -1, -2) if flip else q).astype(dtype)


def _image_of(p):
    """Samples in the image of ``p``'s forward: the value of a random tensor registered with
    ``p``, computed in float32 (or float64) and then rounded to the dtype."""

    def sample(key, shape, dtype):
        work = jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype
        x = jax.random.normal(key, shape, jnp.float32).astype(work)
        if callable(getattr(p, "sample", None)):  # a point of the set (positive, ordered, ...)
            x = p.sample(key, shape, work)
        tree = px.register_parametrization({"w": x}, "w", p, key=jax.random.fold_in(key, 1))
        return px.materialize(tree)["w"].astype(dtype)

    return sample


def _default_case(cls):
    """The conformance case of an exported class with its default options. A parametrization
    that updates its state as it trains (spectral norm's power iteration) cannot give back the
    registered value exactly, so only its shape and dtype are checked there; nor can one that
    declares ``right_inverse_exact = False`` (an initialization, not an inverse: SOC, BCOP)."""
    p = cls()
    exact = getattr(p, "update_state", None) is None and getattr(p, "right_inverse_exact", True)
    shape = suitable_shape(p)
    return Case(f"{cls.__name__}-default", p, _image_of(p), shape, exact_inverse=exact, scale=20)


EXPORTED = exported_parametrizations()

BUILTINS = (
    [_default_case(cls) for cls in EXPORTED]
    + [
        Case(
            f"orthogonal-{m}-{'x'.join(map(str, shape))}",
            px.Orthogonal(m),
            _orthogonal_sample,
            shape,
            scale=20,
        )
        for m in ("matrix_exp", "cayley", "householder")
        for shape in ((4, 4), (5, 3), (3, 5), (2, 4, 3))
    ]
    + [
        Case(
            "orthogonal-householder-notriv",
            px.Orthogonal("householder", False),
            _orthogonal_sample,
            (5, 3),
            scale=20,
        ),
        Case("spectral_norm-conv", px.SpectralNorm(2), _normal, (3, 3, 2, 4), exact_inverse=False),
        Case("spectral_norm-vector", px.SpectralNorm(), _normal, (6,), exact_inverse=False),
        Case("weight_norm-whole", px.WeightNorm(None), _normal, (2, 3, 4), scale=4),
    ]
)

# Catalogue classes that need an option (a rank, a bound) have no default case: one each here.
OPTIONED = [
    Case("low_rank-2", px.constraints.LowRank(2), None, (5, 3), scale=20),
    Case("fixed_rank-2", px.constraints.FixedRank(2), None, (3, 5), scale=20),
    Case("psd_fixed_rank-2", px.constraints.PositiveSemidefiniteFixedRank(2), None, scale=20),
    Case("almost_orthogonal-0.1", px.constraints.AlmostOrthogonal(0.1), None, scale=20),
]
OPTIONED = [dataclasses.replace(c, sample=_image_of(c.parametrization)) for c in OPTIONED]

CASES = [
    *BUILTINS,
    *OPTIONED,
    Case("symmetric", toys.symmetric, _sym_sample),
    Case("symmetric-batched", toys.symmetric, _sym_sample, shape=(2, 3, 3)),
    Case("skew", toys.skew, _skew_sample),
    Case("positive", toys.positive, _uniform(0.5, 3.0), shape=(5,), scale=4.0),
    Case("rank_one", toys.rank_one, _rank_one_sample, shape=(3, 4), scale=4.0),
    Case("scale", toys.Scale(), _normal, shape=(3, 2)),
    Case("running_max", toys.RunningMax(), _normal, shape=(6,)),
    Case("forward_only", toys.forward_only, _normal, shape=(2, 3), exact_inverse=False),
]

PARAMS = [
    pytest.param(case, dtype, id=f"{case.name}-{jnp.dtype(dtype).name}")
    for case in CASES
    for dtype in case.dtypes
]


def test_discovery_finds_the_builtins():
    # The discovery itself can fail: it must at least see the three torch parametrizations.
    assert {px.Orthogonal, px.SpectralNorm, px.WeightNorm} <= set(EXPORTED)
    assert px.Parametrization not in EXPORTED and px.Parametrized not in EXPORTED
    assert {c.parametrization.__class__ for c in BUILTINS} >= set(EXPORTED)


# One compiled program per case and dtype runs every check's computation (materialize, the
# per-example vmap, the gradient to the originals, the state update and the gradient through
# the state); the four tests below read its outputs, so a case compiles once, not five times.
def _probe_loss(params, state, probe):
    w = px.materialize(params, state)["layer"]["w"]
    return jnp.sum((w * probe).astype(jnp.float32))


def _through_state(params, state):
    _, s = px.materialize(params, state, update_state=True)
    leaves = jax.tree_util.tree_leaves(s)
    return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32))


@jax.jit
def _all_checks(tree, stacked, probe):
    params, state = px.split_state(tree)
    return {
        "value": px.materialize(tree),
        "stacked": jax.vmap(px.materialize)(stacked),
        "grads": jax.grad(_probe_loss)(params, state, probe),
        "new_state": px.materialize(params, state, update_state=True)[1],
        "through_state": jax.grad(_through_state)(params, state),
    }


def _registered(case, dtype, key):
    value = case.sample(key, case.shape, dtype)
    tree = {"layer": {"w": value, "b": jnp.zeros((2,), dtype)}}
    return value, px.register_parametrization(tree, "layer/w", case.parametrization)


_RESULTS: dict[tuple[str, str], Any] = {}


def _checked(case, dtype):
    """The registered value, tree, three stacked trees and ``_all_checks``'s outputs."""
    id_ = (case.name, jnp.dtype(dtype).name)
    if id_ not in _RESULTS:
        key = jax.random.key(0)
        value, tree = _registered(case, dtype, key)
        trees = [_registered(case, dtype, k)[1] for k in jax.random.split(key, 3)]
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
        probe = jax.random.normal(jax.random.key(1), case.shape, jnp.float32).astype(dtype)
        out = _all_checks(tree, stacked, probe)
        singles = [_all_checks(t, stacked, probe)["value"] for t in trees]
        _RESULTS[id_] = (value, tree, out, singles)
    return _RESULTS[id_]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_materialize_under_jit_keeps_shape_dtype_and_value(case, dtype):
    value, _, out, _ = _checked(case, dtype)
    w = out["value"]["layer"]["w"]
    assert w.shape == value.shape
    assert w.dtype == jnp.dtype(dtype)
    assert out["value"]["layer"]["b"].dtype == jnp.dtype(dtype)
    if case.exact_inverse:
        assert_close(w, value, dtype, scale=case.scale)


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_gradients_are_finite_and_reach_originals(case, dtype):
    _, tree, out, _ = _checked(case, dtype)
    node = out["grads"]["layer"]["w"]
    assert isinstance(node, px.Parametrized)
    for g, o in zip(node.originals, tree["layer"]["w"].originals):
        assert g.shape == o.shape and g.dtype == o.dtype
        assert np.all(np.isfinite(np.asarray(g, np.float64)))
    total = sum(float(jnp.sum(jnp.abs(g.astype(jnp.float32)))) for g in node.originals)
    assert total > 0, "no gradient reached the originals"
    for leaf in jax.tree_util.tree_leaves(node.params):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_vmap_matches_per_example(case, dtype):
    _, _, out, singles = _checked(case, dtype)
    for i, single in enumerate(singles):  # per tensor, by the same compiled program
        assert_close(out["stacked"]["layer"]["w"][i], single["layer"]["w"], dtype)


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_state_update_keeps_structure_and_blocks_gradient(case, dtype):
    _, tree, out, _ = _checked(case, dtype)
    state = px.split_state(tree)[1]
    new_state = out["new_state"]
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype
    for g in jax.tree_util.tree_leaves(out["through_state"]):
        assert not np.any(np.asarray(g, np.float64)), "gradient flowed through state"


# ----- the constraint protocol: sample, in_manifold, distance, update_base ---------------------
# Checked on every exported parametrization that declares the method (paramx/_src/core/manifold.py).
def _declares(cls, name):
    return callable(getattr(cls, name, None))


SAMPLERS = [cls for cls in EXPORTED if _declares(cls, "sample")]
RECENTRED = [cls for cls in EXPORTED if _declares(cls, "update_base")]


def test_the_protocol_is_declared_somewhere():
    # So that the tests below can fail: an empty list would make them vacuous.
    assert px.constraints.Symmetric in SAMPLERS and px.Orthogonal in RECENTRED


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_samples_lie_in_the_set_and_right_inverse_is_exact_on_them(cls, dtype):
    p = cls()
    shape = (3, *suitable_shape(p))  # a batch of three
    x = p.sample(jax.random.key(0), shape, dtype)
    assert x.shape == shape and x.dtype == dtype
    if _declares(cls, "in_manifold"):
        assert bool(jnp.all(p.in_manifold(x)))
    if _declares(cls, "distance"):
        assert float(jnp.max(p.distance(x))) <= 10 * shape[-1] * jnp.finfo(dtype).eps * 10
    node = px.tensor.register(x, p, batch_axes=1)
    assert_close(px.tensor.materialize(node), x, scale=10)
    # The sampler is an nn.initializers-style function too.
    w = px.sampler(p)(jax.random.key(1), shape[1:], dtype)
    assert w.shape == shape[1:] and w.dtype == dtype


@pytest.mark.parametrize(
    "cls", [c for c in SAMPLERS if _declares(c, "in_manifold")], ids=lambda c: c.__name__
)
def test_in_manifold_can_say_no(cls):
    # Points near a sample, its negation, and the sample with its first row negated: an open
    # set (GL+) holds most small perturbations, so one fixed perturbation is not enough.
    p = cls()
    shape = suitable_shape(p)
    x = p.sample(jax.random.key(0), shape, jnp.float64)
    candidates = [
        x + 0.5 * jax.random.normal(jax.random.key(1), shape, jnp.float64),
        -x,
        x.at[0].multiply(-1.0),
    ]
    refused = [c for c in candidates if not bool(p.in_manifold(c))]
    assert refused, "in_manifold accepted every point offered"
    if _declares(cls, "distance"):
        assert all(float(p.distance(c)) > 1e-3 for c in refused)


@pytest.mark.parametrize("cls", RECENTRED, ids=lambda c: c.__name__)
def test_update_base_keeps_the_value(cls):
    p = cls()
    shape = suitable_shape(p, ((4, 4), (5, 3)))
    x = p.sample(jax.random.key(0), shape, jnp.float64) if _declares(cls, "sample") else None
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64) if x is None else x
    node = px.tensor.register(x, p)
    moved = node.replace(
        originals=tuple(
            o + 0.2 * jax.random.normal(jax.random.key(2), o.shape, o.dtype) for o in node.originals
        )
    )
    before = px.tensor.materialize(moved)
    tree = px.update_base({"w": moved})
    assert_close(px.materialize(tree)["w"], before, scale=100)
    params, state = px.split_state({"w": moved})
    params2, state2 = px.update_base(params, state=state)
    assert_close(px.materialize(params2, state2)["w"], before, scale=100)
