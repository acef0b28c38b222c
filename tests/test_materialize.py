"""materialize, state threading, caching (trace counts) and retracing."""

from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import jax.test_util
import pytest
import toys
from conftest import assert_close

import paramx as px


def _counting(counter, fn=jnp.tanh, inverse=None):
    """A parametrization whose forward counts how often it is traced (or run eagerly)."""

    def forward(x):
        counter["n"] += 1
        return fn(x)

    return px.Parametrization(forward=forward, right_inverse=inverse, name="counting")


# --- values and gradients ------------------------------------------------------------------------
def test_plain_tree_has_the_structure_of_model_init():
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.float32))
    tree = px.register_parametrization(
        variables, lambda p, x: px.path_keys(p)[-1] == "kernel", toys.forward_only
    )
    plain = jax.jit(px.materialize)(tree)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(variables)
    model.apply(plain, jnp.ones((1, 3), jnp.float32))


def test_gradients_match_the_hand_written_chain():
    value = jnp.array([[0.5, 1.0], [2.0, 0.25]], jnp.float64)
    tree = px.register_parametrization({"w": value}, "w", toys.positive)
    tree = px.register_parametrization(tree, "w", toys.Scale(3.0))
    target = jnp.array([[1.0, -1.0], [0.5, 2.0]], jnp.float64)

    def loss(t):
        return jnp.sum((px.materialize(t)["w"] - target) ** 2)

    grads = jax.jit(jax.grad(loss))(tree)

    def by_hand(original, scale):
        return jnp.sum((jax.nn.softplus(original) * scale - target) ** 2)

    g_orig, g_scale = jax.grad(by_hand, argnums=(0, 1))(
        tree["w"].original, tree["w"].params["1"]["scale"]
    )
    assert_close(grads["w"].original, g_orig)
    assert_close(grads["w"].params["1"]["scale"], g_scale)

    def value_of(original):
        return px.materialize({"w": tree["w"].replace(originals=(original,))})["w"]

    jax.test_util.check_grads(value_of, (tree["w"].original,), order=2, modes=["fwd", "rev"])


def test_state_changes_only_when_asked():
    value = jnp.array([1.0, -2.0], jnp.float32)
    tree = px.register_parametrization({"w": value}, "w", toys.RunningMax())
    params, state = px.split_state(tree)
    # a training step moved the original past the running maximum (2.0)
    params = {"w": params["w"].replace(originals=(jnp.array([6.0, 1.0], jnp.float32),))}
    frozen = jax.jit(px.materialize)(params, state)
    assert_close(frozen["w"], jnp.array([3.0, 0.5], jnp.float32))
    plain, new_state = jax.jit(lambda p, s: px.materialize(p, s, update_state=True))(params, state)
    assert float(new_state["w"]["0"]) == 6.0
    assert float(state["w"]["0"]) == 2.0  # the input state is untouched
    assert_close(
        plain["w"], jnp.array([1.0, 1.0 / 6.0], jnp.float32)
    )  # forward used the updated state


def test_state_in_nodes_or_passed_separately_agree():
    tree = px.register_parametrization(
        {"w": jnp.array([1.0, -2.0], jnp.float32)}, "w", toys.RunningMax()
    )
    params, state = px.split_state(tree)
    a = px.materialize(tree, update_state=True)
    b = px.materialize(params, state, update_state=True)
    assert_close(a[0]["w"], b[0]["w"])
    assert jax.tree_util.tree_structure(a[1]) == jax.tree_util.tree_structure(b[1])
    assert px.merge_state(params, b[1])["w"].state == {"0": b[1]["w"]["0"]}


def test_merge_state_rejects_a_foreign_state():
    tree = px.register_parametrization({"w": jnp.ones(2)}, "w", toys.RunningMax())
    params, _ = px.split_state(tree)
    with pytest.raises(ValueError, match="The state does not match the tree"):
        px.merge_state(params, {"other": {"0": jnp.ones(())}, "w": None})


class _Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


@flax.struct.dataclass
class _StructPair:
    w: jax.Array
    b: jax.Array


@pytest.mark.parametrize("container", [_Pair, _StructPair])
def test_the_state_half_round_trips_through_attribute_containers(container):
    # NamedTuples and flax.struct dataclasses key their children by attribute name; the state
    # half files the state under the same plain keys (layers/0/w), and reads it back there.
    layers = [container(jnp.array([1.0, -2.0]), jnp.zeros(2)) for _ in range(2)]
    tree = px.register_parametrization({"layers": layers}, "layers/0/w", toys.RunningMax())
    params, state = px.split_state(tree)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
        {"layers": {0: {"w": {"0": 0}}}}
    )
    plain, new_state = jax.jit(lambda p, s: px.materialize(p, s, update_state=True))(params, state)
    assert_close(plain["layers"][0].w, jnp.array([0.5, -1.0], jnp.float32))
    assert type(plain["layers"][0]) is container
    assert float(px.merge_state(params, new_state)["layers"][0].w.state["0"]) == 4.0
    with pytest.raises(ValueError, match=r"entry at layers/0/x.*\['b', 'w'\]"):
        px.merge_state(params, {"layers": {0: {"x": {"0": jnp.ones(())}}}})
    with pytest.raises(ValueError, match="entry at layers/0/b, where the tree has no"):
        px.merge_state(params, {"layers": {0: {"b": {"0": {"u": jnp.ones(())}}}}})


# --- caching: each parametrized tensor computed once per step ------------------------------------
class SharedTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="shared")
        for _ in range(3):  # the same layer (and kernel) read three times
            x = jnp.tanh(dense(x))
        return x


class ScanRNN(nn.Module):
    @nn.compact
    def __call__(self, xs):
        cell = nn.scan(
            _Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
        )(name="cell")
        carry = jnp.zeros((xs.shape[0], 4), xs.dtype)
        _, ys = cell(carry, xs)
        return ys


class _Cell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        w = self.param("recurrent", nn.initializers.orthogonal(), (4, 4), jnp.float32)
        h = jnp.tanh(h @ w + nn.Dense(4, name="inp")(x))
        return h, h


@pytest.mark.parametrize("model, x", [
    (SharedTwice(), jnp.ones((2, 4), jnp.float32)),
    (ScanRNN(), jnp.ones((2, 100, 3), jnp.float32)),
])  # fmt: skip
def test_forward_is_traced_once_per_step(model, x):
    variables = model.init(jax.random.key(0), x)
    counter = {"n": 0}
    where = lambda p, leaf: px.path_keys(p)[-1] in ("kernel", "recurrent") and leaf.shape == (4, 4)
    tree = px.register_parametrization(variables, where, _counting(counter), unsafe=True)
    assert px.is_parametrized(tree)
    counter["n"] = 0

    @jax.jit
    def step(tree, x):
        def loss(tree):
            return jnp.sum(model.apply(px.materialize(tree), x) ** 2)

        return jax.value_and_grad(loss)(tree)

    step(tree, x)
    assert counter["n"] == 1
    step(tree, x)  # compiled: not traced again
    assert counter["n"] == 1


def test_cached_computes_once_for_many_calls():
    runs = {"n": 0}

    def forward(x):
        jax.debug.callback(lambda: runs.__setitem__("n", runs["n"] + 1))
        return jnp.tanh(x)

    tree = px.register_parametrization(
        {"w": jnp.eye(3, dtype=jnp.float32)}, "w", forward, unsafe=True
    )
    apply = jax.jit(lambda w, x: x @ w["w"])
    batches = [jnp.ones((2, 3), jnp.float32) * i for i in range(5)]

    runs["n"] = 0
    assert px.cached is px.precompute  # the earlier name stays an alias
    weights = px.cached(tree)
    outs = [apply(weights, b) for b in batches]
    jax.effects_barrier()
    assert runs["n"] == 1
    naive = jax.jit(lambda t, x: x @ px.materialize(t)["w"])
    runs["n"] = 0
    ref = [naive(tree, b) for b in batches]
    jax.effects_barrier()
    assert runs["n"] == 5  # the contrast: per-batch materialization recomputes
    for a, b in zip(outs, ref):
        assert_close(a, b)


# --- retracing -----------------------------------------------------------------------------------
def _fresh_tree(seed):
    k = jax.random.key(seed)
    return {
        "a": jax.random.normal(k, (3, 3), jnp.float32),
        "b": jax.random.uniform(k, (4,), jnp.float32, 0.5, 2.0),
        "c": jnp.ones((2,), jnp.float32),
    }


def _register_all(tree, scale=None):
    scale = toys.Scale(2.0) if scale is None else scale
    tree = px.register_parametrization(tree, "a", toys.symmetric, unsafe=True)
    tree = px.register_parametrization(tree, "b", toys.positive)
    tree = px.register_parametrization(tree, "c", scale)
    return px.register_parametrization(tree, "c", toys.RunningMax())


def test_same_parametrizations_on_a_fresh_tree_do_not_retrace():
    traces = {"n": 0}

    @jax.jit
    def step(tree):
        traces["n"] += 1
        return px.materialize(tree, update_state=True)

    step(_register_all(_fresh_tree(0)))
    step(_register_all(_fresh_tree(1)))  # a new tree, new (but equal) parametrization objects
    params, state = px.split_state(_register_all(_fresh_tree(2)))
    step(px.merge_state(params, state))
    assert traces["n"] == 1
    # The test can fail: a different parametrization is a different program.
    step(_register_all(_fresh_tree(3), scale=toys.Scale(5.0)))
    assert traces["n"] == 2


def test_differentiating_an_unsplit_tree_with_state_is_refused_naming_the_path():
    # Issue 11.1: the registered tree given to an optimizer lets weight decay shrink state.
    # paramx refuses to differentiate state, and says to split it off.
    tree = px.register_parametrization(
        {"w": jnp.array([1.0, -2.0], jnp.float32)}, "w", toys.RunningMax()
    )

    def loss(t):
        return jnp.sum(px.materialize(t)["w"] ** 2)

    with pytest.raises(ValueError, match=r"state of the parametrized tensor at w.*split_state"):
        jax.grad(loss)(tree)
    with pytest.raises(ValueError, match="split_state"):
        jax.jit(jax.grad(loss))(tree)
    # The split halves differentiate as before: no gradient ever reaches state.
    params, state = px.split_state(tree)
    grads = jax.grad(lambda p: jnp.sum(px.materialize(p, state)["w"] ** 2))(params)
    assert float(jnp.sum(jnp.abs(grads["w"].original))) > 0
    # A tree without state (stateless parametrizations) differentiates unsplit, as before.
    plain = px.register_parametrization({"w": jnp.ones(2)}, "w", jnp.tanh)
    assert jax.grad(lambda t: jnp.sum(px.materialize(t)["w"]))(plain)["w"].original.shape == (2,)
