"""The per-tensor core API (paramx.tensor), the one state layout, and consistent signatures."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paramx as px

POSITIVE = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log, name="positive")


# ----- per-tensor API -------------------------------------------------------------------------
def test_tensor_api_matches_the_tree_api():
    w = jnp.array([[3.0, 1.0], [0.5, 2.0]])
    cases = [(px.Orthogonal(), w), (px.SpectralNorm(), w), (px.WeightNorm(), w)]
    for p, w_in in [*cases, (POSITIVE, jnp.abs(w))]:
        node = px.tensor.register(w_in, p, key=jax.random.key(3))
        tree = px.register_parametrization({"w": w_in}, "w", p, key=jax.random.key(3))
        np.testing.assert_allclose(
            px.tensor.materialize(node), px.materialize({"w": node})["w"], rtol=1e-6
        )
        assert jax.tree_util.tree_structure(node) == jax.tree_util.tree_structure(tree["w"])
        new = px.tensor.assign(node, w_in)
        np.testing.assert_allclose(
            px.tensor.materialize(new), px.materialize(px.assign({"w": node}, "w", w_in))["w"]
        )
        np.testing.assert_allclose(
            px.tensor.remove(node), px.remove_parametrizations({"w": node}, "w")["w"]
        )


def test_tensor_materialize_with_state_update_returns_the_node_state():
    node = px.tensor.register(jnp.diag(jnp.array([3.0, 1.0])), px.SpectralNorm())
    value, state = px.tensor.materialize(node, update_state=True)
    assert set(state) == {"0"} and set(state["0"]) == {"u", "v"}
    again = px.tensor.materialize(node.replace(state=state))
    np.testing.assert_allclose(value, again, rtol=1e-6)


def test_tensor_api_errors_name_the_label():
    with pytest.raises(ValueError, match=r"Linear\.kernel is not parametrized"):
        px.tensor.assign(jnp.ones(2), jnp.ones(2), label="Linear.kernel")
    with pytest.raises(ValueError, match=r"Linear\.kernel is not parametrized"):
        px.tensor.materialize(jnp.ones(2), label="Linear.kernel")
    with pytest.raises(ValueError, match=r"Linear\.kernel is not parametrized"):
        px.tensor.remove(jnp.ones(2), label="Linear.kernel")
    with pytest.raises(ValueError, match=r"(?i)shape.*at Linear\.kernel"):
        px.tensor.register(jnp.ones((2, 3)), lambda x: x[0], label="Linear.kernel")


def test_tensor_register_runs_under_jit_and_appends():
    node = jax.jit(lambda w: px.tensor.register(w, POSITIVE))(jnp.ones(3))
    node = px.tensor.register(node, jnp.tanh)
    assert node.chain_names() == ["positive", "tanh"]
    np.testing.assert_allclose(px.tensor.materialize(node), jnp.tanh(jnp.ones(3)), rtol=1e-6)


def test_tensor_register_refuses_a_metadata_box_and_says_what_to_do():
    import flax.linen as nn

    boxed = nn.Partitioned(jnp.ones((2, 2)), names=(None, "m"))
    with pytest.raises(TypeError, match="register_parametrization on the tree"):
        px.tensor.register(boxed, px.Orthogonal())


# ----- one state layout ---------------------------------------------------------------------
def _stateful_tree():
    tree = {
        "a": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)},
        "b": {"kernel": jnp.eye(3)},
        "c": [jnp.eye(2), jnp.ones(2)],
    }
    tree = px.spectral_norm(tree, "a/kernel")
    tree = px.register_parametrization(tree, "b/kernel", jnp.tanh)  # no state
    return px.spectral_norm(tree, ("c", 0))


def test_split_state_and_materialize_return_the_sparse_collection_layout():
    tree = _stateful_tree()
    params, state = px.split_state(tree)
    # Only the parametrized tensors that have state, as in a Flax collection: no None leaves.
    assert set(state) == {"a", "c"}
    assert set(state["a"]) == {"kernel"} and set(state["a"]["kernel"]["0"]) == {"u", "v"}
    assert set(state["c"]) == {0}
    assert None not in jax.tree_util.tree_leaves(state, is_leaf=lambda x: x is None)
    _, new_state = px.materialize(params, state, update_state=True)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    np.testing.assert_allclose(
        px.materialize(px.merge_state(params, new_state))["a"]["kernel"],
        px.materialize(params, new_state)["a"]["kernel"],
    )


def test_merge_state_accepts_the_earlier_mirror_layout_at_the_edge():
    tree = _stateful_tree()
    params, state = px.split_state(tree)
    mirror = {
        "a": {"kernel": state["a"]["kernel"], "bias": None},
        "b": {"kernel": None},
        "c": [state["c"][0], None],
    }
    np.testing.assert_allclose(px.materialize(params, mirror)["c"][0], px.materialize(tree)["c"][0])


def test_a_state_half_for_another_tree_is_refused_with_the_path():
    params, state = px.split_state(_stateful_tree())
    with pytest.raises(ValueError, match=r"a/weights"):
        px.merge_state(params, {"a": {"weights": state["a"]["kernel"]}})


# ----- consistent signatures ------------------------------------------------------------------
def test_where_none_means_every_parametrized_tensor_everywhere_it_is_accepted():
    tree = _stateful_tree()
    assert px.is_parametrized(tree, None) is True
    plain = px.remove_parametrizations(tree, None)
    assert not px.is_parametrized(plain)
    np.testing.assert_allclose(plain["a"]["kernel"], px.materialize(tree)["a"]["kernel"])
    dst = px.transfer_parametrizations_and_params(tree, plain, None)
    assert px.is_parametrized(dst, "a/kernel") and px.is_parametrized(dst, ("c", 0))
    # register / assign need a selection: None there is refused, naming the accepted forms.
    with pytest.raises(TypeError, match="predicate"):
        px.register_parametrization(plain, None, jnp.tanh)
    with pytest.raises(TypeError, match="predicate"):
        px.assign(tree, None, jnp.eye(3))


def test_leave_parametrized_is_positional_as_in_torch_everywhere():
    tree = px.register_parametrization({"w": jnp.array([1.0, 2.0])}, "w", POSITIVE)
    np.testing.assert_allclose(
        px.remove_parametrizations(tree, "w", False)["w"], jnp.log(jnp.array([1.0, 2.0])), rtol=1e-6
    )
    for fn in (px.remove_parametrizations, px.nnx.remove_parametrizations):
        params = list(inspect.signature(fn).parameters.values())
        assert params[2].name == "leave_parametrized"
        assert params[2].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_tree_functions_take_tree_and_where_positionally_and_options_by_keyword():
    tree_fns = [
        px.register_parametrization,
        px.assign,
        px.remove_parametrizations,
        px.is_parametrized,
        px.get_parametrized,
        px.originals,
    ]
    for fn in tree_fns:
        names = list(inspect.signature(fn).parameters)
        assert names[:2] == ["tree", "where"], (fn.__name__, names)
    for fn in (px.register_parametrization, px.materialize):
        kinds = {p.name: p.kind for p in inspect.signature(fn).parameters.values()}
        for option in ("unsafe", "key", "batch_axes", "update_state", "shardings"):
            if option in kinds:
                assert kinds[option] is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, option)


def test_node_fields_are_named():
    node = px.tensor.register(jnp.ones((2, 2)), px.WeightNorm())
    aux = jax.tree_util.tree_flatten(node)[1].node_data()[1]
    assert aux.n_originals == 2 and aux.multi and aux.event_ndims == (2, 2)
    assert node.original_names == ("original0", "original1")
