"""paramx.linen.Parametrize: parametrizations declared inside linen model definitions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close

import paramx as px

F32 = jnp.float32
X = jax.random.normal(jax.random.key(7), (5, 4), F32)

exp_map = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log, name="exp")
is_kernel = lambda path, leaf: px.path_keys(path)[-1] == "kernel"


def _abs_init(key, shape, dtype=F32):
    return jnp.abs(jax.random.normal(key, shape, dtype)) + 0.1


class MLP(nn.Module):
    width: int = 4

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(self.width)(x))
        x = jnp.tanh(nn.Dense(self.width)(x))
        return nn.Dense(2)(x)


def _sigma(w):
    return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


# --- layout and init ----------------------------------------------------------------------------
def test_layout_is_the_unwrapped_models_layout():
    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = px.linen.Parametrize(nn.Dense(4), {"kernel": px.Orthogonal()})(x)
            return nn.Dense(2)(x)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            return nn.Dense(2)(x)

    v = Wrapped().init(jax.random.key(0), X)
    plain = Plain().init(jax.random.key(0), X)
    assert set(v) == {"params", "paramx_state"}
    assert px.is_parametrized(v["params"], "Dense_0/kernel")
    assert not px.is_parametrized(v["params"], "Dense_1/kernel")
    materialized = px.materialize(v["params"], v["paramx_state"])
    assert jax.tree.structure(materialized) == jax.tree.structure(plain["params"])
    assert set(v["paramx_state"]["Dense_0"]["kernel"]["0"]) == {"base"}
    # The initializers draw what the unwrapped model draws, and registration inside the model
    # gives what registering on the unwrapped model's tree gives.
    for name in ("Dense_0", "Dense_1"):
        assert np.array_equal(v["params"][name]["bias"], plain["params"][name]["bias"])
    outside = px.orthogonal(plain["params"], "Dense_0/kernel")
    ours = v["params"]["Dense_0"]["kernel"]
    assert np.array_equal(ours.original, outside["Dense_0"]["kernel"].original)
    w = materialized["Dense_0"]["kernel"]
    assert_close(w.T @ w, jnp.eye(4, dtype=F32), scale=10)
    assert_close(w, px.materialize(outside)["Dense_0"]["kernel"])


def test_wrapping_a_whole_submodule_with_a_predicate_at_the_root():
    model = px.linen.Parametrize(MLP(), [(is_kernel, px.WeightNorm())])
    v = model.init(jax.random.key(1), X)
    plain = MLP().init(jax.random.key(1), X)
    assert all(px.is_parametrized(v["params"], f"Dense_{i}/kernel") for i in range(3))
    assert not px.is_parametrized(v["params"], "Dense_0/bias")
    # weight norm's right_inverse is exact: the wrapped model computes the plain model's output
    # at init (Flax's WeightNorm does not, flax#4138) and stores g = ||v|| per output column.
    assert_close(model.apply(v, X), MLP().apply(plain, X))
    assert_close(
        px.materialize(v["params"])["Dense_1"]["kernel"], plain["params"]["Dense_1"]["kernel"]
    )
    assert "paramx_state" not in v or not v["paramx_state"]


class _Block(nn.Module):
    inner: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.inner(x)


def test_submodules_built_outside_the_wrapped_module_are_refused_not_lost():
    # Built in an enclosing compact method, the layers of an nn.Sequential (or any module held
    # by the wrapped one) are Flax children of the enclosing module: the wrapper cannot map
    # their variables, and `init` used to return no 'params' at all.
    class Compact(nn.Module):
        make: object

        @nn.compact
        def __call__(self, x):
            return px.linen.Parametrize(self.make(), {"kernel": px.SpectralNorm()})(x)

    sequential = lambda: nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(5)])
    for make, held in (
        (sequential, r"Sequential\.layers\[0\]"),
        (lambda: _Block(nn.Dense(3)), "inner"),
    ):
        with pytest.raises(ValueError, match=rf"holds .*{held} \(Dense\), a child of Compact"):
            Compact(make).init(jax.random.key(0), X)

    # Built in a setup method (or outside any module), they are the wrapped module's own.
    class Setup(nn.Module):
        def setup(self):
            self.net = px.linen.Parametrize(sequential(), [(is_kernel, px.SpectralNorm())])

        def __call__(self, x):
            return self.net(x)

    v = Setup().init(jax.random.key(0), X)
    assert px.is_parametrized(v["params"], "net/layers_2/kernel")
    top = px.linen.Parametrize(_Block(nn.Dense(3)), {"inner/kernel": px.SpectralNorm()})
    assert px.is_parametrized(top.init(jax.random.key(0), X)["params"], "inner/kernel")


def test_init_output_equals_apply_output_for_a_non_idempotent_map():
    # Flax's map_variables with its default trans_out_fn stores f(init) and applies f again at
    # apply time; paramx stores right_inverse(init), so init, apply and the plain model agree.
    class FlaxWay(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.map_variables(
                nn.Dense, "params", lambda v: jax.tree.map(jnp.exp, v),
                init=self.is_initializing(),
            )(3, kernel_init=_abs_init)  # fmt: skip
            return dense(x)

    class PxWay(nn.Module):
        @nn.compact
        def __call__(self, x):
            return px.linen.Parametrize(nn.Dense(3, kernel_init=_abs_init), {"kernel": exp_map})(x)

    class PlainWay(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, kernel_init=_abs_init)(x)

    pv = PlainWay().init(jax.random.key(2), X)
    y_plain = PlainWay().apply(pv, X)

    y_init, v = PxWay().init_with_output(jax.random.key(2), X)
    assert_close(y_init, PxWay().apply(v, X))
    assert_close(y_init, y_plain)
    stored = v["params"]["Dense_0"]["kernel"].original
    assert_close(stored, jnp.log(pv["params"]["Dense_0"]["kernel"]))

    fy_init, fv = FlaxWay().init_with_output(jax.random.key(2), X)
    assert not np.allclose(fy_init, FlaxWay().apply(fv, X), rtol=1e-3)  # the flax pitfall


def test_chains_and_errors_name_the_relative_path():
    rules = {"kernel": [px.SpectralNorm(), px.Parametrization(lambda w: 2 * w, name="double")]}
    layer = px.linen.Parametrize(nn.Dense(3), rules)
    v = layer.init(jax.random.key(0), X)
    assert v["params"]["kernel"].chain_names() == ["spectral_norm", "double"]
    assert_close(_sigma(px.materialize(v["params"], v["paramx_state"])["kernel"]), 2.0, F32, 100)

    bad = px.linen.Parametrize(nn.Dense(3), {"kernal": px.Orthogonal()})
    with pytest.raises(ValueError, match=r"(?s)around Dense.*kernal.*kernel"):
        bad.init(jax.random.key(0), X)
    with pytest.raises(TypeError, match="rules"):
        px.linen.Parametrize(nn.Dense(3), 3).init(jax.random.key(0), X)


def test_registration_gets_a_fresh_key_per_layer():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = px.linen.Parametrize(nn.Dense(4), {"kernel": px.SpectralNorm()})(x)
            return x

    v = Two().init(jax.random.key(0), X)
    s = v["paramx_state"]
    assert s["Dense_0"]["kernel"]["0"]["u"].shape == (4,)
    assert s["Dense_1"]["kernel"]["0"]["u"].shape == (4,)


# --- state --------------------------------------------------------------------------------------
def _sn_layer(**kw):
    return px.linen.Parametrize(nn.Dense(4), {"kernel": px.SpectralNorm()}, **kw)


def test_state_changes_only_in_a_training_step():
    layer = _sn_layer()
    v = layer.init(jax.random.key(3), X)
    # A new kernel, so one power-iteration step moves u (after warm-up it had converged).
    new_kernel = jax.random.normal(jax.random.key(8), (4, 4), F32)
    node = v["params"]["kernel"].replace(originals=(new_kernel,))
    v = {**v, "params": {**v["params"], "kernel": node}}
    u0 = v["paramx_state"]["kernel"]["0"]["u"]
    y = jax.jit(layer.apply)(v, X)
    assert y.shape == (5, 4)
    train = lambda v, x: layer.apply(v, x, use_running_average=False, mutable=["paramx_state"])
    _, upd = jax.jit(train)(v, X)
    assert set(upd) == {"paramx_state"}
    assert not np.allclose(upd["paramx_state"]["kernel"]["0"]["u"], u0, atol=1e-3)
    assert np.array_equal(v["paramx_state"]["kernel"]["0"]["u"], u0)  # input untouched

    frozen = _sn_layer(use_running_average=True)
    _, upd = frozen.apply(v, X, mutable=["paramx_state"])
    assert np.array_equal(upd["paramx_state"]["kernel"]["0"]["u"], u0)

    with pytest.raises(ValueError, match=r"immutable.*mutable=\['paramx_state'\]"):
        _sn_layer(use_running_average=False).apply(v, X)
    # A mutable collection alone no longer means training (tests/test_linen_tools.py).
    with pytest.raises(ValueError, match="use_running_average"):
        layer.apply(v, X, mutable=["paramx_state"])


def test_custom_state_collection_and_materialize_outside():
    layer = _sn_layer(state_collection="sn")
    v = layer.init(jax.random.key(4), X)
    assert set(v) == {"params", "sn"}
    w = px.materialize(v["params"], v["sn"])["kernel"]
    assert_close(layer.apply(v, X), X @ w + v["params"]["bias"][None, :])
    with pytest.raises(ValueError, match="needs its state"):
        px.materialize(v["params"])


def test_power_iteration_converges_to_the_true_sigma_in_training():
    layer = _sn_layer()
    v = layer.init(jax.random.key(5), X)
    step = jax.jit(
        lambda v: layer.apply(v, X, use_running_average=False, mutable=["paramx_state"])[1]
    )
    for _ in range(30):
        v = {**v, **step(v)}
    w = px.materialize(v["params"], v["paramx_state"])["kernel"]
    assert abs(_sigma(w) - 1.0) < 1e-4


# --- reads computed once per apply --------------------------------------------------------------
def _counting(counts):
    def forward(w):
        counts["traces"] += 1
        jax.debug.callback(lambda: counts.__setitem__("runs", counts["runs"] + 1))
        return jnp.tanh(w)

    return px.Parametrization(forward=forward, right_inverse=jnp.arctanh, name="counting")


class _Cell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        w = self.param("recurrent", nn.initializers.orthogonal(0.5), (4, 4), F32)
        h = jnp.tanh(h @ w + nn.Dense(4, name="inp")(x))
        return h, h


def _scan_rnn(counts):
    scanned = nn.scan(
        _Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
    )()

    class RNN(nn.Module):
        @nn.compact
        def __call__(self, xs):
            carry = jnp.zeros((xs.shape[0], 4), xs.dtype)
            cell = px.linen.Parametrize(scanned, {"recurrent": _counting(counts)})
            return cell(carry, xs)[1]

    return RNN()


def _shared_thrice(counts):
    class SharedThrice(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = px.linen.Parametrize(
                nn.Dense(4, kernel_init=nn.initializers.uniform(0.5)),
                {"kernel": _counting(counts)},
            )
            for _ in range(3):
                x = layer(x)
            return x

    return SharedThrice()


@pytest.mark.parametrize("kind", ["module called 3 times", "nn.scan over 100 steps"])
def test_parametrization_is_evaluated_once_per_apply(kind):
    counts = {"traces": 0, "runs": 0}
    if kind == "nn.scan over 100 steps":
        model, x = _scan_rnn(counts), jax.random.normal(jax.random.key(0), (2, 100, 3), F32)
    else:
        model, x = _shared_thrice(counts), X
    v = model.init(jax.random.key(0), x)

    @jax.jit
    def step(v, x):
        return jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(
            v["params"]
        )

    counts.update(traces=0, runs=0)
    loss, grads = step(v, x)
    jax.effects_barrier()
    assert counts == {"traces": 1, "runs": 1}
    step(v, x)
    jax.effects_barrier()
    assert counts == {"traces": 1, "runs": 2}  # compiled once, evaluated once per step
    assert jnp.isfinite(loss)
    nodes = jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, px.Parametrized))
    nodes = [n for n in nodes if isinstance(n, px.Parametrized)]
    assert len(nodes) == 1 and float(jnp.abs(nodes[0].original).sum()) > 0


def test_a_call_after_a_jax_loop_does_not_reuse_the_loops_tracer():
    # The per-apply memo handed the value computed inside the fori_loop body (a tracer of
    # that trace) to the call after the loop: UnexpectedTracerError, where plain Flax works.
    class Loop(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = px.linen.Parametrize(nn.Dense(4), {"kernel": px.Orthogonal()})
            if self.is_initializing():
                return cell(x)
            h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(cell(h)), x)
            return cell(h)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = nn.Dense(4)
            return cell(jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(cell(h)), x))

    v = Loop().init(jax.random.key(0), X)
    want = Plain().apply({"params": px.materialize(v["params"], v["paramx_state"])}, X)
    assert_close(Loop().apply(v, X), want)
    assert_close(jax.jit(Loop().apply)(v, X), want)


def test_a_parametrize_inside_a_wrapped_module_keeps_its_state():
    # Wrapping a module that has a stateful Parametrize inside: the outer wrapper's init
    # replaced the state collection with its own (the inner spectral norm lost u and v: a
    # "needs its state" error at init), and at apply the inner wrapper met its state next to
    # the kernel the outer one had computed already.
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = px.linen.Parametrize(nn.Dense(4), {"kernel": px.SpectralNorm()})(x)
            return nn.Dense(3)(x)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            return nn.Dense(3)(x)

    model = px.linen.Parametrize(Inner(), {"Dense_1/kernel": px.Orthogonal()})
    v = model.init(jax.random.key(0), X)
    assert sorted(v["paramx_state"]) == ["Dense_0", "Dense_1"]
    plain = px.materialize(v["params"], v["paramx_state"])
    assert_close(model.apply(v, X), Plain().apply({"params": plain}, X))
    _, new = model.apply(v, X, use_running_average=False, mutable=["paramx_state"])
    _, want = px.materialize(v["params"], v["paramx_state"], update_state=True)
    for a, b in zip(jax.tree.leaves(new["paramx_state"]), jax.tree.leaves(want), strict=True):
        assert_close(a, b)  # one power-iteration step, as the core takes it


# --- training -----------------------------------------------------------------------------------
def test_training_with_optax_keeps_the_constraints():
    model = px.linen.Parametrize(
        MLP(8),
        [
            ("Dense_0/kernel", px.Orthogonal()),
            ("Dense_1/kernel", px.SpectralNorm()),
            ("Dense_2/kernel", px.WeightNorm()),
        ],
    )
    xs = jax.random.normal(jax.random.key(1), (64, 4), F32)
    ys = jnp.stack([jnp.sin(xs[:, 0]), xs[:, 1] * xs[:, 2]], axis=1)
    v = model.init(jax.random.key(0), xs)
    params, state = v["params"], v["paramx_state"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, state, opt):
        def loss(params):
            out, upd = model.apply(
                {"params": params, "paramx_state": state},
                xs,
                use_running_average=False,
                mutable=["paramx_state"],
            )
            return jnp.mean((out - ys) ** 2), upd["paramx_state"]

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), state, opt, value

    losses = []
    for _ in range(150):
        params, state, opt, value = step(params, state, opt)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
    w = px.materialize(params, state)
    q = w["Dense_0"]["kernel"]  # (4, 8): orthonormal rows
    assert_close(q @ q.T, jnp.eye(4, dtype=F32), scale=20)
    # One power iteration per step trails a kernel that keeps moving: sigma is near 1, not at 1.
    assert abs(_sigma(w["Dense_1"]["kernel"]) - 1.0) < 0.05


# --- side by side with Flax's wrappers ----------------------------------------------------------
def test_same_outputs_as_flax_spectral_norm_once_converged():
    kernel = jax.random.normal(jax.random.key(9), (4, 3), F32) * 3.0
    n_steps = 40
    fl = nn.SpectralNorm(nn.Dense(3), n_steps=n_steps)
    fv = fl.init(jax.random.key(0), X, update_stats=False)
    fv = {**fv, "params": {"layer_instance": {**fv["params"]["layer_instance"], "kernel": kernel}}}
    # Flax's init stores the normalized kernel, not the initializer's: the raw weight is lost.
    fresh = fl.init(jax.random.key(0), X, update_stats=False)["params"]["layer_instance"]["kernel"]
    assert _sigma(fresh) < 1.5
    y_flax, _ = fl.apply(fv, X, update_stats=True, mutable=["batch_stats"])

    ours = px.linen.Parametrize(
        nn.Dense(3), {"kernel": px.SpectralNorm(n_power_iterations=n_steps)}
    )
    v = ours.init(jax.random.key(0), X)
    v = {**v, "params": px.assign(v["params"], "kernel", kernel)}
    y_ours, _ = ours.apply(v, X, use_running_average=False, mutable=["paramx_state"])
    assert_close(y_ours, y_flax, scale=10)
    assert_close(y_ours, X @ (kernel / _sigma(kernel)) + v["params"]["bias"][None, :], scale=10)
    # paramx keeps the raw kernel: the stored original is what the caller gave.
    assert np.array_equal(v["params"]["kernel"].original, kernel)


def test_same_outputs_as_flax_weight_norm_for_the_same_scale_and_direction():
    fl = nn.WeightNorm(nn.Dense(3))
    fv = fl.init(jax.random.key(0), X)
    direction = fv["params"]["layer_instance"]["kernel"]
    scale = jnp.array([0.5, 2.0, 3.0], F32)
    # Flax stores the scale under a '/'-joined key (which breaks flatten/unflatten round trips).
    fv = {"params": {**fv["params"], "layer_instance/kernel/scale": scale}}
    y_flax = fl.apply(fv, X)

    ours = px.linen.Parametrize(nn.Dense(3), {"kernel": px.WeightNorm()})
    v = ours.init(jax.random.key(0), X)
    node = v["params"]["kernel"].replace(originals=(scale[None, :], direction))
    y_ours = ours.apply({"params": {**v["params"], "kernel": node}}, X)
    assert_close(y_ours, y_flax)
    # At init Flax's effective kernel has unit columns, whatever kernel_init was (flax#4138);
    # paramx's effective kernel is the initializer's output.
    plain = nn.Dense(3).init(jax.random.key(0), X)["params"]["kernel"]
    assert_close(px.materialize(v["params"])["kernel"], plain)


# --- checkpoints and export ---------------------------------------------------------------------
def test_orbax_round_trip_into_a_freshly_built_model(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")

    def build():
        return px.linen.Parametrize(
            MLP(), [("Dense_0/kernel", px.Orthogonal()), ("Dense_1/kernel", px.SpectralNorm())]
        )

    model = build()
    v = model.init(jax.random.key(3), X)
    _, upd = model.apply(v, X, use_running_average=False, mutable=["paramx_state"])
    v = {**v, **upd}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", v)
    fresh = build()
    target = jax.eval_shape(lambda: fresh.init(jax.random.key(0), X))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(v)):
        assert np.array_equal(a, b)
    assert np.array_equal(fresh.apply(restored, X), model.apply(v, X))


def test_export_for_serving_is_the_plain_models_tree():
    model = px.linen.Parametrize(MLP(), {is_kernel: px.SpectralNorm()})
    v = model.init(jax.random.key(3), X)
    tree = px.merge_state(v["params"], v["paramx_state"])
    served = px.remove_parametrizations(tree, is_kernel, leave_parametrized=True)
    assert not px.is_parametrized(served)
    assert_close(MLP().apply({"params": served}, X), model.apply(v, X))
    exported = px.materialize(v["params"], v["paramx_state"])  # the same, in one call
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(served)):
        assert np.array_equal(a, b)


def test_a_link_without_state_needs_no_mutable_state_collection():
    # ConvSpectralNorm's gram method has an update_state method but no state: a training
    # call used to demand a mutable 'paramx_state' collection that does not exist.
    from paramx import lipschitz as L

    rule = L.ConvSpectralNorm(L.ConvGeometry(input_size=(8, 8)), method="gram")
    model = px.linen.Parametrize(nn.Conv(4, (3, 3)), {"kernel": rule}, use_running_average=False)
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert list(variables) == ["params"]
    assert model.apply(variables, x).shape == x.shape
    stateful = px.linen.Parametrize(
        nn.Dense(3), {"kernel": px.SpectralNorm()}, use_running_average=False
    )
    v = stateful.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="immutable"):
        stateful.apply(v, X)
