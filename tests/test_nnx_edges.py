"""paramx.nnx corners: assigning wrong shapes, tied weights, stacks, nesting, eager fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx._src.integrations.nnx import shared as pnx_shared

F32 = jnp.float32


def _sigmas(k):
    """Largest singular value of each (in, out) matrix of a stack."""
    return np.linalg.norm(np.asarray(k, np.float64), 2, axis=(-2, -1))


def _snapshot(module):
    """Every array of the module, by path, and its class: what must not change on an error."""
    flat = nnx.to_flat_state(nnx.state(module))
    return type(module), {path: np.asarray(v.get_value()) for path, v in flat}


def _assert_unchanged(module, before):
    cls, arrays = before
    assert type(module) is cls
    now = _snapshot(module)[1]
    assert now.keys() == arrays.keys()
    for path, value in arrays.items():
        np.testing.assert_array_equal(now[path], value)


symmetric = px.Parametrization(
    forward=lambda x: jnp.triu(x) + jnp.triu(x, 1).T, right_inverse=jnp.triu, name="symmetric"
)
tanh = px.Parametrization(forward=jnp.tanh, right_inverse=jnp.arctanh, name="tanh")


# ----- item 2: assigning a value of another shape or dtype -----------------------------------
REGISTER = {
    "orthogonal": pnx.orthogonal,
    "orthogonal-matrix_exp": lambda m: pnx.orthogonal(m, orthogonal_map="matrix_exp"),
    "orthogonal-cayley": lambda m: pnx.orthogonal(m, orthogonal_map="cayley"),
    "orthogonal-householder": lambda m: pnx.orthogonal(m, orthogonal_map="householder"),
    "spectral_norm": pnx.spectral_norm,
    "weight_norm": pnx.weight_norm,
    "custom": lambda m: pnx.register_parametrization(m, "kernel", symmetric),
}


@pytest.mark.parametrize("name", list(REGISTER))
def test_assigning_another_shape_or_dtype_raises_naming_the_tensor(name):
    n_out = 3 if name == "custom" else 2
    layer = REGISTER[name](nnx.Linear(3, n_out, rngs=nnx.Rngs(0)))
    layer.eval()
    before = _snapshot(layer)
    for bad in [jnp.ones((5, 5), F32), jnp.ones((3, n_out), jnp.float64)]:
        with pytest.raises(
            ValueError, match=r"Linear\.kernel.*(shape|dtype)|(shape|dtype).*Linear\.kernel"
        ):
            layer.kernel = bad
        _assert_unchanged(layer, before)
    assert layer.kernel.shape == (3, n_out)
    good = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (3, n_out), F32))[0]
    layer.kernel = 0.5 * good if name == "spectral_norm" else good  # the right shape works


def test_unsafe_registration_still_lets_the_shape_change():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    grow = px.Parametrization(forward=lambda x: x[:2], right_inverse=lambda y: y, name="grow")
    pnx.register_parametrization(layer, "kernel", grow, unsafe=True)
    layer.kernel = jnp.ones((4, 3), F32)  # torch's unsafe flag: no shape check
    assert layer.parametrizations.kernel.original.shape == (4, 3)


# ----- item 4: tied weights ------------------------------------------------------------------
class Tied(nnx.Module):
    """An encoder and a decoder sharing one kernel Param (``dec.kernel = enc.kernel``)."""

    def __init__(self, rngs):
        self.enc = nnx.Linear(4, 4, rngs=rngs)
        self.dec = nnx.Linear(4, 4, rngs=rngs)
        self.dec.kernel = self.enc.kernel

    def __call__(self, x):
        return self.dec(jnp.tanh(self.enc(x)))


def _x():
    return jax.random.normal(jax.random.key(1), (5, 4), F32)


def test_spectral_norm_on_a_tied_kernel_keeps_one_shared_param():
    model = Tied(nnx.Rngs(0))
    shared = model.enc.kernel
    raw = shared[...]
    pnx.spectral_norm(model.enc)
    model.eval()  # no power iteration between the gradients compared below
    assert model.enc.parametrizations.kernel.original is shared
    assert model.dec.kernel is shared  # the decoder reads the raw weight, as in torch
    np.testing.assert_array_equal(shared[...], raw)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert sum(v is shared for _, v in params) == 1  # one array to train

    x = _x()

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss)(model)
    kernels = [v for path, v in nnx.to_flat_state(grads) if path[-1] in ("kernel", "original")]
    assert len(kernels) == 1  # one gradient for the one shared Param (NNX dedups it)
    g = kernels[0][...]
    # the gradient is the sum over both uses: W / sigma(W) in enc, W in dec
    sn = model.enc.parametrizations.kernel.node()

    def functional(w):
        k = px.materialize({"k": sn.replace(originals=(w,))})["k"]
        h = jnp.tanh(x @ k + model.enc.bias[None, :])
        return jnp.sum((h @ w + model.dec.bias[None, :]) ** 2)

    assert_close(g, jax.grad(functional)(raw), scale=10)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)
    assert model.dec.kernel is model.enc.parametrizations.kernel.original
    assert np.abs(np.asarray(shared[...]) - np.asarray(raw)).max() > 1e-3  # it trained, once

    pnx.remove_parametrizations(model.enc, "kernel")  # torch: the Parameter keeps its identity
    assert model.enc.kernel is model.dec.kernel is shared


@pytest.mark.parametrize(
    "register",
    [pnx.orthogonal, pnx.weight_norm, lambda m: pnx.register_parametrization(m, "kernel", tanh)],
    ids=["orthogonal", "weight_norm", "custom"],
)
def test_a_tied_kernel_that_cannot_stay_shared_is_refused(register):
    model = Tied(nnx.Rngs(0))
    model.enc.kernel[...] = 0.5 * jnp.tanh(model.enc.kernel[...])  # in arctanh's domain
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Linear\.kernel is shared.*Linear\.kernel.*untie"):
        register(model.enc)
    _assert_unchanged(model, before)
    assert model.dec.kernel is model.enc.kernel
    # untied explicitly, it registers
    model.enc.kernel = nnx.Param(model.enc.kernel[...])
    register(model.enc)


def test_identity_right_inverse_on_a_tied_kernel_is_shared():
    model = Tied(nnx.Rngs(0))
    shared = model.enc.kernel
    pnx.register_parametrization(model.enc, "kernel", jnp.tanh)  # no right_inverse
    assert model.enc.parametrizations.kernel.original is shared is model.dec.kernel
    assert_close(model.enc.kernel, jnp.tanh(shared[...]))


def test_an_unshared_kernel_skips_the_sharing_search(monkeypatch):
    def fail(*args):
        raise AssertionError("searched for holders of an unshared Variable")

    monkeypatch.setattr(pnx_shared, "other_holders", fail)
    layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    assert pnx.is_parametrized(layer, "kernel")


# ----- item 5: stacks (nnx.vmap, nnx.scan) ---------------------------------------------------
def _stack(n=3, register=pnx.spectral_norm):
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        layer = nnx.Linear(4, 4, rngs=nnx.Rngs(key))
        layer.kernel[...] = 3.0 * layer.kernel[...]
        return register(layer) if register else layer

    return create(jax.random.split(jax.random.key(0), n))


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _through_layers(x, layer):
    return jnp.tanh(layer(x))


def test_a_stack_built_by_nnx_vmap_is_normalized_per_layer_and_scans():
    stack = _stack()
    plist = stack.parametrizations.kernel
    assert plist.event_ndims == (2,) and plist.original.shape == (3, 4, 4)
    assert plist.state["0"]["u"].shape == (3, 4)
    for _ in range(20):  # training-mode reads: one power iteration per layer each
        k = stack.kernel
    assert k.shape == (3, 4, 4)
    assert_close(_sigmas(k), np.ones(3), dtype=F32, scale=10)
    stack.eval()
    x = _x()
    want = x
    for i in range(3):
        want = jnp.tanh(want @ k[i] + stack.bias[i][None, :])
    assert_close(_through_layers(x, stack), want, scale=10)


def test_a_scanned_stack_trains():
    stack = _stack()
    optimizer = nnx.Optimizer(stack, optax.adam(1e-2), wrt=nnx.Param)
    x = _x()
    y = jnp.flip(x, axis=1)

    @nnx.jit
    def step(stack, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((_through_layers(x, m) - y) ** 2))(
            stack
        )
        with jax.numpy_dtype_promotion("standard"):  # optax's adam
            optimizer.update(stack, grads)
        return loss

    losses = [float(step(stack, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    stack.eval()
    assert_close(_sigmas(stack.kernel), np.ones(3), dtype=F32, scale=100)


@pytest.mark.parametrize("name", ["spectral_norm", "orthogonal", "weight_norm"])
def test_batch_axes_registers_on_an_already_stacked_module(name):
    stack = _stack(register=None)
    kernel = stack.kernel[...]
    getattr(pnx, name)(stack, batch_axes=1)
    stack.eval()
    k = stack.kernel
    assert k.shape == (3, 4, 4)
    if name == "spectral_norm":
        assert_close(_sigmas(k), np.ones(3), dtype=F32, scale=100)
    elif name == "orthogonal":
        gram = jnp.einsum("lij,lik->ljk", k, k, precision="highest")
        assert_close(gram, jnp.broadcast_to(jnp.eye(4, dtype=F32), gram.shape), scale=10)
    else:
        assert stack.parametrizations.kernel.original0.shape == (3, 1, 4)  # g per layer
        assert_close(k, kernel, scale=10)


# ----- item 12: nested registration ----------------------------------------------------------
def test_nested_registration_on_an_original_reads_assigns_trains_and_removes():
    layer = pnx.spectral_norm(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    layer.eval()
    plist = layer.parametrizations["kernel"]
    w = layer.kernel
    pnx.register_parametrization(plist, "original", tanh)  # torch's nesting
    inner = plist.parametrizations["original"]
    assert pnx.is_parametrized(plist, "original")
    assert_close(layer.kernel, w, scale=10)  # tanh(arctanh(W)) = W
    raw = inner.original[...]
    assert_close(plist.original, jnp.tanh(raw))

    x = _x()[:, :3]
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    g = grads["parametrizations"]["kernel"]["parametrizations"]["original"]["original"][...]
    assert np.abs(np.asarray(g)).max() > 0

    target = 0.3 * jnp.eye(3, dtype=F32)
    layer.kernel = target  # outer right_inverse (identity), then the inner one (arctanh)
    assert_close(inner.original[...], jnp.arctanh(target))
    clone = nnx.clone(layer)
    assert_close(clone.kernel, layer.kernel)

    with pytest.raises(ValueError, match="nested registration.*Remove those first"):
        pnx.remove_parametrizations(layer, "kernel")
    pnx.remove_parametrizations(plist, "original")
    assert type(plist) is pnx.ParametrizationList
    pnx.remove_parametrizations(layer, "kernel")
    assert type(layer) is nnx.Linear


def test_nested_assignment_of_a_bad_value_modifies_nothing():
    layer = pnx.register_parametrization(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", symmetric)
    plist = layer.parametrizations["kernel"]
    plist.original[...] = 0.5 * jnp.tanh(plist.original[...])
    pnx.register_parametrization(plist, "original", tanh)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="shape"):
        layer.kernel = jnp.ones((2, 2), F32)
    _assert_unchanged(layer, before)


# ----- item 13: optimizer built before registering -------------------------------------------
def test_an_optimizer_built_before_registering_raises_instead_of_training_wrong():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    pnx.spectral_norm(layer)
    grads = nnx.grad(lambda m: jnp.sum(m(_x()[:, :3]) ** 2))(layer)
    with pytest.raises(ValueError), jax.numpy_dtype_promotion("standard"):
        optimizer.update(layer, grads)  # documented fix: build nnx.Optimizer after registering
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(layer, grads)


# ----- a right_inverse needing concrete values runs once per assignment ----------------------
def test_a_right_inverse_needing_concrete_values_runs_once_per_assign():
    calls = []

    def np_triu(x):
        calls.append(1)
        return jnp.asarray(np.triu(np.asarray(x)))  # numpy: cannot be traced

    p = px.Parametrization(forward=symmetric.forward, right_inverse=np_triu, name="np_sym")
    layer = pnx.register_parametrization(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", p)
    for i in range(3):
        calls.clear()
        layer.kernel = (i + 1.0) * jnp.eye(3, dtype=F32)
        assert len(calls) == 1
        assert_close(layer.kernel, (i + 1.0) * jnp.eye(3, dtype=F32))
