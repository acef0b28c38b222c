"""paramx.nnx: torch's parametrize API on Flax NNX modules, computed by paramx's pure core."""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import treescope
from conftest import assert_close
from flax import nnx

import paramx as px
import paramx.nnx as pnx

F32 = jnp.float32


def _x(n=6, d=3, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, d), F32)


def _sigma(k):
    """Largest singular value of a Flax kernel, as the (out, rest) matrix."""
    k = np.asarray(k, np.float64)
    return np.linalg.norm(np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1), 2)


def symmetric_fwd(x):
    return jnp.triu(x) + jnp.triu(x, 1).T


symmetric = px.Parametrization(forward=symmetric_fwd, right_inverse=jnp.triu, name="symmetric")


class Counter:
    """A tanh parametrization that counts how often its forward is executed."""

    def __init__(self):
        self.calls = 0

    def _tick(self):
        self.calls += 1

    def forward(self, x):
        jax.debug.callback(self._tick)
        return jnp.tanh(x)

    def count(self):
        jax.effects_barrier()
        return self.calls

    def right_inverse(self, y):
        return jnp.arctanh(y)


class Scaled:
    """A parametrization with a learnable array of its own: forward(x) = exp(s) * x."""

    def init(self, value, key):
        return {"s": jnp.zeros((), value.dtype)}, None

    def forward(self, x, *, params, state):
        return jnp.exp(params["s"]) * x

    def right_inverse(self, y, *, params, state):
        return jnp.exp(-params["s"]) * y, state

    def __eq__(self, other):
        return type(other) is Scaled

    def __hash__(self):
        return hash(Scaled)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 8, rngs=rngs)
        self.l3 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


@functools.lru_cache
def _built(seed):
    model = MLP(nnx.Rngs(seed))
    pnx.weight_norm(model.l1)
    pnx.orthogonal(model.l2)
    pnx.spectral_norm(model.l3)
    return model


def _constrained_mlp(seed=0):
    """A fresh copy (nnx.clone) of an MLP with weight norm, orthogonal and spectral norm."""
    return nnx.clone(_built(seed))


def _paths(state):
    return {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(state)}


# ----- reading, layout, registration semantics ----------------------------------------------------
def test_reading_gives_the_core_value_and_unmodified_layers_use_it():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    pnx.register_parametrization(layer, "kernel", symmetric)
    want = px.materialize(px.register_parametrization({"k": kernel}, "k", symmetric))["k"]
    assert type(layer).__name__ == "ParametrizedLinear"
    assert isinstance(layer, nnx.Linear)
    assert_close(layer.kernel, want)
    assert_close(layer.kernel, layer.kernel.T)
    np.testing.assert_array_equal(layer.parametrizations["kernel"].original[...], jnp.triu(kernel))
    x = _x()
    assert_close(layer(x), x @ want + layer.bias[None, :])
    assert pnx.type_before_parametrizations(layer) is nnx.Linear


def test_layout_reads_like_torch_and_state_is_its_own_variable_type(capsys):
    model = _constrained_mlp()
    params = _paths(nnx.state(model, nnx.Param))
    state = _paths(nnx.state(model, pnx.ParametrizationState))
    assert ("l1", "parametrizations", "kernel", "original0") in params
    assert ("l1", "parametrizations", "kernel", "original1") in params
    assert ("l2", "parametrizations", "kernel", "original") in params
    assert ("l3", "parametrizations", "kernel", "original") in params
    assert state == {
        ("l2", "parametrizations", "kernel", "state", "0", "base"),
        ("l3", "parametrizations", "kernel", "state", "0", "u"),
        ("l3", "parametrizations", "kernel", "state", "0", "v"),
    }
    assert not params & state
    assert not any("kernel" == p[-1] for p in params)  # the plain kernels are gone
    # both spellings reach the same ParametrizationList
    assert model.l2.parametrizations["kernel"] is model.l2.parametrizations.kernel
    assert isinstance(model.l2.parametrizations.kernel, pnx.ParametrizationList)
    assert model.l3.parametrizations.kernel[0] == px.SpectralNorm()
    text = repr(model)
    assert "ParametrizedLinear" in text and "parametrizations" in text and "original0" in text
    assert "ParametrizedLinear" in treescope.render_to_text(model)
    nnx.display(model)
    assert "ParametrizationState" in capsys.readouterr().out


def _conv():
    return nnx.Conv(3, 3, (2, 2), rngs=nnx.Rngs(0)), jax.random.normal(
        jax.random.key(1), (1, 4, 4, 3), F32
    )


def test_weight_norm_keeps_the_output_and_g_is_a_param():
    for layer, x in [(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), _x()), _conv()]:
        kernel, before = layer.kernel[...], layer(x)
        pnx.weight_norm(layer)
        plist = layer.parametrizations["kernel"]
        g, v = plist.original0, plist.original1
        assert isinstance(g, nnx.Param) and isinstance(v, nnx.Param)
        assert g.shape == (*(1,) * (kernel.ndim - 1), kernel.shape[-1])
        assert_close(layer(x), before)
        assert_close(g[...], px.WeightNorm().norm(kernel))


def test_orthogonal_registration_stores_minus_identity_and_reads_the_q_factor():
    layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    pnx.orthogonal(layer)
    want = px.materialize(px.orthogonal({"k": kernel}, "k"))["k"]
    q = layer.kernel
    assert_close(q, want)
    assert_close(q.T @ q, jnp.eye(3, dtype=F32))
    # (5, 3) tall: Q factor with a positive diagonal of R
    q_ref, r = np.linalg.qr(np.asarray(kernel, np.float64))
    assert_close(q, q_ref * np.sign(np.diag(r)), dtype=F32, scale=10)
    plist = layer.parametrizations.kernel
    assert_close(plist.original[...], -jnp.eye(5, 3, dtype=F32))
    assert isinstance(plist.state["0"]["base"], pnx.ParametrizationState)


def test_chaining_appends_and_keeps_the_originals():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    pnx.register_parametrization(layer, "kernel", symmetric)
    original = layer.parametrizations.kernel.original
    pnx.spectral_norm(layer)
    plist = layer.parametrizations.kernel
    assert len(plist) == 2 and plist[0] == symmetric and plist[1] == px.SpectralNorm()
    assert plist.original is original  # same Variable, untouched
    np.testing.assert_array_equal(original[...], jnp.triu(kernel))
    assert set(plist.state) == {"1"}
    tree = px.spectral_norm(
        px.register_parametrization({"kernel": kernel}, "kernel", symmetric), "kernel"
    )
    layer.eval()
    assert_close(layer.kernel, px.materialize(tree)["kernel"])
    assert_close(_sigma(layer.kernel), 1.0, dtype=F32, scale=10)


def test_errors_name_the_problem_and_leave_the_module_alone():
    layer = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    before = dict(vars(layer))
    with pytest.raises(ValueError, match=r"no Variable .* named 'kernal'.*Closest names: 'kernel'"):
        pnx.orthogonal(layer, "kernal")
    with pytest.raises(ValueError, match="'bias' of Linear is a NoneType, not a Variable"):
        pnx.weight_norm(layer, "bias")
    layer.count = nnx.BatchStat(3)
    with pytest.raises(ValueError, match="is a int, not a Variable holding an array"):
        pnx.weight_norm(layer, "count")
    del layer.count
    with pytest.raises(ValueError, match="may not change the shape"):
        pnx.register_parametrization(layer, "kernel", lambda x: x[:1])
    with pytest.raises(ValueError, match="may not change the dtype"):
        pnx.register_parametrization(layer, "kernel", lambda x: x.astype(jnp.float16))
    with pytest.raises(TypeError, match="Expected an nnx.Module"):
        pnx.orthogonal({"kernel": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="does not have a parametrization on 'kernel'"):
        pnx.remove_parametrizations(layer, "kernel")
    assert type(layer) is nnx.Linear and vars(layer) == before
    assert not pnx.is_parametrized(layer)
    # unsafe lets the shape change (torch's flag)
    pnx.register_parametrization(layer, "kernel", lambda x: x[:1], unsafe=True)
    assert layer.kernel.shape == (1, 2)


def test_originals_keep_the_variable_type_and_metadata():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    layer.kernel = nnx.Param(layer.kernel[...], tag="mine")
    layer.scale = nnx.BatchStat(jnp.full((3,), 2.0, F32))  # a buffer, in torch's words
    pnx.weight_norm(layer)
    pnx.register_parametrization(layer, "scale", px.Parametrization(jnp.exp, jnp.log))
    plist = layer.parametrizations
    assert plist.kernel.original1.get_metadata("tag") == "mine"
    assert plist.kernel.original0.get_metadata("tag") == "mine"  # same rank: (1, 3)
    assert type(plist.scale.original) is nnx.BatchStat
    assert ("parametrizations", "scale", "original") not in _paths(nnx.state(layer, nnx.Param))
    assert_close(layer.scale, jnp.full((3,), 2.0, F32))
    pnx.remove_parametrizations(layer, "kernel")
    assert layer.kernel.get_metadata("tag") == "mine"


def test_parametrizations_needing_concrete_values_run_eagerly():
    def np_triu(x):  # numpy: cannot be traced, so paramx.nnx does not compile this call
        return jnp.asarray(np.triu(np.asarray(x)))

    p = px.Parametrization(forward=symmetric_fwd, right_inverse=np_triu, name="np_symmetric")
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    pnx.register_parametrization(layer, "kernel", p)
    assert_close(layer.kernel, symmetric_fwd(jnp.triu(kernel)))
    layer.kernel = jnp.eye(3, dtype=F32)
    assert_close(layer.kernel, jnp.eye(3, dtype=F32))


def test_remove_parametrizations_leave_parametrized_or_original():
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    pnx.orthogonal(layer)
    pnx.register_parametrization(layer, "bias", jnp.tanh)
    q, original = layer.kernel, layer.parametrizations.kernel.original
    pnx.remove_parametrizations(layer, "kernel")
    assert type(layer).__name__ == "ParametrizedLinear"  # bias is still parametrized
    assert type(layer.kernel) is nnx.Param
    np.testing.assert_array_equal(layer.kernel[...], q)
    assert pnx.is_parametrized(layer) and not pnx.is_parametrized(layer, "kernel")
    pnx.remove_parametrizations(layer, "bias", leave_parametrized=False)
    assert type(layer) is nnx.Linear and not hasattr(layer, "parametrizations")
    assert not pnx.is_parametrized(layer)
    x = _x()
    assert_close(layer(x), x @ q + layer.bias[None, :])

    pnx.orthogonal(layer)
    original = layer.parametrizations.kernel.original
    pnx.remove_parametrizations(layer, "kernel", leave_parametrized=False)
    assert layer.kernel is original  # torch puts the original back
    assert _paths(nnx.state(layer)) == {("bias",), ("kernel",)}

    pnx.weight_norm(layer)
    with pytest.raises(ValueError, match="sequence of tensors"):
        pnx.remove_parametrizations(layer, "kernel", leave_parametrized=False)
    assert pnx.is_parametrized(layer, "kernel")


def test_assigning_runs_right_inverse():
    layer = pnx.weight_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    target = jnp.arange(6, dtype=F32).reshape(3, 2) - 2.5
    layer.kernel = target
    assert_close(layer.kernel, target)
    assert_close(layer.parametrizations.kernel.original0[...], px.WeightNorm().norm(target))
    assert "kernel" not in vars(layer)

    layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(5), (3, 3), F32))
    layer.kernel = nnx.Param(q)  # a Variable works too, as a Parameter does in torch
    assert_close(layer.kernel, q, scale=10)
    assert_close(layer.parametrizations.kernel.original[...], -jnp.eye(3, dtype=F32))


def test_conv_kernels():
    conv, x = _conv()
    pnx.orthogonal(conv)
    k = conv.kernel
    gram = jnp.einsum("hwio,hwjo->hwij", k, k)
    assert_close(gram, jnp.broadcast_to(jnp.eye(3, dtype=F32), gram.shape), scale=10)
    want = jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert_close(conv(x), want + conv.bias[None, None, None, :], scale=10)

    conv, _ = _conv()
    conv.kernel[...] = 3.0 * conv.kernel[...]
    pnx.spectral_norm(conv)
    assert_close(_sigma(conv.kernel), 1.0, dtype=F32, scale=10)


# ----- state: training mode, eval mode, views, jit ------------------------------------------------
def _unconverged(layer):
    """Puts spectral norm's u and v far from the top singular vectors."""
    s = layer.parametrizations.kernel.state["0"]
    s["u"][...] = jnp.ones(s["u"].shape, F32) / float(np.sqrt(s["u"].shape[0]))
    s["v"][...] = jnp.ones(s["v"].shape, F32) / float(np.sqrt(s["v"].shape[0]))
    return s


def test_state_changes_on_reads_in_training_mode_only():
    layer = pnx.spectral_norm(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    s = _unconverged(layer)
    assert layer.parametrizations.kernel.use_running_average is False  # torch: training
    v0 = s["v"][...]
    layer.eval()
    _ = layer.kernel
    np.testing.assert_array_equal(s["v"][...], v0)
    view = nnx.view(layer, use_running_average=False)  # a training view of an eval model
    _ = view.kernel
    v1 = s["v"][...]
    assert not np.array_equal(v1, v0)  # views share Variables, as for BatchNorm
    layer.train()
    _ = layer.kernel
    assert not np.array_equal(s["v"][...], v1)
    original = layer.parametrizations.kernel.original[...]
    for _ in range(30):
        _ = layer.kernel
    np.testing.assert_array_equal(layer.parametrizations.kernel.original[...], original)
    # converged: sigma estimate is the top singular value, the read kernel has norm 1
    assert_close(_sigma(layer.kernel), 1.0, dtype=F32, scale=10)


def test_state_updates_persist_out_of_nnx_jit_and_grad():
    layer = pnx.spectral_norm(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    s = _unconverged(layer)
    v0 = s["v"][...]
    x = _x(d=4)

    @nnx.jit
    def grads(layer):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

    g = grads(layer)
    v1 = s["v"][...]
    assert not np.array_equal(v1, v0)
    # gradients reach the original only, never the state
    assert _paths(g) == {("bias",), ("parametrizations", "kernel", "original")}
    layer.eval()
    grads(layer)
    np.testing.assert_array_equal(s["v"][...], v1)


# ----- training: nnx.Optimizer under nnx.jit ----------------------------------------------------
def _data():
    x = jax.random.uniform(jax.random.key(1), (64, 3), F32, -1.0, 1.0)
    y = jnp.concatenate([jnp.sin(3 * x[:, :1]), jnp.cos(2 * x[:, 1:2])], axis=1)
    return x, y


def test_training_under_jit_decreases_loss_and_keeps_the_constraints():
    model, (x, y) = _constrained_mlp(), _data()
    optimizer = nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer):
        traces.append(1)

        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's adam, not paramx
            optimizer.update(model, grads)
        return loss

    g_before = model.l1.parametrizations.kernel.original0[...]
    state_before = nnx.state(model, pnx.ParametrizationState)
    losses = [float(step(model, optimizer)) for _ in range(60)]
    assert len(traces) == 1  # the graphdef is cached: no retrace per step
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(model.l1.parametrizations.kernel.original0[...], g_before)
    # the optimizer never saw the state: the orthogonal base is exactly as registered
    np.testing.assert_array_equal(
        model.l2.parametrizations.kernel.state["0"]["base"][...],
        state_before["l2"]["parametrizations"]["kernel"]["state"]["0"]["base"][...],
    )
    opt_paths = {p[-1] for p in _paths(nnx.state(optimizer.opt_state))}
    assert "base" not in opt_paths and "u" not in opt_paths
    model.eval()
    q = model.l2.kernel
    assert_close(jnp.matmul(q.T, q, precision="highest"), jnp.eye(8, dtype=F32), scale=10)
    assert_close(_sigma(model.l3.kernel), 1.0, dtype=F32, scale=100)  # u, v tracked W


def test_split_merge_clone_pickle_keep_class_values_and_graphdef():
    model, x = _constrained_mlp(), _x()
    assert nnx.split(_constrained_mlp(seed=1))[0] == nnx.split(model)[0]  # one compile for all
    model.eval()
    y = model(x)
    graphdef, state = nnx.split(model)
    for other in [
        nnx.merge(graphdef, state),
        nnx.clone(model),
        pickle.loads(pickle.dumps(model)),
    ]:
        assert type(other.l2) is type(model.l2)
        assert_close(other(x), y)
        assert other.l3.parametrizations.kernel.use_running_average is True

    @jax.jit
    def pure(state, x):  # the functional pattern: merge inside, state out
        m = nnx.merge(graphdef, state)
        m.train()
        return m(x), nnx.state(m)

    _, new_state = pure(state, x)
    u = new_state["l3"]["parametrizations"]["kernel"]["state"]["0"]["v"][...]
    assert not np.array_equal(u, model.l3.parametrizations.kernel.state["0"]["v"][...])


def test_instances_share_one_generated_class_with_different_names():
    a, b = nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(1))
    pnx.orthogonal(a)
    pnx.register_parametrization(b, "bias", jnp.tanh)
    assert type(a) is type(b)
    assert isinstance(b.kernel, nnx.Param)  # not parametrized on b
    x = _x(d=2)
    assert_close(b(x), x @ b.kernel[...] + jnp.tanh(b.parametrizations.bias.original[None, :]))
    b2 = nnx.merge(*nnx.split(b))
    assert isinstance(b2.kernel, nnx.Param)
    assert_close(b2(x), b(x))
    del b2  # it shares b's Variables: registering orthogonal on a shared kernel is refused
    pnx.orthogonal(b)  # now the class already has the property
    assert_close(b.kernel.T @ b.kernel, jnp.eye(2, dtype=F32))


# ----- flax#5576 and flax#5577, side by side ------------------------------------------------------
def test_raw_weight_is_never_overwritten_unlike_flax_spectral_norm():
    x, y = _data()

    def make_step(raw_kernel):
        @nnx.jit
        def step(model, optimizer):
            grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            optimizer.update(model, grads)
            produced = raw_kernel(model)  # what the optimizer wrote (an immutable array)
            model(x)  # e.g. a metric computed after the update
            return produced

        return step

    # Flax: every forward writes W / sigma into the Param (flax#5576)
    flax_sn = nnx.SpectralNorm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    flax_sn.layer_instance.kernel[...] = 3.0 * flax_sn.layer_instance.kernel[...]
    raw = flax_sn.layer_instance.kernel[...]
    flax_sn(x)
    assert np.abs(flax_sn.layer_instance.kernel[...] - raw).max() > 0.1
    step = make_step(lambda m: m.layer_instance.kernel[...])
    produced = step(flax_sn, nnx.Optimizer(flax_sn, optax.sgd(0.1), wrt=nnx.Param))
    assert np.abs(flax_sn.layer_instance.kernel[...] - produced).max() > 1e-3

    # paramx: the stored original is exactly the raw weight, then exactly the optimizer's
    layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    layer.kernel[...] = 3.0 * layer.kernel[...]
    raw = layer.kernel[...]
    pnx.spectral_norm(layer)
    layer(x)
    original = layer.parametrizations.kernel.original
    np.testing.assert_array_equal(original[...], raw)
    assert_close(_sigma(layer.kernel), 1.0, dtype=F32, scale=10)  # the read value is W / sigma
    step = make_step(lambda m: m.parametrizations.kernel.original[...])
    produced = step(layer, nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param))
    np.testing.assert_array_equal(original[...], produced)
    assert np.abs(produced - raw).max() > 1e-3  # it did train
    layer(x)
    np.testing.assert_array_equal(original[...], produced)


def test_weight_norm_g_trains_unlike_flax_weight_norm_scales():
    x, y = _data()

    @nnx.jit
    def step(model, optimizer):
        with jax.numpy_dtype_promotion("standard"):  # nnx.WeightNorm is not strict-clean
            grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            optimizer.update(model, grads)

    flax_wn = nnx.WeightNorm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    scales = {k: np.asarray(v) for k, v in flax_wn.scales.items()}
    assert not any("scales" in p for p in _paths(nnx.state(flax_wn, nnx.Param)))
    opt = nnx.Optimizer(flax_wn, optax.sgd(0.5), wrt=nnx.Param)
    for _ in range(3):
        step(flax_wn, opt)
    for k, v in flax_wn.scales.items():
        np.testing.assert_array_equal(v, scales[k])  # never trained (flax#5577)

    layer = pnx.weight_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    g = layer.parametrizations.kernel.original0
    g0 = g[...]
    opt = nnx.Optimizer(layer, optax.sgd(0.5), wrt=nnx.Param)
    for _ in range(3):
        step(layer, opt)
    assert np.abs(np.asarray(g[...]) - np.asarray(g0)).max() > 1e-3
    # and the read kernel's column norms are exactly g
    assert_close(jnp.linalg.norm(layer.kernel, axis=0, keepdims=True), g[...])


def test_link_params_are_trained_params():
    layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    pnx.register_parametrization(layer, "kernel", Scaled())
    s = layer.parametrizations.kernel.params["0"]["s"]
    assert isinstance(s, nnx.Param)
    x, y = _data()
    opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 3.0 * y[:, :2]) ** 2))(model)
        optimizer.update(model, grads)

    step(layer, opt)
    assert float(s[...]) != 0.0
    plist = layer.parametrizations.kernel
    assert_close(layer.kernel, jnp.exp(s[...]) * plist.original[...])


# ----- caching -----------------------------------------------------------------------------------
class Twice(nnx.Module):
    """Applies one layer twice: its kernel is read twice per call."""

    def __init__(self, rngs):
        self.layer = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return self.layer(jnp.tanh(self.layer(x)))


def test_cached_computes_each_tensor_once():
    model = Twice(nnx.Rngs(0))
    model.layer.kernel[...] = 0.5 * jnp.tanh(model.layer.kernel[...])
    counter = Counter()
    pnx.register_parametrization(model.layer, "kernel", counter)
    x = _x()
    counter.calls = 0
    y = model(x)
    assert counter.count() == 2
    with pnx.cached():
        assert_close(model(x), y)
        assert counter.count() == 3
        model(x)
        assert counter.count() == 3
        model.layer.kernel = 0.5 * model.layer.kernel  # assigning makes it stale
        model(x)
        assert counter.count() == 4
    model(x)
    assert counter.count() == 6  # the cache is gone

    @functools.partial(nnx.jit, static_argnums=2)
    def forward(model, x, use_cache):
        if use_cache:
            with pnx.cached():
                return model(x)
        return model(x)

    counter.calls = 0
    forward(model, x, False)
    assert counter.count() == 2
    forward(model, x, True)
    assert counter.count() == 3  # one evaluation for two reads in the compiled step


def test_cached_with_state_updates_power_iteration_once():
    model = Twice(nnx.Rngs(0))
    pnx.spectral_norm(model.layer)
    s = _unconverged(model.layer)
    v0 = s["v"][...]
    with pnx.cached():
        model(_x())
        once = s["v"][...]
    assert not np.array_equal(once, v0)
    model.layer.parametrizations.kernel.state["0"]["v"][...] = v0
    _ = model.layer.kernel
    np.testing.assert_array_equal(once, s["v"][...])  # exactly one update for two reads
