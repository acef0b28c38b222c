"""register_parametrization: paths, right_inverse initialization, chaining, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toys
from conftest import assert_close

import paramx as px


def _tree():
    return {
        "params": {
            "Dense_0": {
                "kernel": jnp.arange(9.0, dtype=jnp.float32).reshape(3, 3),
                "bias": jnp.ones(3, jnp.float32),
            },
            "Dense_1": {"kernel": jnp.ones((3, 2), jnp.float32), "bias": jnp.zeros(2, jnp.float32)},
        },
        "batch_stats": {"mean": jnp.zeros(3, jnp.float32)},
    }


def _snapshot(tree):
    """Structure plus leaf identities, to prove a tree was not touched."""
    leaves, treedef = jax.tree_util.tree_flatten(
        tree, is_leaf=lambda x: isinstance(x, px.Parametrized)
    )
    return treedef, [id(x) for x in leaves]


class Spy:
    """Records the calls of forward and right_inverse, in order."""

    def __init__(self):
        self.calls = []

    def parametrization(self, tag=""):
        def forward(x):
            self.calls.append("fwd" + tag)
            return x * 2

        def right_inverse(y):
            self.calls.append("inv" + tag)
            return y / 2

        return px.Parametrization(forward=forward, right_inverse=right_inverse, name="spy" + tag)


# --- addressing ----------------------------------------------------------------------------------
def test_string_tuple_and_predicate_select_the_same_leaf():
    tree = _tree()
    by_string = px.register_parametrization(
        tree, "params/Dense_0/kernel", toys.positive, unsafe=True
    )
    by_tuple = px.register_parametrization(
        tree, ("params", "Dense_0", "kernel"), toys.positive, unsafe=True
    )
    by_pred = px.register_parametrization(
        tree,
        lambda path, leaf: px.path_keys(path) == ("params", "Dense_0", "kernel"),
        toys.positive,
        unsafe=True,
    )
    for t in (by_string, by_tuple, by_pred):
        assert isinstance(t["params"]["Dense_0"]["kernel"], px.Parametrized)
        assert not px.is_parametrized(t, "params/Dense_1/kernel")
    assert jax.tree_util.tree_structure(by_string) == jax.tree_util.tree_structure(by_pred)


def test_predicate_registers_every_match():
    tree = _tree()
    is_kernel = lambda path, leaf: px.path_keys(path)[-1] == "kernel"
    out = px.register_parametrization(tree, is_kernel, toys.forward_only)
    assert px.is_parametrized(out, "params/Dense_0/kernel")
    assert px.is_parametrized(out, "params/Dense_1/kernel")
    assert not px.is_parametrized(out, "params/Dense_0/bias")


def test_no_substring_matching():
    tree = {"kernel_scale": jnp.ones(2), "kernel": jnp.ones(2), "Dense": {"my_kernel": jnp.ones(2)}}
    out = px.register_parametrization(tree, "kernel", toys.forward_only)
    assert px.is_parametrized(out, "kernel")
    assert not px.is_parametrized(out, "kernel_scale")
    assert not px.is_parametrized(out, "Dense/my_kernel")


def test_list_indices_and_keys_with_slashes():
    tree = {"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}], "a/b": jnp.ones(2)}
    out = px.register_parametrization(tree, "layers/1/w", toys.forward_only)
    assert isinstance(out["layers"][1]["w"], px.Parametrized)
    assert not px.is_parametrized(out["layers"][0])
    out = px.register_parametrization(tree, ("layers", 0, "w"), toys.forward_only)
    assert isinstance(out["layers"][0]["w"], px.Parametrized)
    out = px.register_parametrization(tree, ("a/b",), toys.forward_only)
    assert isinstance(out["a/b"], px.Parametrized)
    with pytest.raises(ValueError, match="No leaf at path 'a/b'"):
        px.register_parametrization(tree, "a/b", toys.forward_only)


def test_missing_path_lists_closest_paths():
    tree = _tree()
    with pytest.raises(ValueError) as err:
        px.register_parametrization(tree, "params/Dense_0/kernal", toys.forward_only)
    msg = str(err.value)
    assert "params/Dense_0/kernal" in msg
    assert "Closest existing paths: 'params/Dense_0/kernel'" in msg


def test_keys_of_another_type_are_named_not_listed_as_the_closest_path():
    # The int 0 where the tree has the string "0" was reported as "No leaf at path
    # 'layers/0/w'. Closest existing paths: 'layers/0/w'.": the path it said was missing.
    tree = {"layers": {"0": {"w": jnp.ones(2)}}}
    for fn in (
        lambda: px.register_parametrization(tree, ("layers", 0, "w"), toys.forward_only),
        lambda: px.tie({**tree, "v": jnp.ones(2)}, "v", ("layers", 0, "w")),
    ):
        with pytest.raises(ValueError, match=r"keys there are \('layers', '0', 'w'\)"):
            fn()
    # a string index names a list's subtree for tie's source as for selection
    listed = {"a": [{"x": jnp.ones(2)}], "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="'a/0' is a subtree"):
        px.tie(listed, "b", "a/0")


def test_subtree_path_and_empty_predicate_are_errors():
    tree = _tree()
    with pytest.raises(ValueError, match="is a subtree, not a leaf"):
        px.register_parametrization(tree, "params/Dense_0", toys.forward_only)
    with pytest.raises(ValueError, match="selected no leaf"):
        px.register_parametrization(tree, lambda p, x: False, toys.forward_only)


# --- right_inverse as the initialization transform -----------------------------------------------
def test_right_inverse_runs_at_registration_and_materialize_gives_back_the_value():
    tree = _tree()
    value = jnp.array([0.5, 1.0, 4.0], jnp.float32)
    tree["params"]["Dense_0"]["bias"] = value
    out = px.register_parametrization(tree, "params/Dense_0/bias", toys.positive)
    assert_close(px.originals(out, "params/Dense_0/bias")[0], toys._softplus_inv(value))
    assert_close(jax.jit(px.materialize)(out)["params"]["Dense_0"]["bias"], value)


def test_whole_variables_dict_keeps_structure_and_other_collections():
    tree = _tree()
    out = px.register_parametrization(tree, "params/Dense_1/kernel", toys.forward_only)
    assert out["batch_stats"]["mean"] is tree["batch_stats"]["mean"]
    plain = px.materialize(out)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(tree)


def test_several_originals_are_named_like_torch():
    z = jnp.outer(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 0.5]))
    out = px.register_parametrization({"w": z}, "w", toys.rank_one)
    node = out["w"]
    assert node.multi and len(node.originals) == 2
    names = [px.path_keys(p)[-1] for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    assert names == ["original0", "original1"]
    assert_close(px.materialize(out)["w"], z)
    with pytest.raises(AttributeError, match="read `.originals`"):
        _ = node.original


def test_sequence_of_length_one_gives_original0():
    p = px.Parametrization(forward=lambda a: a * 1, right_inverse=lambda y: [y])
    out = px.register_parametrization({"w": jnp.ones(2)}, "w", p)
    assert out["w"].multi and len(out["w"].originals) == 1
    names = [px.path_keys(p)[-1] for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    assert names == ["original0"]


def test_missing_or_unimplemented_right_inverse_is_identity_at_registration():
    def raises(y):
        raise NotImplementedError

    value = jnp.array([0.1, 0.2])
    for p in (toys.forward_only, px.Parametrization(forward=jnp.tanh, right_inverse=raises)):
        out = px.register_parametrization({"w": value}, "w", p)
        assert out["w"].original is value or np.array_equal(out["w"].original, value)


def test_parametrization_with_own_params_and_state():
    value = jnp.array([1.0, -4.0, 2.0], jnp.float32)
    out = px.register_parametrization({"w": value}, "w", toys.Scale(2.0))
    assert set(out["w"].params) == {"0"} and out["w"].state == {}
    assert_close(out["w"].original, value / 2)
    out = px.register_parametrization({"w": value}, "w", toys.RunningMax())
    assert out["w"].params == {} and float(out["w"].state["0"]) == 4.0
    assert_close(px.materialize(out)["w"], value)


def test_key_is_folded_per_leaf_and_reproducible():
    tree = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    out1 = px.register_parametrization(tree, lambda p, x: True, toys.RandomState())
    out2 = px.register_parametrization(tree, lambda p, x: True, toys.RandomState())
    out3 = px.register_parametrization(
        tree, lambda p, x: True, toys.RandomState(), key=jax.random.key(7)
    )
    sa, sb = out1["a"].state["0"], out1["b"].state["0"]
    assert not np.allclose(sa, sb), "two leaves got the same random state"
    assert np.array_equal(sa, out2["a"].state["0"]), "default key is not reproducible"
    assert not np.allclose(sa, out3["a"].state["0"]), "the key argument is ignored"


# --- chaining ------------------------------------------------------------------------------------
def test_call_order_matches_torch():
    spy = Spy()
    tree = {"w": jnp.ones(3)}
    out = px.register_parametrization(tree, "w", spy.parametrization("A"))
    assert spy.calls == ["invA", "fwdA"]
    spy.calls.clear()
    out = px.register_parametrization(out, "w", spy.parametrization("B"))
    assert spy.calls == ["fwdA", "fwdB", "invB"]  # current value, new forward, new right_inverse
    spy.calls.clear()
    px.register_parametrization(out, "w", spy.parametrization("C"), unsafe=True)
    assert spy.calls == []
    px.register_parametrization(tree, "w", spy.parametrization("D"), unsafe=True)
    assert spy.calls == ["invD"]


def test_chaining_does_not_reinitialize_the_original():
    value = jnp.array([0.5, 2.0], jnp.float32)
    once = px.register_parametrization({"w": value}, "w", toys.positive)
    twice = px.register_parametrization(once, "w", toys.forward_only)
    assert twice["w"].original is once["w"].original
    assert [p for p in twice["w"].chain] == [toys.positive, toys.forward_only]
    assert_close(px.materialize(twice)["w"], jnp.tanh(value))


def test_unsafe_is_sticky():
    out = px.register_parametrization({"w": jnp.ones(2)}, "w", toys.forward_only, unsafe=True)
    out = px.register_parametrization(out, "w", toys.forward_only)
    assert out["w"].unsafe


def test_stateful_link_appended_to_a_chain_initializes_on_the_current_value():
    value = jnp.array([1.0, -3.0], jnp.float32)
    out = px.register_parametrization({"w": value}, "w", toys.Scale(2.0))
    out = px.register_parametrization(out, "w", toys.RunningMax())
    assert set(out["w"].params) == {"0"} and set(out["w"].state) == {"1"}
    assert float(out["w"].state["1"]) == 3.0  # max |current value|, not of the original
    assert_close(px.materialize(out)["w"], value / 3.0)


# --- errors --------------------------------------------------------------------------------------
def _raises_and_keeps(tree, match, *args, exc=ValueError, **kwargs):
    before = _snapshot(tree)
    with pytest.raises(exc, match=match):
        px.register_parametrization(tree, *args, **kwargs)
    assert _snapshot(tree) == before


def test_shape_and_dtype_changes_need_unsafe():
    tree = _tree()
    widen = lambda x: jnp.concatenate([x, x], axis=-1)
    to_f16 = lambda x: x.astype(jnp.float16)
    _raises_and_keeps(
        tree, "may not change the shape.*params/Dense_0/kernel", "params/Dense_0/kernel", widen
    )
    _raises_and_keeps(tree, "may not change the dtype.*float16", "params/Dense_0/kernel", to_f16)
    out = px.register_parametrization(tree, "params/Dense_0/kernel", to_f16, unsafe=True)
    assert px.materialize(out)["params"]["Dense_0"]["kernel"].dtype == jnp.float16
    # the same checks on a link appended to a chain
    chained = px.register_parametrization(tree, "params/Dense_0/kernel", toys.forward_only)
    _raises_and_keeps(chained, "may not change the shape", "params/Dense_0/kernel", widen)
    _raises_and_keeps(chained, "may not change the dtype", "params/Dense_0/kernel", to_f16)


def test_forward_must_return_a_tensor():
    tree = _tree()
    pair = lambda x: (x, x)
    _raises_and_keeps(
        tree, "A parametrization must return a tensor. Got tuple", "params/Dense_0/bias", pair
    )
    chained = px.register_parametrization(tree, "params/Dense_0/bias", toys.forward_only)
    _raises_and_keeps(
        chained, "A parametrization must return a tensor", "params/Dense_0/bias", pair
    )


def test_bad_right_inverse_returns():
    tree = _tree()
    bad = lambda r: px.Parametrization(forward=lambda *x: x[0], right_inverse=r)
    _raises_and_keeps(
        tree,
        "must return a tensor or a sequence of tensors.*Got int",
        "params/Dense_0/bias",
        bad(lambda y: 3),
    )
    _raises_and_keeps(
        tree,
        "Got element 1 of the sequence with type str",
        "params/Dense_0/bias",
        bad(lambda y: (y, "no")),
    )
    # a single tensor may not change dtype, not even with unsafe=True
    cast = bad(lambda y: y.astype(jnp.float64))
    _raises_and_keeps(tree, "may not change the dtype", "params/Dense_0/bias", cast, unsafe=True)
    # a link appended to a chain must invert to one tensor of the same shape and dtype
    chained = px.register_parametrization(tree, "params/Dense_0/bias", toys.forward_only)
    _raises_and_keeps(
        chained,
        "parametrization.right_inverse must return a tensor",
        "params/Dense_0/bias",
        bad(lambda y: (y, y)),
    )
    _raises_and_keeps(
        chained,
        "parametrization.right_inverse may not change the dtype",
        "params/Dense_0/bias",
        cast,
    )
    _raises_and_keeps(
        chained,
        "parametrization.right_inverse may not change the shape",
        "params/Dense_0/bias",
        bad(lambda y: y[:1]),
    )


def test_non_array_leaf_and_non_parametrization_are_errors():
    tree = {"w": 1.5, "name": "dense"}
    _raises_and_keeps(tree, "is a float, not an array", "w", toys.forward_only)
    with pytest.raises(TypeError, match="must be a paramx.Parametrization"):
        px.register_parametrization({"w": jnp.ones(2)}, "w", 42)


def test_malformed_stateful_protocol_is_reported():
    class BadInit:
        def init(self, value, key):
            return {"a": value}

        def forward(self, x, *, params, state):
            return x

    class BadInverse:
        def init(self, value, key):
            return None, None

        def forward(self, x, *, params, state):
            return x

        def right_inverse(self, y, *, params, state):
            return y

    _raises_and_keeps({"w": jnp.ones(2)}, "must return a pair \\(params, state\\)", "w", BadInit())
    _raises_and_keeps(
        {"w": jnp.ones((2, 2))}, "must return a pair \\(originals, state\\)", "w", BadInverse()
    )


def test_registration_works_under_jit():
    @jax.jit
    def init_and_register(x):
        tree = px.register_parametrization({"w": x}, "w", toys.positive)
        return px.split_state(tree)[0]

    out = init_and_register(jnp.array([1.0, 2.0], jnp.float32))
    assert_close(px.materialize(out)["w"], jnp.array([1.0, 2.0]))
