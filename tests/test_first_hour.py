"""Issue 11: what users hit in their first hour, on the tree API (the core).

Each test failed on the code before the fix: a silent wrong result, an obscure crash, or an
error without a path.
"""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toys
from conftest import ROOT, assert_close
from flax import serialization
from flax.core import FrozenDict

import paramx as px


def _kernel(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# ----- 1: the registered tree and the optimizer ---------------------------------------------------
def test_grad_of_the_unsplit_tree_is_refused_for_every_stateful_builtin():
    tree = {"a": _kernel((4, 3)), "b": _kernel((3, 3), 1)}
    tree = px.spectral_norm(tree, "a")
    tree = px.orthogonal(tree, "b")

    def loss(t):
        return sum(jnp.sum(v) for v in jax.tree.leaves(px.materialize(t)))

    with pytest.raises(ValueError, match=r"state of the parametrized tensor at (a|b).*split_state"):
        jax.grad(loss)(tree)
    params, state = px.split_state(tree)
    grads = jax.jit(jax.grad(lambda p: loss(px.merge_state(p, state))))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)


# ----- 5: stacked layers --------------------------------------------------------------------------
def test_spectral_norm_on_a_stack_normalizes_each_layer():
    k = _kernel((3, 5, 4))
    tree = px.spectral_norm({"k": k}, "k")  # the old behaviour: one sigma for the whole stack
    params, state = px.split_state(px.register_parametrization(
        {"k": k}, "k", px.SpectralNorm(), batch_axes=1))  # fmt: skip
    w = jax.jit(px.materialize)(params, state)["k"]
    sigmas = [float(jnp.linalg.norm(w[i], 2)) for i in range(3)]
    np.testing.assert_allclose(sigmas, 1.0, atol=1e-3)
    assert params["k"].original.shape == (3, 5, 4) and state["k"]["0"]["u"].shape == (3, 4)
    # each layer's u is its own: different random starts, per-layer power iteration
    assert not np.allclose(state["k"]["0"]["u"][0], state["k"]["0"]["u"][1])
    del tree


def test_a_stack_registered_per_layer_materializes_outside_the_vmap():
    # What nn.scan / nn.vmap do: register inside the mapped function, stack outside.
    ks = _kernel((4, 3, 3))
    stacked = jax.vmap(lambda k: px.spectral_norm({"k": k}, "k"))(ks)
    assert stacked["k"].batch_shape == (4,)
    params, state = px.split_state(stacked)
    w, new_state = px.materialize(params, state, update_state=True)
    for i in range(4):
        one = px.materialize(jax.tree.map(lambda x, i=i: x[i], stacked))["k"]
        assert_close(w["k"][i], one)
    assert new_state["k"]["0"]["u"].shape == (4, 3)
    # assign and remove work per tensor of the stack too
    q = jax.vmap(lambda k: jnp.linalg.qr(k)[0])(ks)
    orth = jax.vmap(lambda k: px.orthogonal({"k": k}, "k"))(ks)
    orth = px.assign(orth, "k", q)
    assert_close(px.materialize(orth)["k"], q, scale=10)
    assert px.remove_parametrizations(orth, "k")["k"].shape == (4, 3, 3)


def test_batch_axes_is_validated():
    with pytest.raises(ValueError, match="batch_axes"):
        px.register_parametrization({"k": jnp.ones(3)}, "k", jnp.tanh, batch_axes=-1)
    with pytest.raises(ValueError, match=r"batch_axes=3.*at k"):
        px.register_parametrization({"k": jnp.ones((2, 2))}, "k", jnp.tanh, batch_axes=3)


# ----- 11: Flax partitioning boxes pass through untouched -----------------------------------------
def test_rules_on_boxed_kernels_keep_the_box():
    model = nn.Dense(
        4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "m"))
    )
    variables = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.float32))
    tree = px.spectral_norm(variables, "params/kernel")
    box = tree["params"]["kernel"]
    assert isinstance(box, nn.Partitioned) and px.is_parametrized(tree, "params/kernel")
    params, state = px.split_state(tree)
    plain = px.materialize(params, state)
    assert isinstance(plain["params"]["kernel"], nn.Partitioned)
    assert plain["params"]["kernel"].names == (None, "m")
    y = model.apply(plain, jnp.ones((1, 3), jnp.float32))
    assert y.shape == (1, 4)
    w = plain["params"]["kernel"].value
    assert abs(float(jnp.linalg.norm(w, 2)) - 1) < 1e-3


# ----- 13: forgetting materialize -----------------------------------------------------------------
def test_applying_the_registered_tree_says_to_materialize():
    model = nn.Dense(3)
    x = jnp.ones((1, 2), jnp.float32)
    for register in (px.spectral_norm, px.orthogonal):
        tree = register(model.init(jax.random.key(0), x), "params/kernel")
        with pytest.raises(TypeError, match=r"paramx.materialize"):
            model.apply(tree, x)
    node = tree["params"]["kernel"]
    with pytest.raises(TypeError, match=r"paramx.materialize"):
        np.asarray(node)
    for use in (lambda: node + 1, lambda: x @ node, lambda: node @ x):
        with pytest.raises(TypeError, match=r"paramx.materialize"):
            use()
    with pytest.raises(AttributeError, match=r"paramx.materialize.*\.shape"):
        node.shape  # noqa: B018
    assert not hasattr(node, "dtype")


# ----- 14: right_inverse as ordinary Python validation --------------------------------------------
def _checked_triu(w):
    if not bool(jnp.allclose(w, w.T)):
        raise ValueError("not symmetric")
    return jnp.triu(w)


checked_symmetric = px.Parametrization(forward=toys._sym, right_inverse=_checked_triu)


def test_python_validation_in_right_inverse_runs_on_concrete_values():
    tree = px.register_parametrization({"w": jnp.eye(3)}, "w", jnp.tanh)
    tree = px.register_parametrization(tree, "w", checked_symmetric)  # appended: checked
    assert tree["w"].chain_names()[-1] == "_sym"
    plain = px.register_parametrization({"w": jnp.eye(3)}, "w", checked_symmetric)
    with pytest.raises(ValueError, match=r"not symmetric \(at w\)"):
        px.assign(plain, "w", jnp.arange(9.0).reshape(3, 3))


def test_python_validation_in_forward_runs_on_concrete_values():
    def strict(x):
        if bool(jnp.any(jnp.isnan(x))):
            raise ValueError("nan")
        return x * 2

    tree = px.register_parametrization({"w": jnp.ones(2)}, "w", strict)
    assert_close(px.materialize(tree)["w"], jnp.full(2, 2.0))


# ----- 15: a right_inverse may not move the tensor to another device ------------------------------
def test_right_inverse_that_changes_device_is_refused():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, paramx as px
        d0, d1 = jax.devices()[:2]
        to_d1 = lambda y: jax.device_put(y, d1)
        move = px.Parametrization(forward=lambda x: x, right_inverse=to_d1)
        try:
            px.register_parametrization({"w": jax.device_put(jnp.ones(2), d0)}, "w", move)
        except ValueError as e:
            print("REFUSED", e)
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in out.stdout, out.stderr
    assert "may not change the device" in out.stdout and "At w:" in out.stdout


# ----- 16 and 24: transfer ------------------------------------------------------------------------
def test_transfer_creates_a_missing_tensor_and_checks_parametrized_targets():
    src = px.spectral_norm({"a": {"w": _kernel((3, 2))}}, "a/w")
    out = px.transfer_parametrizations_and_params(src, {"b": jnp.zeros(1)})
    assert px.is_parametrized(out, "a/w") and "b" in out
    out = px.transfer_parametrizations_and_params(src, FrozenDict({"a": {}}))
    assert isinstance(out, FrozenDict) and px.is_parametrized(out, "a/w")
    mismatched = px.spectral_norm({"a": {"w": _kernel((4, 2))}}, "a/w")
    with pytest.raises(ValueError, match=r"a/w.*parametrized tensor is float32\[4, 2\]"):
        px.transfer_parametrizations_and_params(src, mismatched)
    with pytest.raises(ValueError, match=r"only dicts can gain"):
        px.transfer_parametrizations_and_params(src, {"a": [jnp.zeros(1)]})


# ----- 18: errors name the path; wrong arity; '/' in keys; remove on the split half ---------------
def test_errors_raised_inside_a_parametrization_name_the_path():
    def picky(x):
        raise ValueError("picky refuses")

    with pytest.raises(ValueError, match=r"picky refuses \(at params/w\)"):
        px.register_parametrization({"params": {"w": jnp.ones(2)}}, "params/w", picky)
    with pytest.raises(IndexError, match=r"at params/w"):
        px.spectral_norm({"params": {"w": jnp.ones((2, 2))}}, "params/w", dim=5)


def test_wrong_arity_forward_says_what_it_receives():
    two = px.Parametrization(forward=lambda a: a, right_inverse=lambda w: (w, w))
    with pytest.raises(TypeError, match=r"cannot be called with 2 tensor.*first link.*at w"):
        px.register_parametrization({"w": jnp.ones(2)}, "w", two)


def test_keys_with_slashes_are_suggested_as_tuples():
    tree = {"mlp/~/linear_1": {"w": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"\('mlp/~/linear_1', 'w'\)"):
        px.register_parametrization(tree, "mlp/~/linear_1/w", jnp.tanh)
    tree = px.register_parametrization(tree, ("mlp/~/linear_1", "w"), jnp.tanh)
    assert "('mlp/~/linear_1', 'w')" in px.summary(tree)


def test_remove_on_the_split_half_points_to_the_state_argument():
    params, state = px.split_state(px.spectral_norm({"k": _kernel((3, 2))}, "k"))
    with pytest.raises(ValueError, match=r"at k.*state=state"):
        px.remove_parametrizations(params, "k")
    out = px.remove_parametrizations(params, "k", state=state)
    assert_close(out["k"], px.materialize(params, state)["k"])


# ----- 22: `where` of the wrong type --------------------------------------------------------------
@pytest.mark.parametrize("where", [3, {"k"}, None, 1.5, ("k", 1.5)])
def test_where_of_the_wrong_type_says_what_where_may_be(where):
    with pytest.raises(TypeError, match=r"`where`"):
        px.register_parametrization({"k": jnp.ones(2)}, where, jnp.tanh)


def test_a_predicate_must_return_a_bool():
    with pytest.raises(TypeError, match=r"must return a Python bool"):
        px.register_parametrization({"k": jnp.ones(2)}, lambda p, x: x, jnp.tanh)


# ----- 23: a state half or a checkpoint that does not fit the tree --------------------------------
def test_a_state_half_of_the_wrong_shapes_names_path_and_expected_layout():
    params, state = px.split_state(px.spectral_norm({"k": _kernel((3, 3))}, "k"))
    bad = jax.tree.map(lambda x: jnp.ones(x.shape[0] + 1), state)
    with pytest.raises(ValueError, match=r"at k.*expected \{'0': \{'u': 'float32\[3\]'"):
        px.materialize(params, bad)
    with pytest.raises(ValueError, match=r"at k.*dict keyed by link position"):
        px.materialize(params, {"k": jnp.ones(3)})


def test_a_plain_checkpoint_into_a_registered_template_names_the_path():
    plain = {"params": {"k": _kernel((3, 3))}}
    template = px.spectral_norm(plain, "params/k")
    with pytest.raises(ValueError, match=r"params/k.*plain checkpoint"):
        serialization.from_bytes(template, serialization.to_bytes(plain))


# ----- 25: FrozenDict trees keep their structure --------------------------------------------------
def test_split_and_merge_keep_frozendict_structure_exactly():
    tree = px.spectral_norm(FrozenDict({"params": {"k": _kernel((3, 3))}}), "params/k")
    params, state = px.split_state(tree)
    merged = px.merge_state(params, state)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tree)
    _, new_state = px.materialize(params, state, update_state=True)
    again = px.merge_state(params, new_state)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(tree)
