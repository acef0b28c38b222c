"""paramx.optim: tags -> optax masks and labels; optimizer state carried over model surgery."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toys
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx import optim

STANDARD = jax.numpy_dtype_promotion("standard")  # a reusable context manager
NO_DECAY = [optim.biases, optim.norm_scales, optim.embeddings, optim.tokens]


class ViTish(nn.Module):
    @nn.compact
    def __call__(self, ids):
        cls = self.param("cls_token", nn.initializers.zeros, (1, 4), jnp.float32)
        pos = nn.Embed(6, 4, name="pos_embedding")(jnp.arange(ids.shape[-1]))
        x = nn.Embed(10, 4)(ids) + pos[None] + cls[None]
        x = nn.LayerNorm()(nn.Dense(4)(x))
        return nn.Dense(2, name="head")(x)


@functools.cache  # arrays are immutable; built once for the tests that read it
def _vit_params():
    ids = jnp.zeros((1, 3), jnp.int32)
    params = ViTish().init(jax.random.key(0), ids)["params"]
    params = px.orthogonal(params, "Dense_0/kernel")
    return px.split_state(params)


def test_ready_made_rules_on_linen_paths():
    params, _ = _vit_params()
    tags = optim.tags(params, {"no_decay": NO_DECAY, "frozen": "Dense_0/..."})
    assert tags.paths("no_decay") == [
        "Dense_0/bias",
        "Embed_0/embedding",
        "LayerNorm_0/bias",
        "LayerNorm_0/scale",
        "cls_token",
        "head/bias",
        "pos_embedding/embedding",
    ]
    assert tags.paths("frozen") == ["Dense_0/bias", "Dense_0/kernel/original"]
    assert tags.table["head/kernel"] == ()
    # a module named like a token is not a token: only an embedding table below it
    head = {"cls": {"dense": {"kernel": jnp.ones((2, 2))}}, "pos_embed": {"embedding": jnp.ones(2)}}
    assert optim.tags(head, {"t": optim.tokens}).paths("t") == ["pos_embed/embedding"]


def test_masks_and_labels_are_shaped_like_the_params_nodes_included():
    params, _ = _vit_params()
    tags = optim.tags(params, {"no_decay": NO_DECAY, "frozen": "Dense_0/kernel"})
    mask = tags.mask("no_decay", invert=True)
    labels = tags.labels("frozen", "no_decay")
    for tree in (mask, labels):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
    assert mask["Dense_0"]["kernel"].original is True
    assert mask["head"]["bias"] is False
    assert labels["Dense_0"]["kernel"].original == "frozen"
    assert labels["Dense_0"]["bias"] == "no_decay"
    assert labels["head"]["kernel"] == "default"
    # the trees drive optax as they are
    tx = optax.multi_transform(
        {
            "frozen": optax.set_to_zero(),
            "no_decay": optax.adam(0.1),
            "default": optax.adamw(0.1, weight_decay=0.5, mask=mask),
        },
        labels,
    )
    grads = jax.tree.map(jnp.ones_like, params)
    with STANDARD:
        updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["Dense_0"]["kernel"].original).max()) == 0.0
    assert float(jnp.abs(updates["head"]["kernel"]).min()) > 0.0


def test_a_tensors_tags_reach_its_originals_and_own_params_never_its_state():
    tree = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tree = px.spectral_norm(tree, "w")
    tree = px.register_parametrization(tree, "w", toys.Scale())
    tags = optim.tags(tree, {"frozen": "w"})  # a full tree, state included
    assert tags.paths("frozen") == ["w/original", "w/params/1/scale"]
    mask = tags.mask("frozen")
    assert jax.tree.leaves(mask["w"].state) == [False, False]
    assert jax.tree.leaves(tags.mask("frozen", invert=True)["w"].state) == [False, False]
    assert set(jax.tree.leaves(tags.labels()["w"].state)) == {"state"}


def test_a_path_may_name_one_array_of_a_node():
    tree = px.weight_norm({"w": jnp.ones((3, 2))}, "w")
    tags = optim.tags(tree, {"no_decay": "w/original0"})
    assert tags.paths("no_decay") == ["w/original0"]
    assert tags.mask("no_decay")["w"].originals == (True, False)


def test_key_tuples_and_predicates_and_never_substrings():
    tree = {"bias_scale": jnp.ones(2), "a/b": {"bias": jnp.ones(2)}, "layers": [{"k": jnp.ones(1)}]}
    tags = optim.tags(
        tree, {"t": ("a/b", "bias"), "l": "layers/0/k", "p": optim.named("bias_scale")}
    )
    assert tags.paths("t") == [str(("a/b", "bias"))]
    assert tags.paths("l") == ["layers/0/k"]
    assert tags.paths("p") == ["bias_scale"]
    assert optim.tags(tree, {"b": optim.biases}).paths("b") == [str(("a/b", "bias"))]


def test_errors_name_the_closest_paths():
    params, _ = _vit_params()
    with pytest.raises(ValueError, match=r"no array at path 'Dense_0/kernal'.*Dense_0/kernel"):
        optim.tags(params, {"frozen": "Dense_0/kernal"})
    with pytest.raises(ValueError, match=r"'Dense_0' is a subtree; write 'Dense_0/\.\.\.'"):
        optim.tags(params, {"frozen": "Dense_0"})
    with pytest.raises(ValueError, match=r"Tag 'x' selects no array.*named\('nope'\)"):
        optim.tags(params, {"x": optim.named("nope")})
    # a predicate alone may select nothing when another rule of the tag does
    optim.tags({"bias": jnp.ones(1)}, {"no_decay": NO_DECAY})
    tags = optim.tags(params, {"a": optim.biases})
    with pytest.raises(ValueError, match=r"No tag named 'b'; the tags are 'a'"):
        tags.mask("b")


def test_nnx_state_paths_and_nnx_optimizer():
    class Model(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.ln = nnx.LayerNorm(4, rngs=nnx.Rngs(0))
            self.emb = nnx.Embed(5, 4, rngs=nnx.Rngs(0))
            self.cls_token = nnx.Param(jnp.zeros((1, 4), jnp.float32))

        def __call__(self, x):
            return self.ln(self.lin(x)) + self.cls_token

    model = Model()
    pnx.orthogonal(model.lin)
    state = nnx.state(model, nnx.Param)
    tags = optim.tags(state, {"no_decay": NO_DECAY, "frozen": "lin/kernel"})
    assert tags.table == {
        "cls_token": ("no_decay",),
        "emb/embedding": ("no_decay",),
        "lin/bias": ("no_decay",),
        "lin/parametrizations/kernel/original": ("frozen",),
        "ln/bias": ("no_decay",),
        "ln/scale": ("no_decay",),
    }
    tx = optax.multi_transform(
        {
            "frozen": optax.set_to_zero(),
            "default": optax.adamw(0.1, 0.1, mask=tags.mask("no_decay", invert=True)),
        },
        tags.labels("frozen"),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = model.lin.parametrizations["kernel"].original.get_value()
    ln_before = model.ln.scale.get_value()
    grads = nnx.grad(lambda m: m(jnp.ones((2, 3), jnp.float32)).sum())(model)
    with STANDARD:
        opt.update(model, grads)
    assert bool(jnp.all(model.lin.parametrizations["kernel"].original.get_value() == before))
    assert not bool(jnp.all(model.ln.scale.get_value() == ln_before))


# ----- carry_state -------------------------------------------------------------------------

F32 = jnp.float32
X = jax.random.normal(jax.random.key(1), (8, 3), F32)
Y = jax.random.normal(jax.random.key(2), (8, 2), F32)


def _loss(params, state):
    p = px.materialize(params, state)
    h = jnp.tanh(X @ p["l1"]["kernel"] + p["l1"]["bias"][None])
    return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"][None] - Y) ** 2)


def _train(tx, params, state, opt_state, steps):
    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(_loss)(params, state)
        with STANDARD:  # optax's count arithmetic is not strict-promotion clean
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params, opt_state


def _plain():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "l1": {"kernel": jax.random.normal(k1, (3, 4), F32) * 0.5, "bias": jnp.zeros(4, F32)},
        "l2": {"kernel": jax.random.normal(k2, (4, 2), F32) * 0.5, "bias": jnp.full(2, 0.1, F32)},
    }


# forward is the identity, so a run with it registered computes the very same numbers
identity = px.Parametrization(forward=lambda x: x, right_inverse=lambda x: x, name="identity")


def _optimizers(params):
    def decay_mask(p):
        return optim.tags(p, {"no_decay": optim.biases}).mask("no_decay", invert=True)

    def labels(p):
        return optim.tags(p, {"slow": "l1/..."}).labels()

    return {
        "adam": optax.adam(0.05),
        "sgd_momentum": optax.sgd(0.05, momentum=0.9),
        "adamw_mask": optax.adamw(0.05, weight_decay=0.3, mask=decay_mask),
        "chain": optax.chain(
            optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-0.05)
        ),
        "multi_transform": optax.multi_transform(
            {"slow": optax.sgd(0.01, momentum=0.5), "default": optax.adam(0.05)}, labels
        ),
    }


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adamw_mask", "chain", "multi_transform"])
@pytest.mark.parametrize("surgery", ["remove", "register"])
def test_training_after_surgery_matches_the_final_tree_from_the_start_bit_for_bit(name, surgery):
    plain = _plain()
    registered, reg_state = px.split_state(
        px.register_parametrization(plain, "l1/kernel", identity)
    )
    if surgery == "remove":  # registered for 3 steps, then removed; vs plain from the start
        before, before_state, after, after_state = registered, reg_state, plain, {}
    else:  # plain for 3 steps, then registered; vs registered from the start
        before, before_state, after, after_state = plain, {}, registered, reg_state
    tx = _optimizers(before)[name]

    p, s = _train(tx, before, before_state, tx.init(before), 3)
    merged = px.merge_state(p, before_state)
    if surgery == "remove":
        new = px.remove_parametrizations(merged, "l1/kernel")
        new_state = {}
    else:
        new, new_state = px.split_state(px.register_parametrization(merged, "l1/kernel", identity))
    carried = optim.carry_state(tx, s, p, new)
    p_a, s_a = _train(tx, new, new_state, carried, 4)

    # the final tree from the start, given the carried moments (here: its own uninterrupted run)
    p_b, s_b = _train(tx, after, after_state, tx.init(after), 7)
    a, b = px.materialize(p_a, new_state), px.materialize(p_b, after_state)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(s_a), jax.tree.leaves(s_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_carried_moments_follow_the_tensor_and_new_arrays_start_fresh():
    plain = _plain()
    tree = px.orthogonal(plain, "l1/kernel")
    tree = px.weight_norm(tree, "l2/kernel")
    params, state = px.split_state(tree)
    tx = optax.adam(0.05)
    params, opt_state = _train(tx, params, state, tx.init(params), 2)
    mu = opt_state[0].mu

    # remove both, keeping the constrained values; then register a chain with its own params
    new = px.remove_parametrizations(px.merge_state(params, state), None)
    new = px.register_parametrization(new, "l2/bias", toys.Scale())
    new, _ = px.split_state(new)
    carried = optim.carry_state(tx, opt_state, params, new)
    cmu = carried[0].mu
    assert int(carried[0].count) == 2
    # orthogonal: one original of the kernel's shape -> the plain kernel keeps its moments
    np.testing.assert_array_equal(cmu["l1"]["kernel"], mu["l1"]["kernel"].original)
    # weight norm: original0 (g) and original1 (v) -> one kernel: v has the shape, but the
    # plain kernel is not the same tensor as v: fresh
    assert float(jnp.abs(cmu["l2"]["kernel"]).max()) == 0.0
    np.testing.assert_array_equal(cmu["l1"]["bias"], mu["l1"]["bias"])
    # l2/bias became kernel.original of a new chain: its moments go along; Scale's own
    # learnable array is new: fresh
    np.testing.assert_array_equal(cmu["l2"]["bias"].original, mu["l2"]["bias"])
    assert float(cmu["l2"]["bias"].params["0"]["scale"]) == 0.0
    # the carried state trains
    _train(tx, new, {}, carried, 1)


def test_params_are_not_mistaken_for_a_chains_or_multi_transforms_states():
    # (kernel, bias) has the structure of `optax.chain`'s (ScaleByAdamState, EmptyState)
    params = (jnp.ones((2, 2)), jnp.ones(2))
    tx = optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    with STANDARD:
        _, opt_state = tx.update(params, tx.init(params), params)
    carried = optim.carry_state(tx, opt_state, params, params)
    assert int(carried[0].count) == 1
    for x, y in zip(jax.tree.leaves(carried), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # labels named like the params: multi_transform's {label: state} has the params' keys
    params = {"enc": jnp.ones((2, 2)), "dec": jnp.ones(2)}
    tx = optax.multi_transform(
        {"enc": optax.adam(0.1), "dec": optax.sgd(0.1, momentum=0.9)}, {"enc": "enc", "dec": "dec"}
    )
    with STANDARD:
        _, opt_state = tx.update(params, tx.init(params), params)
    carried = optim.carry_state(tx, opt_state, params, params)
    for x, y in zip(jax.tree.leaves(carried), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_state_of_another_optimizer_or_other_params_is_refused():
    plain = _plain()
    tx = optax.adam(0.1)
    with pytest.raises(ValueError, match="does not have the structure"):
        optim.carry_state(tx, optax.sgd(0.1, momentum=0.9).init(plain), plain, plain)
    other = {"l1": plain["l1"]}
    with pytest.raises(ValueError, match="not built for `old_params`"):
        optim.carry_state(tx, tx.init(plain), other, plain)


def test_nnx_optimizer_state_survives_remove_parametrizations():
    model = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    tx = optax.adam(0.1)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.ones((2, 3), F32)).sum())(model)
    with STANDARD:
        opt.update(model, grads)
    old = nnx.state(model, nnx.Param)
    mu = opt.opt_state[0].mu["parametrizations"]["kernel"]["original"].get_value()
    pnx.remove_parametrizations(model, "kernel")
    new_opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    carried = optim.carry_state(tx, opt.opt_state, old, nnx.state(model, nnx.Param))
    jax.tree.map(
        lambda v, x: v.set_value(x),
        new_opt.opt_state,
        carried,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    np.testing.assert_array_equal(new_opt.opt_state[0].mu["kernel"].get_value(), mu)
    assert int(new_opt.opt_state[0].count.get_value()) == 1
    with STANDARD:
        new_opt.update(model, nnx.grad(lambda m: m(jnp.ones((2, 3), F32)).sum())(model))


def test_tags_see_nested_nnx_registrations_and_nnx_state():
    # A registration on a paramx.nnx original nests `parametrizations` twice; `named` matched
    # the inner name only. A full nnx.state holds ParametrizationState arrays, which masks
    # must never select; they counted as plain arrays.
    from flax import nnx

    import paramx.nnx as pnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 3, rngs=rngs)
            self.b = pnx.spectral_norm(nnx.Linear(3, 3, rngs=rngs))

    model = Model(nnx.Rngs(0))
    double = px.Parametrization(forward=lambda x: 2 * x, right_inverse=lambda x: x / 2)
    pnx.register_parametrization(model.b.parametrizations["kernel"], "original", double)
    frozen = px.optim.tags(nnx.state(model, nnx.Param), {"frozen": px.optim.named("kernel")})
    assert frozen.paths("frozen") == [
        "a/kernel",
        "b/parametrizations/kernel/parametrizations/original/original",
    ]
    full = px.optim.tags(nnx.state(model), {"nd": px.optim.biases})
    assert "2 of state" in repr(full)
    state = full.mask("nd", invert=True)["b"]["parametrizations"]["kernel"]["state"]
    assert jax.tree.leaves(state) == [False, False]


def test_missing_names_list_the_closest_once_and_parametrized_ones_too():
    # optim.tags listed a node's path twice; paramx.nnx listed only plain Variables, so a
    # typo of a parametrized tensor's name had no suggestion.
    import paramx.nnx as pnx

    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    params = px.orthogonal(params, "dense/kernel")
    with pytest.raises(ValueError, match="Closest paths") as err:
        px.optim.tags(params, {"x": "dense/kernal"})
    assert str(err.value).count("'dense/bias'") == 1
    layer = pnx.spectral_norm(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    identity = px.Parametrization(forward=lambda x: x)
    with pytest.raises(ValueError, match="Closest names: 'kernel'"):
        pnx.register_parametrization(layer, "kernal", identity)
