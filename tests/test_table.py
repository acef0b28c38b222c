"""The parameter table: `px.table` (any tree) and `paramx.nnx.table` (an NNX module)."""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toys
from conftest import assert_close
from flax import nnx

import paramx as px
import paramx.nnx as pnx

X = jnp.ones((2, 3), jnp.float32)


def _registered():
    """Every role: orthogonal (original + state), weight norm (two originals), a link's own
    learnable array (toys.Scale), a plain leaf."""
    tree = {
        "enc": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)},
        "dec": {"kernel": jnp.arange(6.0).reshape(3, 2) + 1.0},
        "scale": jnp.ones(2),
    }
    tree = px.orthogonal(tree, "enc/kernel")
    tree = px.weight_norm(tree, "dec/kernel")
    return px.register_parametrization(tree, "scale", toys.Scale())


def _roles(t):
    return {r.path: r.role for r in t.rows}


def test_plain_tree_is_all_plain_with_totals_per_module():
    f32 = jnp.float32
    t = px.table(
        {"a": {"w": jnp.ones((2, 3), f32), "b": jnp.ones(3, f32)}, "c": np.ones(4, np.int8)}
    )
    assert set(_roles(t).values()) == {"plain"}
    assert t.total.arrays == 3 and t.total.size == 13
    assert t.total.nbytes == 9 * 4 + 4
    by_module = {k: v.to_dict() for k, v in t.by_module.items()}
    assert by_module == {
        "a": {"arrays": 2, "size": 9, "nbytes": 36},
        "<root>": {"arrays": 1, "size": 4, "nbytes": 4},
    }
    assert [r.shape for r in t.rows] == [(3,), (2, 3), (4,)]
    assert not t.health


def test_registered_tree_roles_chain_and_totals():
    t = px.table(_registered(), health=False)
    assert _roles(t) == {
        "dec/kernel/original0": "original",
        "dec/kernel/original1": "original",
        "enc/bias": "plain",
        "enc/kernel/original": "original",
        "enc/kernel/state/0/base": "state",
        "scale/original": "original",
        "scale/params/0/scale": "parametrization",
    }
    chains = {r.path: r.chain for r in t.rows}
    assert chains["dec/kernel/original1"] == ("weight_norm",)
    assert chains["enc/bias"] == ()
    assert {r.path: r.tensor for r in t.rows}["enc/kernel/state/0/base"] == "enc/kernel"
    assert list(t.by_role) == ["original", "parametrization", "plain", "state"]
    assert t.by_role["original"].size == 2 + 6 + 9 + 2
    assert t.by_role["parametrization"].arrays == 1
    assert t.by_module["enc"].size == 3 + 9 + 9
    assert t.by_module["<root>"].size == 3  # scale: its original and its learnable scalar
    text = str(t)
    assert "weight_norm" in text and "total" in text and "module" in text
    assert "health" not in text


def test_a_tied_leaf_is_listed_with_its_source_and_not_counted():
    tree = px.tie(
        _registered(), "enc/bias", "scale", transform=lambda s: jnp.concatenate([s, s[:1]])
    )
    t = px.table(tree, health=False)
    [row] = [r for r in t.rows if r.path == "enc/bias"]
    assert (row.role, row.shape, row.size, row.nbytes) == ("tied", (3,), 0, 0)
    assert row.chain == ("tied to scale (<lambda>)",)
    assert "tied" not in t.by_role
    assert t.by_module["enc"].arrays == 2  # the kernel's original and state only
    assert "tied to scale" in str(t)
    wrapped = px.table({"params": px.tie({"a": jnp.ones(2), "b": jnp.ones(2)}, "b", "a")})
    assert {r.path: r.chain for r in wrapped.rows}["params/b"] == ("tied to params/a",)


def test_roles_agree_with_param_labels():
    tree = _registered()
    labels = jax.tree_util.tree_leaves(px.param_labels(tree))
    assert [r.role for r in px.table(tree, health=False).rows] == labels


def test_split_halves_and_a_trainable_half_alone():
    tree = px.spectral_norm(_registered(), "enc/bias")  # 1-D: no state
    params, state = px.split_state(tree)
    merged, split = px.table(tree), px.table(params, state)
    assert [(r.path, r.role) for r in split.rows] == [(r.path, r.role) for r in merged.rows]
    assert_close(
        split.health["enc/kernel"]["orth_error"], merged.health["enc/kernel"]["orth_error"]
    )
    with pytest.warns(UserWarning, match=r"enc/kernel.*state half"):
        alone = px.table(params)
    assert "enc/kernel" not in alone.health  # orthogonal needs its base
    assert "state" not in alone.by_role
    assert "enc/bias" in alone.health  # a stateless link still reports


def test_linen_variables_collections_and_modules():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = px.linen.Parametrize(nn.Dense(4), {"kernel": px.SpectralNorm()})(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(2)(x)

    net = Net()
    variables = net.init(jax.random.key(0), X)
    t = px.table(variables)
    rows = {r.path: r for r in t.rows}
    assert rows["params/Dense_0/kernel/original"].role == "original"
    assert rows["params/Dense_0/kernel/state/0/u"].role == "state"
    assert rows["params/Dense_0/kernel/state/0/u"].collection == "paramx_state"
    assert rows["batch_stats/BatchNorm_0/mean"].collection == "batch_stats"
    assert rows["batch_stats/BatchNorm_0/mean"].role == "plain"
    assert set(t.by_module) == {"Dense_0", "BatchNorm_0", "Dense_1"}
    assert t.by_module["Dense_0"].size == 12 + 4 + 4 + 3
    assert set(t.health["params/Dense_0/kernel"]) == {"sigma", "sigma_true"}
    # The same table from the two collections given apart.
    apart = px.table(variables["params"], variables["paramx_state"], health=False)
    assert apart.by_role["state"].size == 7
    # model.tabulate shows the parametrized model (tests/test_linen_tools.py checks the text).
    text = net.tabulate(jax.random.key(0), X, console_kwargs={"width": 200})
    assert f"Total Parameters: {t.total.size} " in text  # 49, all collections


def test_state_of_a_registered_init_tree_is_in_params_not_a_state_collection():
    # the tree API on model.init's output: the state lives in the nodes under 'params'
    variables = nn.Dense(3).init(jax.random.key(0), X)
    rows = {r.path: r for r in px.table(px.orthogonal(variables, "params/kernel")).rows}
    assert rows["params/kernel/state/0/base"].role == "state"
    assert rows["params/kernel/state/0/base"].collection == "params"


def test_a_linen_state_collection_of_another_name_goes_back_into_its_nodes():
    wrapped = px.linen.Parametrize(
        nn.Dense(3), {"kernel": px.SpectralNorm()}, state_collection="sn"
    )
    variables = wrapped.init(jax.random.key(0), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the health figures need the state
        t = px.table(variables)
    rows = {r.path: r for r in t.rows}
    assert (rows["params/kernel/state/0/u"].role, rows["params/kernel/state/0/u"].collection) == (
        "state",
        "sn",
    )
    assert set(t.health["params/kernel"]) == {"sigma", "sigma_true"}
    assert set(t.by_module) == {px._src.core.table.ROOT}
    assert t.by_role["state"].size == 3 + 3


def _nnx_model():
    class Model(nnx.Module):
        def __init__(self):
            self.enc = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
            self.mid = pnx.spectral_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(1)))
            self.dec = nnx.Linear(4, 2, rngs=nnx.Rngs(2))

        def __call__(self, x):
            return self.dec(self.mid(self.enc(x)))

    return Model()


def test_nnx_table_and_nnx_state():
    model = _nnx_model()
    t = pnx.table(model)
    rows = {r.path: r for r in t.rows}
    original = rows["enc/parametrizations/kernel/original"]
    assert (original.role, original.collection, original.chain) == (
        "original",
        "Param",
        ("orthogonal",),
    )
    assert original.tensor == "enc/kernel" and original.module == "enc"
    base = rows["enc/parametrizations/kernel/state/0/base"]
    assert (base.role, base.collection) == ("state", "ParametrizationState")
    assert rows["dec/kernel"].role == "plain"
    assert set(t.health) == {"enc/kernel", "mid/kernel"}
    assert float(t.health["enc/kernel"]["orth_error"]) < 1e-5
    assert dict(t.by_module)["mid"].size == 4 + 12 + 4 + 3
    # nnx.state: the same roles and totals, read off the paths (no chain, no health).
    s = px.table(nnx.state(model))
    assert [(r.path, r.role) for r in s.rows] == [(r.path, r.role) for r in t.rows]
    assert s.by_role == t.by_role and s.by_module == t.by_module
    assert not s.health
    # nnx.tabulate shows the Params and the ParametrizationState apart.
    text = nnx.tabulate(model, X, console_kwargs={"width": 200})
    assert f"Total Parameters: {t.total.size} " in text  # 54: Params 38, state 16
    # A nested chain (a constraint on the orthogonal kernel's original): rows are Variables.
    pnx.register_parametrization(
        model.enc.parametrizations["kernel"], "original", px.constraints.Symmetric()
    )
    nested = pnx.table(model, health=False)
    assert nested.by_role == t.by_role
    deep = {r.path: r for r in nested.rows}[
        "enc/parametrizations/kernel/parametrizations/original/original"
    ]
    assert (deep.tensor, deep.chain, deep.module) == ("enc/kernel/original", ("symmetric",), "enc")


def test_orthogonal_health_after_materialize_and_for_a_perturbed_base():
    tree = px.orthogonal({"w": jax.random.normal(jax.random.key(0), (3, 3))}, "w")
    assert float(px.table(tree).health["w"]["orth_error"]) < 1e-5
    node = tree["w"]
    bad = node.replace(state={"0": {"base": node.state["0"]["base"] * 1.1}})
    err = px.table({"w": bad}).health["w"]["orth_error"]
    q = jax.jit(px.materialize)({"w": bad})["w"]
    assert_close(err, jnp.linalg.norm(q.T @ q - jnp.eye(3)), scale=10)
    assert float(err) > 1e-2


def test_spectral_norm_sigma_converges_to_the_svd_value():
    w = jax.random.normal(jax.random.key(1), (5, 4))
    tree = px.register_parametrization({"w": w}, "w", px.SpectralNorm(n_power_iterations=100))
    _, state = px.materialize(tree, update_state=True)
    params, _ = px.split_state(tree)
    h = px.table(params, state).health["w"]
    assert_close(h["sigma_true"], jnp.linalg.norm(w, 2), scale=10)
    assert_close(h["sigma"], h["sigma_true"], scale=10)


def test_weight_norm_and_distance_health():
    v = jnp.array([[3.0, 0.0], [4.0, 0.5]])
    tree = px.weight_norm({"w": v, "s": jnp.array([1.0, 2.0, 2.0])}, "w")
    tree = px.constraints.sphere(tree, "s")
    h = px.table(tree).health
    assert_close(h["w"]["v_norm_min"], jnp.array(0.5))
    value = px.materialize(tree)["s"]
    assert_close(h["s"]["distance"], px.constraints.Sphere().distance(value), scale=10)


def test_stacked_health_to_dict_text_and_treescope():
    w = jnp.stack([jnp.eye(3, dtype=jnp.float32), 2 * jnp.eye(3, dtype=jnp.float32)])
    tree = px.spectral_norm({"layers": {"w": w}}, "layers/w", batch_axes=1)
    t = px.table(tree)
    sigma = t.health["layers/w"]["sigma_true"]
    assert sigma.shape == (2,)
    assert_close(sigma, jnp.array([1.0, 2.0]), scale=10)
    d = t.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["rows"][0]["health"]["sigma_true"] == pytest.approx([1.0, 2.0], rel=1e-5)
    assert d["by_role"]["state"] == {"arrays": 2, "size": 12, "nbytes": 48}
    assert "sigma_true=1..2" in str(t)
    import treescope

    text = treescope.render_to_text(t)
    assert "'layers/w/original'" in text and "sigma_true=1..2" in text and "by_module" in text
    assert "<table>" in t._repr_html_() and "sigma_true=1..2" in t._repr_html_()


def test_health_is_jittable():
    tree = _registered()
    eager = px.table(tree).health
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jitted = jax.jit(lambda t: px.table(t).health)(tree)
    assert set(jitted) == set(eager) == {"enc/kernel", "dec/kernel"}
    for name, figures in eager.items():
        for k, v in figures.items():
            assert_close(jitted[name][k], v, scale=10)


def test_health_of_a_checkpoint_restored_as_numpy_arrays():
    from flax import serialization

    tree = _registered()
    restored = serialization.from_bytes(tree, serialization.to_bytes(tree))
    assert isinstance(restored["enc"]["kernel"].original, np.ndarray)
    eager = px.table(tree).health
    health = px.table(restored).health
    assert set(health) == set(eager) == {"enc/kernel", "dec/kernel"}
    for name, figures in eager.items():
        for k, v in figures.items():
            assert_close(health[name][k], v, scale=10)


def test_eval_shape_tree_without_health():
    tree = jax.eval_shape(lambda: _registered())
    t = px.table(tree, health=False)
    assert t.total.size == px.table(_registered(), health=False).total.size
