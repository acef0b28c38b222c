"""optax masks and labels built from what is registered (`param_labels`, `param_mask`)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toys
from conftest import assert_close

import paramx as px
from paramx._src.core.node import is_node
from paramx._src.integrations.optax import param_labels, param_mask


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8)(x))
        x = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(1)(x)


def _data():
    x = jax.random.uniform(jax.random.key(1), (32, 4), jnp.float32, -1.0, 1.0)
    y = jnp.sin(3.0 * x[:, :1]) * jnp.cos(2.0 * x[:, 1:2])
    return x, y


def _registered():
    """A Flax variables dict with every role: originals (single and multi), a
    parametrization's own params, state, and plain leaves."""
    model, (x, y) = MLP(), _data()
    variables = model.init(jax.random.key(0), x)
    tree = px.orthogonal(variables, "params/Dense_0/kernel")  # original + state (base)
    tree = px.spectral_norm(tree, "params/Dense_1/kernel")  # original + state (u, v)
    tree = px.register_parametrization(tree, "params/Dense_1/kernel", toys.Scale())  # params
    tree = px.weight_norm(tree, "params/Dense_2/kernel")  # original0 (g), original1 (v)
    return model, x, y, tree


def _loss_fn(model, x, y, state):
    def loss_fn(params):
        variables = px.materialize(params, state)
        return jnp.mean((model.apply(variables, x) - y) ** 2)

    return loss_fn


def _by_role(tree, values):
    """{role: [leaves of `values` whose label in `tree` is that role]}."""
    labels = jax.tree_util.tree_leaves(param_labels(tree))
    leaves = jax.tree_util.tree_leaves(values)
    assert len(labels) == len(leaves)
    out = {}
    for label, leaf in zip(labels, leaves):
        out.setdefault(label, []).append(leaf)
    return out


# ----- structure -------------------------------------------------------------------------------


def test_labels_mirror_the_trainable_half_node_for_node():
    _, _, _, tree = _registered()
    params, _ = px.split_state(tree)
    labels = param_labels(params)
    assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(params)
    p = labels["params"]
    assert p["Dense_0"]["kernel"].originals == ("original",)
    assert p["Dense_0"]["bias"] == "plain"
    assert p["Dense_1"]["kernel"].originals == ("original",)
    assert p["Dense_1"]["kernel"].params == {"1": {"scale": "parametrization"}}
    assert p["Dense_1"]["kernel"].state == {}  # the trainable half holds no state
    assert p["Dense_2"]["kernel"].originals == ("original", "original")
    counts = {k: len(v) for k, v in _by_role(params, params).items()}
    assert counts == {"original": 4, "parametrization": 1, "plain": 3}


def test_full_tree_labels_state_and_flax_variables_work_as_is():
    _, _, _, tree = _registered()
    labels = param_labels(tree)  # the whole variables dict, state included
    assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(tree)
    node = labels["params"]["Dense_1"]["kernel"]
    assert node.state == {"0": {"u": "state", "v": "state"}}
    assert labels["params"]["Dense_0"]["kernel"].state == {"0": {"base": "state"}}
    # the mask leaves state out by default, and can take it in
    mask = param_mask(tree)
    assert mask["params"]["Dense_1"]["kernel"].state == {"0": {"u": False, "v": False}}
    assert param_mask(tree, state=True)["params"]["Dense_0"]["kernel"].state["0"]["base"] is True
    # a tree without registrations is all plain
    plain = {"params": {"w": jnp.ones(2), "b": [jnp.ones(1), None]}}
    assert param_labels(plain) == {"params": {"w": "plain", "b": ["plain", None]}}


def test_inputs_are_not_modified():
    _, _, _, tree = _registered()
    before = jax.tree_util.tree_map(np.asarray, tree)
    param_labels(tree, lambda path, leaf: {"original": "x"} if is_node(leaf) else None)
    param_mask(tree, original=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree, before)
    assert isinstance(tree["params"]["Dense_0"]["kernel"].originals[0], jax.Array)


# ----- optax, with real numbers ---------------------------------------------------------------


def test_adamw_without_decay_on_originals_matches_adam_there_and_decays_plain_leaves():
    model, x, y, tree = _registered()
    params, state = px.split_state(tree)
    lr, wd = 1e-2, 0.5
    masked = optax.adamw(lr, weight_decay=wd, mask=functools.partial(param_mask, original=False))
    adam = optax.adam(lr)
    adamw = optax.adamw(lr, weight_decay=wd)
    loss_fn = _loss_fn(model, x, y, state)

    @jax.jit
    def step(params, opt_states):
        grads = jax.grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):
            out = [tx.update(grads, s, params) for tx, s in zip((masked, adam, adamw), opt_states)]
        updates = [u for u, _ in out]
        return optax.apply_updates(params, updates[0]), [s for _, s in out], updates

    opt_states = [tx.init(params) for tx in (masked, adam, adamw)]
    for i in range(4):
        params_before = params
        params, opt_states, (u_masked, u_adam, u_adamw) = step(params, opt_states)
        got, want_adam, want_adamw = (
            _by_role(params_before, u) for u in (u_masked, u_adam, u_adamw)
        )
        for role in ("original", "parametrization", "plain"):
            want = want_adam if role == "original" else want_adamw
            for a, b in zip(got[role], want[role]):
                np.testing.assert_array_equal(a, b, err_msg=role)
        # weight decay was really applied where it should be: adamw and adam differ there
        # (Flax's biases start at zero, so from the second step on)
        for role in ("plain", "parametrization") if i else ("parametrization",):
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got[role], want_adam[role]))
            assert diff > 1e-6, role
    # and the decayed plain kernel is the hand-computed one: update = -lr (adam + wd * p)
    plain = _by_role(params_before, params_before)["plain"]
    decay = [-lr * wd * p for p in plain]
    for g, a, d in zip(_by_role(params_before, u_masked)["plain"], want_adam["plain"], decay):
        assert_close(g, a + d, scale=10.0)


def test_frozen_originals_stay_bit_identical_while_the_rest_trains():
    model, x, y, tree = _registered()
    params, state = px.split_state(tree)
    adam = optax.adam(1e-2)
    transforms = {"original": optax.set_to_zero(), "parametrization": adam, "plain": adam}
    tx = optax.multi_transform(transforms, param_labels(params))
    opt_state = tx.init(params)
    loss_fn = _loss_fn(model, x, y, state)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = jax.tree_util.tree_map(np.asarray, params)
    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    before, after = _by_role(start, start), _by_role(start, params)
    for a, b in zip(before["original"], after["original"]):
        np.testing.assert_array_equal(a, b)
    for role in ("plain", "parametrization"):
        assert all(not np.array_equal(a, b) for a, b in zip(before[role], after[role])), role
    assert losses[-1] < losses[0]
    # set_to_zero keeps no optimizer memory for the frozen arrays
    n_moments = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(opt_state))
    n_trained = sum(np.size(a) for role in ("plain", "parametrization") for a in before[role])
    assert n_moments == 2 * n_trained + 2  # mu, nu for each trained array, two step counts


def test_originals_get_their_own_learning_rate():
    model, x, y, tree = _registered()
    params, state = px.split_state(tree)
    lr = {"original": 0.5, "parametrization": 0.25, "plain": 0.125}
    tx = optax.multi_transform({k: optax.sgd(v) for k, v in lr.items()}, param_labels)
    loss_fn = _loss_fn(model, x, y, state)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return grads, updates

    grads, updates = step(params, tx.init(params))
    g, u = _by_role(params, grads), _by_role(params, updates)
    for role, rate in lr.items():
        assert len(u[role]) > 0
        for gi, ui in zip(g[role], u[role]):
            assert float(jnp.max(jnp.abs(gi))) > 0
            assert_close(ui, -jnp.asarray(rate, gi.dtype) * gi)


def test_label_callable_by_chain_name_and_per_original():
    model, x, y, tree = _registered()
    params, state = px.split_state(tree)

    def by_chain(path, leaf):
        if not is_node(leaf):
            return "bias" if px.path_keys(path)[-1] == "bias" else None
        names = leaf.chain_names()
        if names == ["weight_norm"]:
            return {"original0": "g", "original1": "v"}
        return names[0]  # "orthogonal", "spectral_norm"

    labels = param_labels(params, by_chain)
    p = labels["params"]
    assert p["Dense_0"]["kernel"].original == "orthogonal"
    assert p["Dense_1"]["kernel"].original == "spectral_norm"
    # a string for a node labels its learnable params too
    assert p["Dense_1"]["kernel"].params == {"1": {"scale": "spectral_norm"}}
    assert p["Dense_2"]["kernel"].originals == ("g", "v")
    assert {p[d]["bias"] for d in ("Dense_0", "Dense_1", "Dense_2")} == {"bias"}

    rates = {"orthogonal": 1.0, "g": 2.0, "v": 3.0, "spectral_norm": 4.0, "bias": 5.0}
    tx = optax.multi_transform({k: optax.sgd(r) for k, r in rates.items()}, labels)
    grads = jax.jit(jax.grad(_loss_fn(model, x, y, state)))(params)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for label, gi, ui in zip(
        jax.tree_util.tree_leaves(labels),
        jax.tree_util.tree_leaves(grads),
        jax.tree_util.tree_leaves(updates),
    ):
        assert_close(ui, -jnp.asarray(rates[label], gi.dtype) * gi)


def test_labels_dict_renames_roles():
    _, _, _, tree = _registered()
    params, _ = px.split_state(tree)
    labels = param_labels(params, {"original": "raw", "plain": "rest"})
    assert set(jax.tree_util.tree_leaves(labels)) == {"raw", "rest", "parametrization"}


def test_unsplit_tree_is_refused_before_an_optimizer_can_touch_state():
    # Issue 11.1: `tx.init(tree)` on the registered tree let adamw's weight decay shrink
    # spectral norm's u/v and orthogonal's base. Labels still name the state...
    model, x, y, tree = _registered()
    labels = param_labels(tree)
    no_state = {"original": optax.adam(1e-2), "plain": optax.adam(1e-2)}
    with pytest.raises(ValueError, match="state"):
        optax.multi_transform(no_state, labels).init(tree)

    # ...and differentiating the unsplit tree, the step every optimizer needs, is refused.
    def loss_fn(tree):
        variables, new_state = px.materialize(tree, update_state=True)
        return jnp.mean((model.apply(variables, x) - y) ** 2), new_state

    with pytest.raises(ValueError, match=r"params/Dense_\d/kernel.*split_state"):
        jax.jit(jax.grad(loss_fn, has_aux=True))(tree)
    # The split halves train, and no update reaches the state.
    params, state = px.split_state(tree)
    tx = optax.adamw(1e-2, weight_decay=0.5)
    grads, new_state = jax.grad(lambda p: loss_fn(px.merge_state(p, state)), has_aux=True)(params)
    with jax.numpy_dtype_promotion("standard"):  # optax's count arithmetic
        updates, _ = tx.update(grads, tx.init(params), params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
    u_old = state["params"]["Dense_1"]["kernel"]["0"]["u"]
    assert not np.array_equal(new_state["params"]["Dense_1"]["kernel"]["0"]["u"], u_old)


# ----- errors ----------------------------------------------------------------------------------


def test_errors_name_the_key_and_the_leaf():
    _, _, _, tree = _registered()
    with pytest.raises(ValueError, match=r"'originals'.*not a role.*'original'"):
        param_labels(tree, {"originals": "raw"})
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*'original1'"):
        param_labels(tree, lambda path, leaf: {"original1": "x"} if is_node(leaf) else None)
    with pytest.raises(TypeError, match="labels"):
        param_labels(tree, ["original"])


def test_paramx_nnx_layout_and_the_linen_state_collection_have_their_roles():
    # paramx.nnx keeps originals and state as plain arrays under `parametrizations/<name>/`,
    # and paramx.linen keeps state in its own collection: they used to be labelled "plain",
    # so `param_mask(original=False)` let weight decay reach weight norm's g and v.
    from flax import nnx

    import paramx.nnx as pnx

    model = pnx.weight_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    labels = px.param_labels(nnx.state(model, nnx.Param))
    assert jax.tree.leaves(labels["parametrizations"]["kernel"]) == ["original", "original"]
    assert jax.tree.leaves(labels["bias"]) == ["plain"]
    decay = optax.masked(
        optax.add_decayed_weights(0.5), functools.partial(px.param_mask, original=False)
    )
    opt = nnx.Optimizer(model, optax.chain(decay, optax.sgd(0.1)), wrt=nnx.Param)
    g = np.asarray(model.parametrizations["kernel"].original0[...])
    b = model.bias[...] + 1.0
    model.bias[...] = b
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    np.testing.assert_array_equal(model.parametrizations["kernel"].original0[...], g)
    assert not np.allclose(model.bias[...], b)  # plain leaves are decayed

    sn = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    state = px.param_labels(nnx.state(sn))["parametrizations"]["kernel"]["state"]
    assert jax.tree.leaves(state) == ["state", "state"]

    wrapped = px.linen.Parametrize(nn.Dense(3), {"kernel": px.SpectralNorm()})
    variables = wrapped.init(jax.random.key(0), jnp.ones((1, 2), jnp.float32))
    assert px.param_labels(variables)["paramx_state"]["kernel"]["0"] == {"u": "state", "v": "state"}
    assert px.param_mask(variables)["paramx_state"]["kernel"]["0"] == {"u": False, "v": False}


def test_a_linen_state_collection_of_another_name_has_the_state_role():
    # Parametrize(..., state_collection="sn"): u and v were labelled "plain", so
    # param_mask selected them (weight decay on the power-iteration state) and tags tagged them.
    wrapped = px.linen.Parametrize(
        nn.Dense(3), {"kernel": px.SpectralNorm()}, state_collection="sn"
    )
    variables = wrapped.init(jax.random.key(0), jnp.ones((1, 2), jnp.float32))
    variables = {**variables, "batch_stats": {"mean": jnp.zeros(3)}}
    assert px.param_labels(variables)["sn"]["kernel"]["0"] == {"u": "state", "v": "state"}
    assert px.param_mask(variables)["sn"]["kernel"]["0"] == {"u": False, "v": False}
    assert px.param_labels(variables)["batch_stats"] == {"mean": "plain"}
    tags = px.optim.tags(variables, {"all": "..."})
    assert tags.paths("all") == ["batch_stats/mean", "params/bias", "params/kernel/original"]
    assert tags.mask("all")["sn"]["kernel"]["0"] == {"u": False, "v": False}
