"""End to end: a Flax model with parametrizations trained by optax inside one jitted step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import toys

import paramx as px


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8)(x))
        x = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(1)(x)


def _data():
    x = jax.random.uniform(jax.random.key(1), (128, 8), jnp.float32, -1.0, 1.0)
    y = jnp.sin(3.0 * x[:, :1]) * jnp.cos(2.0 * x[:, 1:2])
    return x, y


def test_adam_trains_the_originals_and_never_touches_state():
    model, (x, y) = MLP(), _data()
    variables = model.init(jax.random.key(0), x)
    # right_inverse is exact on the image of forward: start from a symmetric kernel and a
    # positive bias, so registration leaves the model's outputs unchanged.
    k = variables["params"]["Dense_1"]["kernel"]
    dense_1 = {"kernel": (k + k.T) / 2, "bias": jnp.full((8,), 0.1, jnp.float32)}
    variables = {"params": variables["params"] | {"Dense_1": dense_1}}
    tree = px.register_parametrization(variables, "params/Dense_1/kernel", toys.symmetric)
    tree = px.register_parametrization(tree, "params/Dense_1/bias", toys.positive)
    tree = px.register_parametrization(tree, "params/Dense_2/kernel", toys.RunningMax())
    before = model.apply(variables, x)
    np.testing.assert_allclose(model.apply(px.materialize(tree), x), before, atol=1e-6)

    params, state = px.split_state(tree)
    tx = optax.adamw(1e-2, weight_decay=0.5)
    opt_state = tx.init(params)
    # the optimizer sees no state: its moments mirror the trainable half only
    state_leaves = jax.tree_util.tree_leaves(state)
    assert state_leaves and len(jax.tree_util.tree_leaves(opt_state)) == 1 + 2 * len(
        jax.tree_util.tree_leaves(params)
    )

    @jax.jit
    def step(params, state, opt_state):
        def loss_fn(params):
            variables, new_state = px.materialize(params, state, update_state=True)
            return jnp.mean((model.apply(variables, x) - y) ** 2), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # optax's bias correction (`decay ** count`, int32 count) is not strict-promotion clean;
        # relax promotion for the optimizer only, paramx stays under strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    losses, maxima = [], []
    for _ in range(300):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
        original = params["params"]["Dense_2"]["kernel"].original
        maxima.append(float(jnp.max(jnp.abs(original))))
    assert losses[-1] < 0.3 * losses[0]

    # state moved only through update_state: the running max of |original| seen in steps
    running = float(state["params"]["Dense_2"]["kernel"]["0"])
    assert running >= max(maxima[:-1]) - 1e-6 and running > float(
        jnp.max(jnp.abs(variables["params"]["Dense_2"]["kernel"]))
    )

    plain, _ = px.materialize(params, state, update_state=True)  # the next step's view
    k1 = plain["params"]["Dense_1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(k1.T))
    assert float(jnp.min(plain["params"]["Dense_1"]["bias"])) > 0
    assert float(jnp.max(jnp.abs(plain["params"]["Dense_2"]["kernel"]))) <= 1.0 + 1e-6
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(variables)
