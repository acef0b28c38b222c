"""paramx.linen.Parametrize with the tools Flax users reach for: train/eval flags, lifted
transforms (nn.scan, nn.vmap, nn.remat, nn.jit), stacked layers, model.tabulate, the NNX
bridge and partitioning annotations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close

import paramx as px

F32 = jnp.float32
X = jax.random.normal(jax.random.key(7), (3, 4), F32)
N_LAYERS = 3


def _sigmas(w):
    """The largest singular value of each matrix of a (..., m, n) stack."""
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[..., 0]


def _sn_layer(**kw):
    return px.linen.Parametrize(nn.Dense(4), {"kernel": px.SpectralNorm()}, **kw)


def _moved(v):
    """Variables whose kernel is new, so one power-iteration step visibly moves u."""
    node = v["params"]["kernel"]
    new = node.replace(originals=(jax.random.normal(jax.random.key(8), (4, 4), F32),))
    return {**v, "params": {**v["params"], "kernel": node.replace(originals=new.originals)}}


def _u(v):
    return v["paramx_state"]["kernel"]["0"]["u"]


# --- item 6: the state follows an explicit train/eval flag ----------------------------------------
def test_eval_that_reuses_the_training_mutable_list_raises_instead_of_updating():
    layer = _sn_layer()
    v = _moved(layer.init(jax.random.key(0), X))
    with pytest.raises(ValueError, match=r"(?s)'paramx_state' is mutable.*use_running_average"):
        layer.apply(v, X, mutable=["paramx_state"])
    with pytest.raises(ValueError, match="use_running_average"):
        layer.apply(v, X, mutable=True)
    # Immutable and no flag: evaluation, as before.
    assert layer.apply(v, X).shape == (3, 4)


def test_use_running_average_at_call_time_and_as_attribute():
    layer = _sn_layer()
    v = _moved(layer.init(jax.random.key(0), X))
    u0 = _u(v)
    _, upd = layer.apply(v, X, use_running_average=True, mutable=["paramx_state"])
    assert np.array_equal(_u(upd), u0)  # evaluation: read, never changed
    step = jax.jit(
        lambda v: layer.apply(v, X, use_running_average=False, mutable=["paramx_state"])[1]
    )
    assert not np.allclose(_u(step(v)), u0, atol=1e-3)  # training: one power step
    assert np.array_equal(_u(v), u0)  # the input is untouched

    trained = _sn_layer(use_running_average=False)
    _, upd = trained.apply(v, X, mutable=["paramx_state"])
    assert_close(_u(upd), _u(step(v)))
    with pytest.raises(ValueError, match=r"immutable.*mutable=\['paramx_state'\]"):
        trained.apply(v, X)
    with pytest.raises(ValueError, match="use_running_average"):  # nn.merge_param's rule
        trained.apply(v, X, use_running_average=True, mutable=["paramx_state"])


def test_update_state_is_the_older_spelling_of_the_same_flag():
    v = _moved(_sn_layer().init(jax.random.key(0), X))
    u0 = _u(v)
    _, upd = _sn_layer(update_state=False).apply(v, X, mutable=["paramx_state"])
    assert np.array_equal(_u(upd), u0)
    _, upd = _sn_layer(update_state=True).apply(v, X, mutable=["paramx_state"])
    assert not np.allclose(_u(upd), u0, atol=1e-3)
    with pytest.raises(ValueError, match="immutable"):
        _sn_layer(update_state=True).apply(v, X)
    with pytest.raises(ValueError, match="not both"):
        _sn_layer(update_state=True, use_running_average=True).apply(v, X)


def test_no_flag_is_needed_when_nothing_has_state_to_update():
    # Orthogonal keeps a base but never updates it; weight norm has no state.
    rules = {"kernel": px.Orthogonal(), "bias": px.Parametrization(jnp.tanh, jnp.arctanh)}
    layer = px.linen.Parametrize(nn.Dense(4, bias_init=nn.initializers.constant(0.1)), rules)
    v = jax.jit(layer.init)(jax.random.key(0), X)
    y, upd = jax.jit(lambda v: layer.apply(v, X, mutable=["paramx_state"]))(v)
    assert_close(y, jax.jit(layer.apply)(v, X))
    assert np.array_equal(
        upd["paramx_state"]["kernel"]["0"]["base"], v["paramx_state"]["kernel"]["0"]["base"]
    )


def test_the_call_flag_reaches_a_wrapped_batchnorm_too():
    layer = px.linen.Parametrize(nn.BatchNorm(), {"scale": px.Parametrization(jnp.exp, jnp.log)})
    v = layer.init(jax.random.key(0), X, use_running_average=False)
    assert px.is_parametrized(v["params"], "scale")
    _, upd = layer.apply(v, X, use_running_average=False, mutable=["batch_stats"])
    assert not np.allclose(upd["batch_stats"]["mean"], v["batch_stats"]["mean"])
    y = layer.apply(v, X, use_running_average=True)
    assert_close(
        y, X / jnp.sqrt(jnp.asarray(1 + 1e-5, F32)), scale=10
    )  # mean 0, var 1: the running averages


def test_a_model_with_a_train_argument_like_batchnorm():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = _sn_layer(use_running_average=not train)(x)
            return nn.BatchNorm(use_running_average=not train)(x)

    v = Net().init(jax.random.key(0), X, train=False)
    _, upd = Net().apply(v, X, train=True, mutable=["paramx_state", "batch_stats"])
    assert set(upd) == {"paramx_state", "batch_stats"}
    _, same = Net().apply(v, X, train=False, mutable=["paramx_state", "batch_stats"])
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves({k: v[k] for k in same})):
        assert np.array_equal(a, b)


# --- item 8: inside lifted transforms -------------------------------------------------------------
class Cell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        h = jnp.tanh(px.linen.Parametrize(nn.Dense(4), {"kernel": px.Orthogonal("cayley")})(h) + x)
        return h, h


class _RNN(nn.Module):
    @nn.compact
    def __call__(self, xs):
        cell = nn.scan(
            Cell,
            variable_broadcast=["params", "paramx_state"],
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )()
        return cell(jnp.zeros((xs.shape[0], 4), xs.dtype), xs)[1]


def test_parametrize_inside_an_nn_scan_cell_inits_applies_and_trains():
    xs = jax.random.normal(jax.random.key(1), (2, 5, 4), F32)
    model = _RNN()
    y0, v = jax.jit(model.init_with_output)(jax.random.key(0), xs)
    assert px.is_parametrized(v["params"], "ScanCell_0/Dense_0/kernel")
    assert_close(jax.jit(model.apply)(v, xs), y0)
    params, state = v["params"], v["paramx_state"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            return jnp.mean((model.apply({"params": p, "paramx_state": state}, xs) - 0.5) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for _ in range(3):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    w = px.materialize(params, state)["ScanCell_0"]["Dense_0"]["kernel"]
    assert_close(w.T @ w, jnp.eye(4, dtype=F32), scale=10)


def test_a_missing_state_collection_in_a_lifted_transform_says_what_to_list():
    class BadRNN(nn.Module):
        @nn.compact
        def __call__(self, xs):
            cell = nn.scan(
                Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1
            )()
            return cell(jnp.zeros((xs.shape[0], 4), xs.dtype), xs)[1]

    xs = jnp.ones((2, 3, 4), F32)
    with pytest.raises(ValueError, match=r"variable_broadcast=\['params', 'paramx_state'\]"):
        BadRNN().init(jax.random.key(0), xs)


def test_parametrize_inside_nn_vmap_is_an_ensemble_of_independent_members():
    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            members = nn.vmap(
                lambda mdl, x: _sn_layer(use_running_average=True)(x),
                variable_axes={"params": 0, "paramx_state": 0},
                split_rngs={"params": True},
                in_axes=None,
                axis_size=N_LAYERS,
            )
            return members(self, x)

    v = Ensemble().init(jax.random.key(0), X)
    node = v["params"]["Dense_0"]["kernel"]
    assert node.original.shape == (N_LAYERS, 4, 4) and node.event_ndims == (2,)
    w = px.materialize(v["params"], v["paramx_state"])["Dense_0"]["kernel"]
    # Each member is normalized (15 warm-up power steps: close to 1; normalizing the stack as
    # one matrix would leave each member's sigma well below 1).
    np.testing.assert_allclose(_sigmas(w), 1.0, atol=5e-3)
    y = Ensemble().apply(v, X)
    bias = v["params"]["Dense_0"]["bias"]
    assert_close(y, jnp.einsum("bi,eio->ebo", X, w) + bias[:, None, :], scale=10)


def test_remat_and_jit_around_the_wrapper_and_around_the_wrapped_module():
    for lift in (nn.remat, nn.jit):
        outer = lift(px.linen.Parametrize)(
            nn.Dense(4), {"kernel": px.SpectralNorm()}, use_running_average=False
        )
        v = outer.init(jax.random.key(0), X)
        _, upd = outer.apply(v, X, mutable=["paramx_state"])
        assert set(upd) == {"paramx_state"}
        inner = px.linen.Parametrize(lift(nn.Dense)(4), {"kernel": px.SpectralNorm()})
        v = inner.init(jax.random.key(0), X)
        w = px.materialize(v["params"], v["paramx_state"])["kernel"]
        assert_close(inner.apply(v, X), X @ w + v["params"]["bias"][None, :], scale=10)


# --- item 5: stacks of layers ---------------------------------------------------------------------
class Block(nn.Module):
    rules: dict

    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(px.linen.Parametrize(nn.Dense(4), self.rules)(h)), None


def _layers(rules):
    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(
                Block,
                variable_axes={"params": 0, "paramx_state": 0},
                split_rngs={"params": True},
                length=N_LAYERS,
            )(rules)
            return stack(x, None)[0]

    return Deep()


def _per_layer(params, state, i):
    """Layer ``i`` of a stacked registered tree, as a tree of its own."""
    return jax.tree.map(lambda x: x[i], params), jax.tree.map(lambda x: x[i], state)


@pytest.mark.parametrize("kind", ["spectral_norm", "orthogonal", "weight_norm"])
def test_nn_scan_over_layers_registers_and_exports_per_layer(kind):
    p = {"spectral_norm": px.SpectralNorm(), "orthogonal": px.Orthogonal()}.get(
        kind, px.WeightNorm()
    )
    model = _layers({"kernel": p})
    v = jax.jit(model.init)(jax.random.key(0), X)
    params, state = v["params"], v.get("paramx_state", {})
    export = jax.jit(px.materialize)
    node = params["ScanBlock_0"]["Dense_0"]["kernel"]
    assert node.event_ndims[0] == 2 and node.batch_shape == (N_LAYERS,)
    w = export(params, state)["ScanBlock_0"]["Dense_0"]["kernel"]
    assert w.shape == (N_LAYERS, 4, 4)
    if kind == "spectral_norm":  # per layer (normalizing the stack leaves each below 0.95)
        np.testing.assert_allclose(_sigmas(w), 1.0, atol=5e-3)
    if kind == "orthogonal":
        for q in w:
            assert_close(q.T @ q, jnp.eye(4, dtype=F32), scale=10)
    # The stacked tree's export is the export of each layer on its own.
    for i in range(N_LAYERS):
        pi, si = _per_layer(params, state, i)
        assert_close(export(pi, si)["ScanBlock_0"]["Dense_0"]["kernel"], w[i])
    # And it is what the model computes inside.
    h = X
    for i in range(N_LAYERS):
        h = jnp.tanh(h @ w[i] + params["ScanBlock_0"]["Dense_0"]["bias"][i][None, :])
    assert_close(jax.jit(model.apply)(v, X), h, scale=10)


class PlainBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(4)(h)), None


def test_wrapping_a_scan_over_layers_with_batch_axes_parametrizes_each_layer():
    stack = nn.scan(
        PlainBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=N_LAYERS,
    )

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            rules = {"Dense_0/kernel": px.SpectralNorm()}
            layers = px.linen.Parametrize(stack(), rules, batch_axes=1)
            return layers(x, None)[0]

    model = Deep()
    v = model.init(jax.random.key(0), X)
    params = v["params"]["ScanPlainBlock_0"]["Dense_0"]
    assert params["kernel"].batch_shape == (N_LAYERS,)
    w = px.materialize(v["params"], v["paramx_state"])["ScanPlainBlock_0"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(_sigmas(w), 1.0, atol=5e-3)  # per layer (the stack: < 0.95)
    h = X
    for i in range(N_LAYERS):
        h = jnp.tanh(h @ w[i] + params["bias"][i][None, :])
    assert_close(model.apply(v, X), h, scale=10)


# --- item 9: model.tabulate -----------------------------------------------------------------------
def test_tabulate_shows_the_originals_and_the_state():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = _sn_layer()(x)
            return px.linen.Parametrize(nn.Dense(2), {"kernel": px.WeightNorm()})(x)

    table = Net().tabulate(
        jax.random.key(0), X, console_kwargs={"width": 200, "force_terminal": False}
    )
    assert "chain: spectral_norm" in table and "chain: weight_norm" in table
    assert "original: float32[4,4]" in table
    assert "original0: float32[1,2]" in table and "original1: float32[4,2]" in table
    assert "u: float32[4]" in table  # the paramx_state column
    assert "Total Parameters" in table


# --- item 11: partitioning annotations ------------------------------------------------------------
def _partitioned_layer(**kw):
    init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    return px.linen.Parametrize(nn.Dense(4, kernel_init=init), {"kernel": px.SpectralNorm()}, **kw)


def test_with_partitioning_keeps_the_box_and_its_spec():
    layer = _partitioned_layer()
    v = layer.init(jax.random.key(0), X)
    box = v["params"]["kernel"]
    assert isinstance(box, nn.Partitioned) and box.names == (None, "model")
    assert px.is_parametrized(v["params"], "kernel")
    spec = nn.get_partition_spec(v)
    assert spec["params"]["kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert layer.apply(v, X).shape == (3, 4)
    _, upd = layer.apply(v, X, use_running_average=False, mutable=["paramx_state"])
    assert upd["paramx_state"]["kernel"]["0"]["u"].shape == (4,)


def test_with_partitioning_materializes_outside_the_model():
    layer = _partitioned_layer()
    v = layer.init(jax.random.key(0), X)
    plain = px.materialize(v["params"], v["paramx_state"])
    w = nn.unbox(plain)["kernel"]
    assert abs(_sigmas(w) - 1.0) < 1e-4
    assert_close(layer.apply(v, X), X @ w + v["params"]["bias"][None, :], scale=10)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "flax's tabulate reads `jnp.shape` / `jnp.result_type` of a partitioned box's value, "
        "here a Parametrized node, which refuses to act as an array (issue 11 item 13: no "
        "`.shape`/`.dtype`, so an unmaterialized tree fails loudly). layout='arrays' boxes "
        "plain arrays and tabulates (the test below)."
    ),
)
def test_tabulate_with_a_partitioned_parametrized_kernel():
    table = _partitioned_layer().tabulate(
        jax.random.key(0), X, console_kwargs={"width": 200, "force_terminal": False}
    )
    assert "chain: spectral_norm" in table


def test_tabulate_with_a_partitioned_kernel_in_the_arrays_layout():
    table = _partitioned_layer(layout="arrays").tabulate(
        jax.random.key(0), X, console_kwargs={"width": 200, "force_terminal": False}
    )
    assert "original" in table and "float32[3,4]" in table and "paramx_state" in table


# --- item 10: the NNX bridge (layout="arrays") ---------------------------------------------------
def _spectral_norm_of(model):
    """The largest singular value of the kernel a bridged Dense layer computes (evaluation)."""
    w = model(jnp.eye(4, dtype=F32)) - model(jnp.zeros((1, 4), F32))
    return float(_sigmas(w))


def test_nnx_bridge_lazy_init_apply_and_a_training_step():
    from flax import nnx

    model = nnx.bridge.ToNNX(_sn_layer(layout="arrays"), rngs=nnx.Rngs(0))
    model.lazy_init(X)
    # Plain arrays only: the parameter and the state sit at distinct names.
    assert set(model.kernel) == {"original", "0"}
    assert isinstance(model.kernel["original"], nnx.Param)
    assert model(X).shape == (3, 4)
    assert abs(_spectral_norm_of(model) - 1.0) < 5e-3
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss(m):
            y = m(X, use_running_average=False, mutable=["paramx_state"])
            return jnp.mean((y - 1.0) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
            opt.update(model, grads)
        return value

    u0 = model.kernel["0"]["u"].get_value()
    first, second = float(step(model, opt)), float(step(model, opt))
    assert second < first
    assert not np.allclose(model.kernel["0"]["u"].get_value(), u0)  # the state was trained
    assert abs(_spectral_norm_of(model) - 1.0) < 2e-2
    # Evaluation (the default: the state collection is immutable) leaves the state alone.
    u1 = model.kernel["0"]["u"].get_value()
    model(X)
    assert np.array_equal(model.kernel["0"]["u"].get_value(), u1)


_KINDS = {
    "spectral_norm": px.SpectralNorm,
    "orthogonal": px.Orthogonal,
    "weight_norm": px.WeightNorm,
}


def _trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: assert_close(x, y), a, b)


def _as_nodes_layout(arrays_params, nodes_params):
    """The nodes layout's tree with the originals of an arrays layout's tree."""

    def put(node, stored):
        return node.replace(
            originals=tuple(stored[n] for n in node.original_names),
            params=stored.get("params", {}),
        )

    return jax.tree.map(
        lambda x, y: put(x, y) if isinstance(x, px.Parametrized) else y,
        nodes_params,
        arrays_params,
        is_leaf=lambda x: isinstance(x, px.Parametrized),
    )


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_arrays_layout_computes_what_the_nodes_layout_computes(kind):
    rules = {"kernel": _KINDS[kind]()}
    nodes = px.linen.Parametrize(nn.Dense(4), rules)
    arrays = px.linen.Parametrize(nn.Dense(4), rules, layout="arrays")
    y_n, v_n = nodes.init_with_output(jax.random.key(0), X)
    y_a, v_a = arrays.init_with_output(jax.random.key(0), X)
    assert_close(y_a, y_n)
    kernel = v_a["params"]["kernel"]
    names = ["original0", "original1"] if kind == "weight_norm" else ["original"]
    assert sorted(kernel) == names
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(v_a["params"]))
    assert [n for n in v_n["params"]["kernel"].original_names] == names
    for name, x in zip(names, v_n["params"]["kernel"].originals):
        assert_close(kernel[name], x)
    _trees_close(v_a.get("paramx_state", {}), v_n.get("paramx_state", {}))
    # Move the kernel so that a training step visibly changes the state.
    new = {"kernel": {n: x + 0.1 * jnp.ones_like(x) for n, x in kernel.items()}}
    v_a = {**v_a, "params": {**v_a["params"], **new}}
    v_n = {**v_n, "params": _as_nodes_layout(v_a["params"], v_n["params"])}
    assert_close(arrays.apply(v_a, X), nodes.apply(v_n, X))
    train = {"use_running_average": False, "mutable": ["paramx_state"]}
    (y_a, upd_a), (y_n, upd_n) = arrays.apply(v_a, X, **train), nodes.apply(v_n, X, **train)
    assert_close(y_a, y_n)
    _trees_close(upd_a, upd_n)
    if kind == "spectral_norm":
        assert not np.allclose(_u(upd_a), _u(v_a), atol=1e-4)


class LayoutBlock(nn.Module):
    layout: str

    @nn.compact
    def __call__(self, h, _):
        rules = {"kernel": px.SpectralNorm()}
        return jnp.tanh(px.linen.Parametrize(nn.Dense(4), rules, layout=self.layout)(h)), None


class ScannedInside(nn.Module):
    """Parametrize inside the scanned body: each layer registers on its own."""

    layout: str

    @nn.compact
    def __call__(self, x, use_running_average=True):
        stack = nn.scan(
            LayoutBlock,
            variable_axes={"params": 0, "paramx_state": 0},
            split_rngs={"params": True},
            length=N_LAYERS,
        )(self.layout)
        return stack(x, None)[0]


class ScannedOutside(nn.Module):
    """Parametrize around the scan over layers, with batch_axes=1."""

    layout: str

    @nn.compact
    def __call__(self, x, use_running_average=True):
        stack = nn.scan(
            PlainBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=N_LAYERS
        )
        rules = {"Dense_0/kernel": px.SpectralNorm()}
        layers = px.linen.Parametrize(stack(), rules, batch_axes=1, layout=self.layout)
        return layers(x, None, use_running_average=use_running_average)[0]


@pytest.mark.parametrize("model", [ScannedInside, ScannedOutside])
def test_arrays_layout_in_layer_stacks(model):
    y_n, v_n = jax.jit(model("nodes").init_with_output)(jax.random.key(0), X)
    y_a, v_a = jax.jit(model("arrays").init_with_output)(jax.random.key(0), X)
    assert_close(y_a, y_n)
    _trees_close(v_a["paramx_state"], v_n["paramx_state"])
    (kernel,) = [
        x for p, x in jax.tree_util.tree_leaves_with_path(v_a["params"]) if "original" in str(p)
    ]
    assert kernel.shape == (N_LAYERS, 4, 4)
    assert_close(model("arrays").apply(v_a, X), model("nodes").apply(v_n, X))
    if model is ScannedOutside:  # a training step: one power iteration per layer
        train = {"use_running_average": False, "mutable": ["paramx_state"]}
        (y_a, upd_a), (y_n, upd_n) = (
            model("arrays").apply(v_a, X, **train),
            model("nodes").apply(v_n, X, **train),
        )
        assert_close(y_a, y_n)
        _trees_close(upd_a, upd_n)


def test_a_wrong_layout_value_raises():
    with pytest.raises(ValueError, match=r"`layout` must be 'nodes' .* or 'arrays'.*'array'"):
        _sn_layer(layout="array").init(jax.random.key(0), X)


def test_variables_made_with_the_other_layout_raise_a_clear_error():
    v_nodes = _sn_layer().init(jax.random.key(0), X)
    v_arrays = _sn_layer(layout="arrays").init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"kernel.*created with layout='arrays'"):
        _sn_layer().apply(v_arrays, X)
    with pytest.raises(ValueError, match=r"kernel.*created with layout='nodes'"):
        _sn_layer(layout="arrays").apply(v_nodes, X)
    # A stored tensor with keys registration does not make, and a plain (unregistered) kernel.
    odd = {**v_arrays["params"], "kernel": {**v_arrays["params"]["kernel"], "scale": X[0]}}
    with pytest.raises(ValueError, match=r"at 'kernel' has keys \['original', 'scale'\]"):
        _sn_layer(layout="arrays").apply({**v_arrays, "params": odd}, X)
    plain = {**v_arrays["params"], "kernel": v_arrays["params"]["kernel"]["original"]}
    with pytest.raises(ValueError, match="holds a plain array"):
        _sn_layer(layout="arrays").apply({**v_arrays, "params": plain}, X)


def test_arrays_layout_with_a_predicate_a_chain_and_a_partitioned_kernel():
    init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    is_kernel = lambda path, leaf: px.path_keys(path)[-1] == "kernel"
    rules = [(is_kernel, px.SpectralNorm()), ("kernel", jnp.tanh)]
    nodes = px.linen.Parametrize(nn.Dense(4, kernel_init=init), rules)
    arrays = nodes.clone(layout="arrays")
    v_n, v_a = nodes.init(jax.random.key(0), X), arrays.init(jax.random.key(0), X)
    box = v_a["params"]["kernel"]["original"]
    assert isinstance(box, nn.Partitioned) and box.names == (None, "model")
    assert nn.get_partition_spec(v_a)["params"]["kernel"]["original"] == jax.sharding.PartitionSpec(
        None, "model"
    )
    assert_close(arrays.apply(v_a, X), nodes.apply(v_n, X))


def test_the_bridge_with_the_nodes_layout_says_to_use_the_arrays_layout():
    from flax import nnx

    model = nnx.bridge.ToNNX(_sn_layer(), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"layout=\"arrays\""):
        model.lazy_init(X)
