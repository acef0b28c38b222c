"""Tied and derived parameters: `paramx.tie`, `paramx.untie`, and ties in linen and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from conftest import assert_close
from flax import nnx, serialization

import paramx as px


def _params(dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "enc": {"kernel": jax.random.normal(k1, (4, 3), dtype), "bias": jnp.zeros(3, dtype)},
        "dec": {
            "kernel": jax.random.normal(k2, (3, 4), dtype),
            "bias": 0.1 * jax.random.normal(k3, (4,), dtype),
        },
    }


X = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)


def _autoencoder(plain, x=X):
    h = jnp.tanh(x @ plain["enc"]["kernel"] + plain["enc"]["bias"][None])
    y = h @ plain["dec"]["kernel"] + plain["dec"]["bias"][None]
    return jnp.mean((y - x) ** 2)


def _hand_tied(p, x=X):
    """The hand-written tied model: one kernel, read as W and W.T."""
    w = p["enc"]["kernel"]
    h = jnp.tanh(x @ w + p["enc"]["bias"][None])
    return jnp.mean((h @ w.T + p["dec"]["bias"][None] - x) ** 2)


def _tied(params):
    return px.tie(params, "dec/kernel", "enc/kernel", transform=jnp.transpose)


def test_gradients_equal_the_hand_written_tied_model():
    params = _params()
    tied = _tied(params)
    assert len(jax.tree.leaves(tied)) == len(jax.tree.leaves(params)) - 1
    grads = jax.jit(jax.grad(lambda t: _autoencoder(px.materialize(t))))(tied)
    hand = {"enc": params["enc"], "dec": {"bias": params["dec"]["bias"]}}
    expected = jax.grad(_hand_tied)(hand)
    assert isinstance(grads["dec"]["kernel"], px.Tied)
    for path in [("enc", "kernel"), ("enc", "bias"), ("dec", "bias")]:
        got, want = grads[path[0]][path[1]], expected[path[0]][path[1]]
        assert got.dtype == jnp.float64
        assert_close(got, want)


def test_tie_to_an_orthogonal_kernel():
    params = px.orthogonal(_params(), "enc/kernel")
    tied = _tied(params)
    p, s = px.split_state(tied)
    plain = px.materialize(p, s)
    w = plain["enc"]["kernel"]
    assert_close(plain["dec"]["kernel"], w.T)
    assert_close(w.T @ w, jnp.eye(3))
    # gradients: the hand-written model on the orthogonal value, through the same original
    grads = jax.jit(jax.grad(lambda p: _autoencoder(px.materialize(p, s))))(p)

    def hand(p):
        w = px.materialize(p, s)["enc"]
        return _hand_tied({"enc": w, "dec": {"bias": p["dec"]["bias"]}})

    expected = jax.jit(jax.grad(hand))({"enc": p["enc"], "dec": {"bias": p["dec"]["bias"]}})
    assert_close(grads["enc"]["kernel"].original, expected["enc"]["kernel"].original)
    assert_close(grads["dec"]["bias"], expected["dec"]["bias"])
    assert "tied to enc/kernel (transpose)" in px.summary(tied)


def _count(state_dict):
    arrays = [x for x in jax.tree.leaves(state_dict) if hasattr(x, "shape")]
    return len(arrays), sum(np.asarray(x).nbytes for x in arrays)


def test_a_checkpoint_holds_one_copy():
    params = px.orthogonal(_params(), "enc/kernel")
    tied = _tied(params)
    n_tied, bytes_tied = _count(serialization.to_state_dict(tied))
    n_plain, bytes_plain = _count(serialization.to_state_dict(params))
    assert (n_plain - n_tied, bytes_plain - bytes_tied) == (1, 3 * 4 * 8)
    blob = serialization.to_bytes(tied)
    assert len(serialization.to_bytes(params)) - len(blob) >= 3 * 4 * 8
    restored = serialization.from_bytes(tied, blob)
    assert isinstance(restored["dec"]["kernel"], px.Tied)
    assert_close(px.materialize(restored)["dec"]["kernel"], px.materialize(tied)["dec"]["kernel"])
    # msgpack of the split params: the trainable half holds one kernel too
    p, _ = px.split_state(tied)
    raw = msgpack.unpackb(serialization.msgpack_serialize(serialization.to_state_dict(p)))
    assert raw["dec"]["kernel"] == {}
    # a checkpoint saved untied does not load silently into a tied tree
    with pytest.raises(ValueError, match="dec/kernel.*saved from a tree without this tie"):
        serialization.from_bytes(tied, serialization.to_bytes(params))


def test_optax_sees_one_original():
    p, s = px.split_state(_tied(px.orthogonal(_params(), "enc/kernel")))
    labels = px.param_labels(p)
    assert isinstance(labels["dec"]["kernel"], px.Tied)
    tx = optax.multi_transform(
        {"original": optax.adam(1e-2), "plain": optax.adamw(1e-2, weight_decay=0.1)}, labels
    )
    state = tx.init(p)
    n_moments = len(jax.tree.leaves(state))

    @jax.jit
    def step(p, opt_state):
        g = jax.grad(lambda p: _autoencoder(px.materialize(p, s)))(p)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
        p2, state = step(p, state)
    assert isinstance(p2["dec"]["kernel"], px.Tied)
    assert len(jax.tree.leaves(state)) == n_moments
    mask = px.param_mask(p, original=False)
    assert isinstance(mask["dec"]["kernel"], px.Tied)
    tx = optax.masked(optax.add_decayed_weights(0.1), mask)
    updates, _ = tx.update(p, tx.init(p), p)
    assert isinstance(updates["dec"]["kernel"], px.Tied)


def test_split_merge_remove_transfer_untie():
    params = px.spectral_norm(_params(), "enc/kernel")
    tied = _tied(params)
    p, s = px.split_state(tied)
    merged = px.merge_state(p, s)
    assert jax.tree.structure(merged) == jax.tree.structure(tied)
    plain, _ = px.materialize(p, s, update_state=True)
    assert_close(plain["dec"]["kernel"], plain["enc"]["kernel"].T)
    # removing the source's parametrization keeps the tie, which reads the new leaf
    removed = px.remove_parametrizations(tied)
    assert isinstance(removed["dec"]["kernel"], px.Tied)
    assert_close(px.materialize(removed)["dec"]["kernel"], removed["enc"]["kernel"].T)
    with pytest.raises(ValueError, match=r"dec/kernel is tied to enc/kernel.*paramx.untie"):
        px.remove_parametrizations(tied, "dec/kernel")
    assert px.is_parametrized(tied, "dec/kernel") is False
    # transfer copies the ties with the parametrizations
    fresh = px.transfer_parametrizations_and_params(tied, _params())
    assert px.ties(fresh) == {"dec/kernel": "enc/kernel"}
    only_tie = px.transfer_parametrizations_and_params(tied, _params(), "dec/kernel")
    assert px.ties(only_tie) == {"dec/kernel": "enc/kernel"}
    assert not px.is_parametrized(only_tie, "enc/kernel")
    with pytest.raises(ValueError, match="Cannot transfer the tie at dec/kernel"):
        bad = _params()
        bad["dec"]["kernel"] = jnp.zeros((4, 3), jnp.float64)
        px.transfer_parametrizations_and_params(tied, bad)
    # untie gives the leaf its own array: the current tied value
    untied = px.untie(tied)
    assert len(jax.tree.leaves(untied)) == len(jax.tree.leaves(tied)) + 1
    assert_close(untied["dec"]["kernel"], px.materialize(tied)["dec"]["kernel"])
    with pytest.raises(ValueError, match="dec/bias is not tied.*Tied leaves: 'dec/kernel'"):
        px.untie(tied, "dec/bias")


def test_inputs_are_never_modified_and_the_tree_can_be_rerooted():
    params = _params()
    before = jax.tree.map(np.asarray, params)
    tied = _tied(params)
    untied = px.untie(tied)
    assert jax.tree.structure(params) == jax.tree.structure(before)
    assert isinstance(tied["dec"]["kernel"], px.Tied)
    assert not isinstance(untied["dec"]["kernel"], px.Tied)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    # the source is stored relative to the tied leaf: a tree under "params" still resolves
    plain = px.materialize({"params": tied})
    assert_close(plain["params"]["dec"]["kernel"], params["enc"]["kernel"].T)


def test_under_jit():
    params = _params()

    @jax.jit
    def f(params):
        return px.materialize(_tied(params))["dec"]["kernel"]

    assert_close(f(params), params["enc"]["kernel"].T)


def test_errors_name_the_paths():
    params = _params()
    with pytest.raises(ValueError, match=r"No source at path 'enc/kernal'.*'enc/kernel'"):
        px.tie(params, "dec/kernel", "enc/kernal")
    with pytest.raises(ValueError, match=r"Cannot tie dec/kernel to enc/kernel.*float64\[3, 4\]"):
        px.tie(params, "dec/kernel", "enc/kernel")
    with pytest.raises(ValueError, match="is a subtree"):
        px.tie(params, "dec/kernel", "enc")
    with pytest.raises(ValueError, match="to itself"):
        px.tie(params, "enc/kernel", "enc/kernel")
    tree = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    tree = px.tie(px.tie(tree, "b", "a"), "c", "b")
    with pytest.raises(ValueError, match="cycle of ties: a -> c -> b -> a"):
        px.tie(tree, "a", "c")
    with pytest.raises(ValueError, match="b is tied already"):
        px.tie(tree, "b", "c")
    registered = px.orthogonal(params, "enc/kernel")
    with pytest.raises(ValueError, match="enc/kernel is parametrized"):
        px.tie(registered, "enc/kernel", "dec/kernel", transform=jnp.transpose)
    with pytest.raises(TypeError, match="transform"):
        px.tie(params, "dec/kernel", "enc/kernel", transform=3)
    # a tree without the source (a subtree given to materialize) says which path is missing
    with pytest.raises(ValueError, match="reads .*enc/kernel"):
        px.materialize({"dec": _tied(params)["dec"]})
    # functions that select one leaf say that it is tied (not "no leaf at this path")
    tied = _tied(params)
    for call in (
        lambda: px.orthogonal(tied, "dec/kernel"),
        lambda: px.assign(tied, "dec/kernel", jnp.ones((3, 4))),
        lambda: px.get_parametrized(tied, "dec/kernel"),
    ):
        with pytest.raises(ValueError, match=r"'dec/kernel' is tied to.*paramx.untie"):
            call()


def test_ties_of_ties_and_predicates():
    tree = {"a": jnp.arange(3.0), "b": jnp.zeros(3), "c": jnp.zeros(3), "d": jnp.zeros(3)}
    tree = px.tie(tree, "b", "a", transform=jnp.exp)
    tree = px.tie(tree, lambda path, leaf: px.path_keys(path)[0] in "cd", "b", transform=jnp.sin)
    plain = px.materialize(tree)
    assert_close(plain["c"], jnp.sin(jnp.exp(jnp.arange(3.0))))
    assert_close(plain["d"], plain["c"])
    assert px.ties(tree) == {"b": "a", "c": "b", "d": "b"}
    g = jax.grad(lambda t: jnp.sum(px.materialize(t)["c"] + px.materialize(t)["d"]))(tree)
    a = jnp.arange(3.0)
    assert_close(g["a"], 2 * jnp.cos(jnp.exp(a)) * jnp.exp(a))


def test_stacked_layers_share_one_array_by_broadcasting():
    shared = jax.random.normal(jax.random.key(2), (3, 3), jnp.float64)
    tree = {"shared": shared, "layers": {"kernel": jnp.zeros((4, 3, 3), jnp.float64)}}
    tree = px.tie(tree, "layers/kernel", "shared")
    plain = px.materialize(tree)
    assert plain["layers"]["kernel"].shape == (4, 3, 3)

    def loss(t):
        x = jnp.ones(3, jnp.float64)
        kernels = px.materialize(t)["layers"]["kernel"]
        for k in kernels:
            x = jnp.tanh(x @ k)
        return jnp.sum(x)

    def hand(w):
        x = jnp.ones(3, jnp.float64)
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return jnp.sum(x)

    assert_close(jax.grad(loss)(tree)["shared"], jax.grad(hand)(shared))


def test_a_stacked_tie_under_jax_vmap_over_the_stack_reads_its_own_layer():
    # Each vmapped layer broadcast its source to the whole recorded stack: the tied leaf came
    # out (3, 3, 2, 4), each layer holding three copies of its source, instead of (3, 2, 4).
    enc = jax.random.normal(jax.random.key(3), (3, 4, 2), jnp.float64)
    tree = {"enc": enc, "dec": jnp.zeros((3, 2, 4), jnp.float64)}
    tree = px.tie(tree, "dec", "enc", transform=jnp.matrix_transpose)
    plain = jax.vmap(px.materialize)(tree)
    assert plain["dec"].shape == (3, 2, 4)
    assert_close(plain["dec"], px.materialize(tree)["dec"])
    assert_close(plain["dec"], jnp.matrix_transpose(enc))
    shared = {"shared": enc[0], "layers": jnp.zeros((3, 4, 2), jnp.float64)}
    shared = px.tie(shared, "layers", "shared")  # broadcast along the stack: as before
    assert_close(px.materialize(shared)["layers"], jnp.broadcast_to(enc[0], (3, 4, 2)))


# ----- linen and NNX -------------------------------------------------------------------------


class AutoEncoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(3, name="enc", param_dtype=jnp.float64)(x))
        return nn.Dense(4, name="dec", param_dtype=jnp.float64)(h)


def test_linen_ties_hold_one_copy_and_give_the_tied_gradients():
    model = px.linen.Parametrize(AutoEncoder(), ties={"dec/kernel": ("enc/kernel", jnp.transpose)})
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]
    assert isinstance(params["dec"]["kernel"], px.Tied)
    assert len(jax.tree.leaves(params)) == 3

    def loss(params):
        return jnp.mean((model.apply({"params": params}, X) - X) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    plain = {"enc": params["enc"], "dec": {"bias": params["dec"]["bias"]}}
    expected = jax.grad(_hand_tied)(plain)
    assert_close(grads["enc"]["kernel"], expected["enc"]["kernel"])
    assert_close(grads["dec"]["bias"], expected["dec"]["bias"])


def test_linen_ties_compose_with_rules():
    model = px.linen.Parametrize(
        AutoEncoder(),
        {"enc/kernel": px.Orthogonal()},
        ties=[("dec/kernel", "enc/kernel", jnp.transpose)],
    )
    variables = model.init(jax.random.key(0), X)
    plain = px.materialize(variables["params"], variables["paramx_state"])
    assert_close(plain["dec"]["kernel"], plain["enc"]["kernel"].T)
    with pytest.raises(ValueError, match="Parametrize around AutoEncoder.*No source at path"):
        px.linen.Parametrize(AutoEncoder(), ties={"dec/kernel": "enc/kernal"}).init(
            jax.random.key(0), X
        )
    with pytest.raises(ValueError, match="layout='nodes'"):
        px.linen.Parametrize(
            AutoEncoder(), ties={"dec/kernel": ("enc/kernel", jnp.transpose)}, layout="arrays"
        ).init(jax.random.key(0), X)


class NNXAutoEncoder(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)
        self.dec = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)
        self.dec.kernel = self.enc.kernel  # tied: one Variable, held by both layers

    def __call__(self, x):
        return self.dec(jnp.tanh(self.enc(x)))


def test_nnx_shared_variable_stays_shared_under_a_parametrization():
    model = NNXAutoEncoder(nnx.Rngs(0))
    px.nnx.spectral_norm(model.enc, "kernel")
    assert model.dec.kernel is model.enc.parametrizations["kernel"].original
    params = nnx.state(model, nnx.Param)
    kernels = [x for x in jax.tree.leaves(params) if x.shape == (3, 3)]
    assert len(kernels) == 1  # one copy in the state an optimizer sees

    def loss(model):
        return jnp.sum(model(X[:, :3]) ** 2)

    grads = nnx.grad(loss)(model)
    assert len([x for x in jax.tree.leaves(grads) if x.shape == (3, 3)]) == 1


class NNXTiedAutoEncoder(nnx.Module):
    def __init__(self, rngs):
        self.dec = nnx.Linear(3, 4, rngs=rngs, param_dtype=jnp.float64)
        self.enc = nnx.Linear(4, 3, rngs=rngs, param_dtype=jnp.float64)
        px.nnx.tie(self.dec, "kernel", self.enc, "kernel", transform=jnp.transpose)

    def __call__(self, x):
        return self.dec(jnp.tanh(self.enc(x)))


def test_nnx_transform_tie_gives_the_tied_gradients_with_one_copy():
    model = NNXTiedAutoEncoder(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert len([x for x in jax.tree.leaves(params) if x.shape == (4, 3)]) == 1
    assert not [x for x in jax.tree.leaves(params) if x.shape == (3, 4)]

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.mean((m(X) - X) ** 2))(model)

    g = grads(model)
    plain = {
        "enc": {"kernel": model.enc.kernel[...], "bias": model.enc.bias[...]},
        "dec": {"bias": model.dec.bias[...]},
    }
    expected = jax.grad(_hand_tied)(plain)
    kernel_grads = [x for x in jax.tree.leaves(g) if x.shape == (4, 3)]
    assert len(kernel_grads) == 1
    assert_close(kernel_grads[0], expected["enc"]["kernel"])
    assert_close(g["dec"]["bias"][...], expected["dec"]["bias"])


def test_nnx_tie_to_an_orthogonal_kernel_and_untie():
    model = NNXTiedAutoEncoder(nnx.Rngs(0))
    px.nnx.untie(model.dec, "kernel")
    px.nnx.orthogonal(model.enc, "kernel")
    with pytest.raises(ValueError, match=r"Cannot tie Linear.kernel to .*float64\[4, 3\]"):
        px.nnx.tie(model.dec, "kernel", model.enc, "kernel")
    px.nnx.tie(model.dec, "kernel", model.enc, "kernel", transform=jnp.transpose)
    w = model.dec.kernel[...]
    assert_close(w @ w.T, jnp.eye(3))
    assert_close(w, model.enc.kernel.T)
    with pytest.raises(ValueError, match="is parametrized"):
        px.nnx.tie(model.enc, "kernel", model.dec, "kernel", transform=jnp.transpose)
    px.nnx.untie(model.dec, "kernel")
    assert isinstance(model.dec.kernel, nnx.Param)
    assert_close(model.dec.kernel[...], w)


def test_orbax_round_trip_of_a_tied_tree(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, state = px.split_state(px.orthogonal(_tied(_params()), "enc/kernel"))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "params", params)
    ckpt.wait_until_finished()
    fresh = px.split_state(px.orthogonal(_tied(_params()), "enc/kernel"))[0]
    fresh = jax.tree.map(jnp.zeros_like, fresh)
    restored = ckpt.restore(tmp_path / "params", fresh)
    assert isinstance(restored["dec"]["kernel"], px.Tied)
    assert len(jax.tree.leaves(restored)) == len(jax.tree.leaves(params))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = px.materialize(restored, state)
    assert_close(plain["dec"]["kernel"], plain["enc"]["kernel"].T)
