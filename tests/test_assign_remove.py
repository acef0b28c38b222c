"""assign (torch's `module.weight = X`) and remove_parametrizations."""

import warnings

import jax
import jax.numpy as jnp
import pytest
import toys
from conftest import assert_close
from test_register import Spy, _snapshot

import paramx as px


def _registered():
    tree = {
        "params": {
            "w": jnp.array([[2.0, 1.0], [1.0, 3.0]], jnp.float32),
            "b": jnp.ones(2, jnp.float32),
        }
    }
    return px.register_parametrization(tree, "params/w", toys.symmetric)


# --- assign --------------------------------------------------------------------------------------
def test_assign_round_trips_and_leaves_the_input():
    tree = _registered()
    before = _snapshot(tree)
    value = jnp.array([[1.0, -2.0], [-2.0, 5.0]], jnp.float32)
    out = px.assign(tree, "params/w", value)
    assert_close(px.materialize(out)["params"]["w"], value)
    assert _snapshot(tree) == before


def test_assign_runs_right_inverses_in_reverse_order():
    spy = Spy()
    tree = px.register_parametrization({"w": jnp.ones(2)}, "w", spy.parametrization("A"))
    tree = px.register_parametrization(tree, "w", spy.parametrization("B"))
    spy.calls.clear()
    out = px.assign(tree, "w", jnp.full((2,), 8.0))
    assert spy.calls == ["invB", "invA"]
    assert_close(out["w"].original, jnp.full((2,), 2.0))


def test_assign_several_originals_and_new_state():
    z = jnp.outer(jnp.array([1.0, 2.0]), jnp.array([1.0, 3.0, 0.5]))
    tree = px.register_parametrization({"w": jnp.ones((2, 3))}, "w", toys.rank_one)
    out = px.assign(tree, "w", z)
    assert_close(px.materialize(out)["w"], z)
    tree = px.register_parametrization(
        {"v": jnp.array([3.0, 4.0], jnp.float32)}, "v", toys.Normalized()
    )
    assert float(tree["v"].state["0"]) == 5.0
    out = px.assign(tree, "v", jnp.array([0.0, 2.0], jnp.float32))
    assert float(out["v"].state["0"]) == 2.0  # right_inverse set new state, as orthogonal's base
    assert_close(px.materialize(out)["v"], jnp.array([0.0, 2.0], jnp.float32))


def test_assign_keeps_the_parametrizations_own_params():
    tree = px.register_parametrization({"w": jnp.ones(2, jnp.float32)}, "w", toys.Scale(4.0))
    out = px.assign(tree, "w", jnp.array([8.0, 4.0], jnp.float32))
    assert out["w"].params["0"]["scale"] is tree["w"].params["0"]["scale"]
    assert_close(out["w"].original, jnp.array([2.0, 1.0], jnp.float32))


def _assign_raises(tree, where, value, match, exc=ValueError):
    before = _snapshot(tree)
    with pytest.raises(exc, match=match):
        px.assign(tree, where, value)
    assert _snapshot(tree) == before


def test_assign_errors():
    tree = _registered()
    not_parametrized = "params/b does not have a parametrization.*Parametrized tensors: 'params/w'"
    _assign_raises(tree, "params/b", jnp.ones(2), not_parametrized)
    _assign_raises(
        tree,
        "params/x",
        jnp.ones(2),
        "No parametrized tensor at path 'params/x'. Closest existing paths",
    )
    _assign_raises(
        tree, "params/w", jnp.ones((3, 3), jnp.float32), "may not change the shape of `original`"
    )
    _assign_raises(
        tree,
        "params/w",
        jnp.ones((2, 2), jnp.float16),
        "has dtype float16 while `original` has dtype float32",
    )
    _assign_raises(
        tree, "params/w", [[1.0, 2.0]], r"assign to 'params/w': can only assign an array; got list"
    )
    no_inverse = px.register_parametrization(tree, "params/w", toys.forward_only)
    _assign_raises(
        no_inverse, "params/w", jnp.eye(2, dtype=jnp.float32),
        "parametrization forward_only does not implement right_inverse", exc=RuntimeError,
    )  # fmt: skip

    def raises(y):
        raise NotImplementedError("cannot assign here")

    unimplemented = px.register_parametrization(
        {"w": jnp.ones(2)}, "w", px.Parametrization(forward=jnp.tanh, right_inverse=raises)
    )
    _assign_raises(unimplemented, "w", jnp.zeros(2), "cannot assign here", exc=NotImplementedError)


def test_assign_checks_what_the_chain_returns():
    def p(inverse):
        return px.Parametrization(forward=lambda *xs: xs[0], right_inverse=inverse)

    single = px.register_parametrization({"w": jnp.ones(2, jnp.float32)}, "w", p(lambda y: y))
    single = single["w"].replace(chain=(p(lambda y: (y, y)),))
    _assign_raises(
        {"w": single}, "w", jnp.ones(2, jnp.float32), "`right_inverse` should return a tensor"
    )
    single = single.replace(chain=(p(lambda y: y.astype(jnp.float64)),))
    _assign_raises(
        {"w": single},
        "w",
        jnp.ones(2, jnp.float32),
        "has dtype float64 while `original` has dtype float32",
    )

    multi = px.register_parametrization({"w": jnp.ones(2, jnp.float32)}, "w", p(lambda y: (y, y)))[
        "w"
    ]
    for inverse, match in [
        (lambda y: y, "must return a sequence of tensors. Got ArrayImpl"),
        (lambda y: (y,), "of length 2. Got a sequence of length 1"),
        (lambda y: (y, 1), "Got element 1 of type int"),
        (
            lambda y: (y, y.astype(jnp.float64)),
            "Tensor 1 returned by `right_inverse` has dtype float64",
        ),
    ]:
        _assign_raises(
            {"w": multi.replace(chain=(p(inverse),))}, "w", jnp.ones(2, jnp.float32), match
        )


def test_assign_with_unsafe_allows_a_new_shape():
    tree = px.register_parametrization({"w": jnp.ones(2)}, "w", toys.forward_only, unsafe=True)
    tree = px.register_parametrization(
        tree, "w", px.Parametrization(forward=jnp.exp, right_inverse=jnp.log), unsafe=True
    )
    tree = {
        "w": tree["w"].replace(chain=(px.Parametrization(forward=jnp.exp, right_inverse=jnp.log),))
    }
    out = px.assign(tree, "w", jnp.ones(3))
    assert out["w"].original.shape == (3,)


def test_assign_on_a_trainable_half_whose_right_inverse_renews_state_is_refused():
    # The base orthogonal's right_inverse renews had nowhere to go: the state check suggested
    # unsafe=True, and with it the new base was dropped when the state half was merged back,
    # so the tensor silently held another value than the one assigned.
    k = jax.random.normal(jax.random.key(0), (3, 3))
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (3, 3)))[0]
    for unsafe in (False, True):
        tree = px.register_parametrization({"w": k}, "w", px.Orthogonal(), unsafe=unsafe)
        params, state = px.split_state(tree)
        _assign_raises(params, "w", q, r"at w holds no state.*orthogonal.*merge_state")
        whole = px.assign(px.merge_state(params, state), "w", q)
        params, state = px.split_state(whole)
        assert_close(px.materialize(params, state)["w"], q)


# --- remove --------------------------------------------------------------------------------------
def test_remove_leave_parametrized_or_original():
    value = jnp.array([0.5, 2.0], jnp.float32)
    plain = {"p": {"w": value, "b": jnp.zeros(2)}}
    tree = px.register_parametrization(plain, "p/w", toys.positive)
    kept = px.remove_parametrizations(tree, "p/w")
    assert_close(kept["p"]["w"], value)
    assert jax.tree_util.tree_structure(kept) == jax.tree_util.tree_structure(plain)
    raw = px.remove_parametrizations(tree, "p/w", leave_parametrized=False)
    assert raw["p"]["w"] is tree["p"]["w"].original


def test_remove_drops_state_and_does_not_update_it():
    tree = px.register_parametrization(
        {"w": jnp.array([1.0, -2.0], jnp.float32)}, "w", toys.RunningMax()
    )
    moved = {"w": tree["w"].replace(originals=(jnp.array([4.0, 0.0], jnp.float32),))}
    out = px.remove_parametrizations(moved, "w")
    assert_close(out["w"], jnp.array([2.0, 0.0], jnp.float32))  # divided by the stored state, 2.0


def test_a_misspelled_path_suggests_parametrized_tensors_only():
    # remove_parametrizations and assign suggested plain leaves, which they then refused.
    tree = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "Dense_1": {}}
    tree["Dense_1"]["kernel"] = jnp.ones((2, 2))
    tree = px.register_parametrization(tree, "Dense_0/kernel", toys.symmetric)
    for fn in (
        lambda: px.remove_parametrizations(tree, "Dense_0/kernal"),
        lambda: px.assign(tree, "Dense_0/kernal", jnp.ones((2, 2))),
    ):
        with pytest.raises(ValueError, match=r"Closest existing paths: 'Dense_0/kernel'\.$"):
            fn()
    plain = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="Nothing in this tree is parametrized"):
        px.remove_parametrizations(plain, "x")


def test_remove_with_a_predicate_and_several_originals():
    tree = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones(2)}
    tree = px.register_parametrization(tree, "a", toys.rank_one)
    tree = px.register_parametrization(tree, "b", toys.symmetric)
    out = px.remove_parametrizations(tree, lambda p, x: True)
    assert not px.is_parametrized(out)
    assert_close(out["a"], jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="Cannot leave unparametrized"):
        px.remove_parametrizations(tree, "a", leave_parametrized=False)


def test_remove_errors():
    tree = _registered()
    before = _snapshot(tree)
    with pytest.raises(ValueError, match="params/b does not have a parametrization"):
        px.remove_parametrizations(tree, "params/b")
    with pytest.raises(ValueError, match="selected no parametrized tensor"):
        px.remove_parametrizations({"w": jnp.ones(2)}, lambda p, x: True)
    assert _snapshot(tree) == before


def test_remove_a_dtype_changing_chain():
    tree = px.register_parametrization(
        {"w": jnp.ones(2, jnp.float32)}, "w", lambda x: x.astype(jnp.bfloat16), unsafe=True
    )
    assert px.remove_parametrizations(tree, "w")["w"].dtype == jnp.bfloat16


def test_assigning_through_an_initialization_only_right_inverse_warns():
    # BCOP's and SOC's right_inverse seed the originals from the value: the tensor then holds
    # another kernel (0.65 away here), which used to happen without a word.
    from paramx import lipschitz as L

    k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4), jnp.float32)
    tree = L.bcop({"k": k}, "k")
    target = px.materialize(L.bcop({"k": 2 * k}, "k"))["k"]
    with pytest.warns(UserWarning, match="right_inverse of bcop is an initialization"):
        out = px.assign(tree, "k", target)
    assert float(jnp.abs(px.materialize(out)["k"] - target).max()) > 1e-3
    exact = px.orthogonal({"w": jnp.eye(3, dtype=jnp.float32)}, "w")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        px.assign(exact, "w", jnp.eye(3, dtype=jnp.float32))


def test_a_value_of_another_shape_is_named_with_the_tensors_shape():
    # A torch weight (out, in) assigned to a Flax kernel (in, out): the messages spoke of the
    # originals' shapes (weight norm, suggesting unsafe=True) or repeated the value's shape as
    # the expected one (spectral norm).
    for register in (px.spectral_norm, px.weight_norm, px.orthogonal):
        tree = register({"k": jnp.ones((3, 4), jnp.float32)}, "k")
        with pytest.raises(ValueError, match=r"(?s)tensor at k has shape \(3, 4\).*swapped"):
            px.assign(tree, "k", jnp.ones((4, 3), jnp.float32))
        with pytest.raises(ValueError, match=r"tensor at k has shape \(3, 4\).*float32\[5\]"):
            px.assign(tree, "k", jnp.ones((5,), jnp.float32))
