"""Property-based tests of the tree API (issue 11): random trees, dtypes and operation sequences.

Trees mix dicts, lists, tuples, FrozenDicts and ``None`` leaves, with odd keys (``/``, empty,
spaces, unicode). Leaves have float, int, bool, low-precision and complex dtypes and zero-size
shapes. A random sequence of register / chain / assign / remove / materialize / split / merge /
transfer / serialize runs on them, and after every step:

* the input tree is unchanged (also when the step raised);
* an error is one of the documented types and names the path it concerns;
* values round-trip (registration with an exact right_inverse keeps the value);
* finite input gives finite output;
* structure and dtypes are those of the plain tree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax.core import FrozenDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paramx as px

# ----- parametrizations used: elementwise, so any shape and float dtype fits ----------------------


def _double(x):
    return x * 2


def _halve(y):
    return y / 2


double = px.Parametrization(forward=_double, right_inverse=_halve, name="double")


def _shift(x):
    return x + 1


def _unshift(y):
    return y - 1


shift = px.Parametrization(forward=_shift, right_inverse=_unshift, name="shift")


def _sum_pair(a, b):
    return a + b


def _split_pair(y):
    return (y / 2, y / 2)


pair = px.Parametrization(forward=_sum_pair, right_inverse=_split_pair, name="pair")

CHAINABLE = (double, shift)
FIRST = (double, shift, pair)
ERRORS = (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError)

# ----- random trees ------------------------------------------------------------------------------

DTYPES = (
    jnp.float32,
    jnp.float64,
    jnp.bfloat16,
    jnp.float16,
    jnp.int32,
    jnp.bool_,
    jnp.complex64,
)
keys = st.text(alphabet="ab/~ _é0", min_size=0, max_size=4)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).uniform(-2, 2, size=shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * x[::-1] if x.ndim else x + 0.5j
    return jnp.asarray(x).astype(dtype)


def trees(max_leaves=6):
    leaf = st.one_of(arrays(), st.none())
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.dictionaries(keys, children, min_size=1, max_size=3).map(FrozenDict),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        ),
        max_leaves=max_leaves,
    ).map(lambda t: {"root": t})


# ----- helpers -----------------------------------------------------------------------------------


def snapshot(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [np.array(x) for x in leaves]


def assert_unchanged(tree, snap):
    treedef, values = snap
    leaves, now = jax.tree_util.tree_flatten(tree)
    assert now == treedef, "the input tree's structure changed"
    for a, b in zip(leaves, values):
        np.testing.assert_array_equal(np.array(a), b)


def plain_paths(tree):
    """Key tuples of the array leaves (parametrized tensors included) of a tree."""
    return [
        px.path_keys(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, px.Parametrized)
        )[0]
    ]


def shown(keys_):
    if any("/" in str(k) or k == "" for k in keys_):
        return repr(tuple(keys_))
    return "/".join(map(str, keys_))


def leaf_at(tree, keys_):
    for k in keys_:
        tree = tree[k]
    return tree


def is_float(x):
    return jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)


def tolerance(dtype):
    return {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-3}.get(jnp.dtype(dtype), 1e-5)


def check_error(err, keys_):
    assert isinstance(err, ERRORS), f"unexpected error type {type(err).__name__}: {err}"
    message = str(err)
    assert shown(keys_) in message, f"the error does not name the path {shown(keys_)}: {message}"


def check_plain(plain, reference):
    """The materialized tree has the plain tree's structure and dtypes, and is finite."""
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(reference)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(reference)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if is_float(b) and bool(jnp.all(jnp.isfinite(b))):
            assert bool(jnp.all(jnp.isfinite(a))), "finite input gave a non-finite value"


OPS = ("register", "chain", "assign", "remove", "materialize", "split", "transfer", "serialize")

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: CI stays reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(reference=trees(), data=st.data())
def test_random_operation_sequences_keep_every_invariant(reference, data):
    tree = reference
    expected = {}  # key tuple -> value the parametrized tensor must have
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        op = data.draw(st.sampled_from(OPS), label="op")
        candidates = plain_paths(tree)
        if not candidates:
            return
        keys_ = data.draw(st.sampled_from(candidates), label="path")
        where = keys_ if data.draw(st.booleans(), label="tuple") else shown(keys_)
        if where.__class__ is str and where.startswith("("):
            where = keys_
        snap = snapshot(tree)
        node = leaf_at(tree, keys_)
        parametrized = isinstance(node, px.Parametrized)
        try:
            if op == "register" and not parametrized:
                p = data.draw(st.sampled_from(FIRST), label="p")
                new = px.register_parametrization(tree, where, p)
                expected[keys_] = node
            elif op in ("register", "chain") and parametrized:
                p = data.draw(st.sampled_from(CHAINABLE), label="p")
                new = px.register_parametrization(tree, where, p)
                if keys_ in expected:  # torch: the new link runs on the current value
                    expected[keys_] = p.forward(leaf_at(px.materialize(tree), keys_))
            elif op == "assign" and parametrized:
                value = px.materialize(tree)
                value = leaf_at(value, keys_)
                new = px.assign(tree, where, value)
            elif op == "remove" and parametrized:
                new = px.remove_parametrizations(tree, where)
                expected.pop(keys_, None)
            elif op == "materialize":
                check_plain(px.materialize(tree), reference)
                new = tree
            elif op == "split":
                params, state = px.split_state(tree)
                new = px.merge_state(params, state)
                assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(tree)
            elif op == "transfer":
                new = px.transfer_parametrizations_and_params(tree, reference)
                assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(tree)
            elif op == "serialize":
                new = serialization.from_bytes(tree, serialization.to_bytes(tree))
                for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(tree)):
                    np.testing.assert_array_equal(np.array(a), np.array(b))
            else:
                continue
        except ERRORS as err:
            assert_unchanged(tree, snap)
            check_error(err, keys_)
            continue
        assert_unchanged(tree, snap)
        tree = new
        plain = px.materialize(tree)
        check_plain(plain, reference)
        for k, value in expected.items():
            if isinstance(leaf_at(tree, k), px.Parametrized) and is_float(value):
                got = leaf_at(plain, k)
                tol = tolerance(value.dtype) * 10  # a chain of a few elementwise maps
                np.testing.assert_allclose(
                    np.asarray(
                        got.astype(jnp.complex128 if jnp.iscomplexobj(got) else jnp.float64)
                    ),
                    np.asarray(
                        value.astype(got.dtype).astype(
                            jnp.complex128 if jnp.iscomplexobj(got) else jnp.float64
                        )
                    ),
                    atol=tol * 8,
                    rtol=tol,
                )


def _builtin_cases():
    return st.sampled_from(
        [
            ("orthogonal", lambda t, w: px.orthogonal(t, w)),
            ("cayley", lambda t, w: px.orthogonal(t, w, "cayley")),
            ("householder", lambda t, w: px.orthogonal(t, w, "householder")),
            ("spectral_norm", lambda t, w: px.spectral_norm(t, w)),
            ("weight_norm", lambda t, w: px.weight_norm(t, w)),
        ]
    )


@SETTINGS
@given(
    x=arrays(),
    case=_builtin_cases(),
    key=st.sampled_from(["kernel", "a/b", ""]),
)
def test_builtins_on_random_arrays_give_a_right_value_or_a_clear_error(x, case, key):
    name, register = case
    tree = {"layer": {key: x}}
    keys_ = ("layer", key)
    snap = snapshot(tree)
    try:
        registered = register(tree, keys_)
    except ERRORS as err:
        assert_unchanged(tree, snap)
        check_error(err, keys_)
        return
    assert_unchanged(tree, snap)
    assert is_float(x), f"{name} accepted a {x.dtype} tensor"
    params, state = px.split_state(registered)
    plain = px.materialize(params, state)
    check_plain(plain, tree)
    grads = jax.grad(lambda p: jnp.sum(jnp.abs(leaf_at(px.materialize(p, state), keys_)) ** 2))(
        params
    )
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))), f"{name}: non-finite gradient"


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_a_non_float_leaf_in_a_random_tree_is_refused_with_its_path(dtype):
    tree = {"a/b": {"k": jnp.ones((2, 2), dtype)}}
    with pytest.raises(ERRORS, match=r"\('a/b', 'k'\)"):
        px.spectral_norm(tree, ("a/b", "k"))
