"""Loading plain weights into parametrized models (px.load_plain, paramx.nnx.load_plain), and
the reverse: exporting a parametrized model to the plain model's tree and torch state_dict."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx.interop import from_torch_state_dict, to_torch_state_dict

F32 = jnp.float32


def _q(n, seed):
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (n, n), F32))
    return q


def _tree():
    tree = {
        "a": {"kernel": jnp.ones((3, 3), F32), "bias": jnp.zeros(3, F32)},
        "b": {"kernel": jnp.ones((3, 2), F32)},
        "c": {"kernel": jnp.ones((2, 2), F32)},
    }
    tree = px.orthogonal(tree, "a/kernel")
    tree = px.weight_norm(tree, "b/kernel")
    return px.spectral_norm(tree, "c/kernel")


def test_tree_right_inverse_per_tensor_copies_the_rest_and_reports_distances():
    tree = _tree()
    plain = {
        "a": {"kernel": _q(3, 0), "bias": jnp.arange(3, dtype=F32)},
        "b": {"kernel": jnp.arange(6, dtype=F32).reshape(3, 2) + 1},
        "c": {"kernel": jnp.diag(jnp.array([3.0, 1.0], F32))},
    }
    new, report = px.load_plain(tree, plain)
    assert report.copied == ["a/bias"]
    dist = report.projected
    assert set(dist) == {"a/kernel", "b/kernel", "c/kernel"}
    assert dist["a/kernel"] < 1e-5  # already orthogonal
    assert dist["b/kernel"] < 1e-6  # weight norm represents every matrix
    # spectral norm divides by its current estimate of sigma (from the registered u, v: the
    # model's value in eval mode), so the loaded value is a rescaled w
    out = px.materialize(new)
    w = np.asarray(plain["c"]["kernel"])
    expected = np.linalg.norm(np.asarray(out["c"]["kernel"]) - w) / np.linalg.norm(w)
    np.testing.assert_allclose(dist["c/kernel"], expected, rtol=1e-5)
    assert dist["c/kernel"] > 0.3
    np.testing.assert_allclose(out["a"]["kernel"], plain["a"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(out["b"]["kernel"], plain["b"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(out["a"]["bias"], plain["a"]["bias"])
    assert "c/kernel  projected by spectral_norm" in str(report)
    # the input is not modified
    np.testing.assert_array_equal(tree["a"]["bias"], jnp.zeros(3, F32))


def test_missing_and_unexpected_paths():
    tree = _tree()
    plain = px.materialize(tree)
    del plain["a"]["bias"]
    plain["a"]["biass"] = jnp.zeros(3, F32)
    with pytest.raises(ValueError) as info:
        px.load_plain(tree, plain)
    text = str(info.value)
    assert "missing 'a/bias': no value in the plain tree (closest: 'a/biass')" in text
    assert "unexpected 'a/biass'" in text and "(closest: 'a/bias'" in text
    new, report = px.load_plain(tree, plain, strict=False)
    assert report.missing == ("a/bias",) and report.unexpected == ("a/biass",)
    np.testing.assert_array_equal(new["a"]["bias"], tree["a"]["bias"])
    with pytest.raises(ValueError, match=r"Shape mismatch at a/bias"):
        px.load_plain(tree, {**px.materialize(tree), "a": {**plain["a"], "bias": jnp.zeros(4)}})
    with pytest.raises(ValueError, match=r"holds parametrized tensors"):
        px.load_plain(tree, tree)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(4)(x)


def test_linen_variables_from_a_plain_checkpoint_and_back():
    x = jnp.ones((2, 3), F32)
    pretrained = Net().init(jax.random.key(0), x)  # the plain model's checkpoint
    variables = Net().init(jax.random.key(1), x)
    tree = px.orthogonal(variables, "params/Dense_1/kernel")
    tree = px.spectral_norm(tree, "params/Dense_0/kernel")
    new, report = px.load_plain(tree, pretrained)
    assert sorted(report.projected) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    assert "batch_stats/BatchNorm_0/mean" in report.copied
    # the reverse: the plain model's tree, which the plain model applies
    plain = px.materialize(new)
    assert jax.tree.structure(plain) == jax.tree.structure(pretrained)
    np.testing.assert_array_equal(
        plain["params"]["Dense_0"]["bias"], pretrained["params"]["Dense_0"]["bias"]
    )
    Net().apply(plain, x)
    removed = px.remove_parametrizations(new)
    for a, b in zip(jax.tree.leaves(removed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stacked_layers_nn_scan():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = nn.scan(
                lambda m, c, _: (nn.Dense(3)(c), None),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=2,
            )
            return layer(self, x, None)[0]

    x = jnp.ones((1, 3), F32)
    pretrained = Stack().init(jax.random.key(0), x)
    tree = px.orthogonal(
        Stack().init(jax.random.key(1), x),
        lambda p, leaf: px.path_keys(p)[-1] == "kernel",
        batch_axes=1,
    )
    new, report = px.load_plain(tree, pretrained)
    [(_, dist)] = report.projected.items()
    assert dist > 0.1  # random kernels are not orthogonal
    k = px.materialize(new)
    kernels = jax.tree.leaves(
        {p: v for p, v in jax.tree_util.tree_flatten_with_path(k)[0] if "kernel" in str(p)}
    )
    assert kernels[0].shape == (2, 3, 3)
    for q in kernels[0]:
        np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-5)
    assert jax.tree.structure(k) == jax.tree.structure(pretrained)
    with pytest.raises(ValueError, match="stack"):
        to_torch_state_dict(new)


def test_torch_plain_state_dict_into_a_parametrized_tree():
    template = px.orthogonal(
        {"fc": {"kernel": jnp.eye(3, dtype=F32), "bias": jnp.zeros(3, F32)}}, "fc/kernel"
    )
    q = np.asarray(_q(3, 2))
    sd = {"fc.weight": q.T.copy(), "fc.bias": np.ones(3, np.float32)}  # torch: (out, in)
    with pytest.raises(ValueError, match=r"paramx.load_plain\(template"):
        from_torch_state_dict(sd, template)
    plain = from_torch_state_dict(sd, px.materialize(template))
    tree, report = px.load_plain(template, plain)
    assert report.projected["fc/kernel"] < 1e-5
    np.testing.assert_allclose(px.materialize(tree)["fc"]["kernel"], q, atol=1e-5)
    # the reverse: the plain model's torch state_dict
    out = to_torch_state_dict(px.materialize(tree))
    assert sorted(out) == ["fc.bias", "fc.weight"]
    np.testing.assert_allclose(out["fc.weight"], q.T, atol=1e-5)


class NNXNet(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.out = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(self.lin(x)))


def test_nnx_load_plain_in_place_and_back():
    pretrained = NNXNet(0)
    model = NNXNet(1)
    pnx.orthogonal(model.lin)
    pnx.weight_norm(model.out)
    report = pnx.load_plain(model, nnx.state(pretrained))
    assert sorted(report.projected) == ["lin/kernel", "out/kernel"]
    assert report.projected["out/kernel"] < 1e-6
    assert "bn/mean" in report.copied
    np.testing.assert_allclose(model.out.kernel[...], pretrained.out.kernel[...], rtol=1e-6)
    q = model.lin.kernel[...]
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-5)
    # the reverse: the plain model's state, and its torch state_dict
    state = pnx.plain_state(model)
    plain = NNXNet(2)
    nnx.update(plain, state)
    model.eval()
    plain.eval()
    x = jnp.ones((2, 3), F32)
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-6)
    assert pnx.is_parametrized(model.lin)
    sd = to_torch_state_dict(plain)
    assert "lin.weight" in sd and "out.weight" in sd
    assert not any("parametrizations" in k for k in sd)
    # a plain torch state_dict into the parametrized module: read with a plain twin, load
    again = NNXNet(3)
    pnx.orthogonal(again.lin)
    pnx.weight_norm(again.out)
    report = pnx.load_plain(again, from_torch_state_dict(sd, NNXNet(4)))
    assert report.projected["lin/kernel"] < 1e-5
    again.eval()
    np.testing.assert_allclose(again(x), model(x), rtol=1e-5, atol=1e-6)


def test_nnx_errors_leave_the_module_unchanged():
    model = NNXNet(1)
    pnx.orthogonal(model.lin)
    before = jax.tree.map(np.asarray, nnx.state(model))
    state = nnx.state(NNXNet(0))
    del state["bn"]["mean"]
    with pytest.raises(ValueError, match=r"missing 'bn/mean'"):
        pnx.load_plain(model, state)
    after = jax.tree.map(np.asarray, nnx.state(model))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    report = pnx.load_plain(model, state, strict=False)
    assert report.missing == ("bn/mean",)


class NNXAutoEncoder(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.enc = nnx.Linear(4, 2, rngs=rngs)
        self.dec = nnx.Linear(2, 4, rngs=rngs)

    def __call__(self, x):
        return self.dec(self.enc(x))


def test_nnx_a_tie_exports_and_loads_as_the_plain_models_tensors():
    # nnx.state files the source's Variables under the tied attribute (dec before enc):
    # plain_state gave {'dec': {'kernel': {'source': ...}}} (no 'enc'), which nnx.update
    # wrote into a plain model, breaking it, and load_plain refused the plain model's state.
    model = NNXAutoEncoder(1)
    pnx.orthogonal(model.enc)
    pnx.tie(model.dec, "kernel", model.enc, "kernel", transform=jnp.transpose)
    state = pnx.plain_state(model)
    plain = NNXAutoEncoder(2)
    assert jax.tree.structure(state) == jax.tree.structure(nnx.state(plain))
    nnx.update(plain, state)
    x = jnp.ones((2, 4), F32)
    model.eval()
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-6)
    assert isinstance(vars(model.dec)["kernel"], pnx.Tied)  # the module is unchanged

    pretrained = NNXAutoEncoder(3)
    report = pnx.load_plain(model, nnx.state(pretrained))
    assert sorted((e.path, e.action) for e in report.entries) == [
        ("dec/bias", "copied"),
        ("dec/kernel", "tied"),
        ("enc/bias", "copied"),
        ("enc/kernel", "projected"),
    ]
    q = model.enc.kernel
    np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(model.dec.kernel[...], q.T)
    np.testing.assert_allclose(model.dec.bias[...], pretrained.dec.bias[...])
    del state["dec"]["kernel"]  # a tied tensor needs no value
    assert pnx.load_plain(model, state).copied == ["dec/bias", "enc/bias"]


def test_nnx_stacked_layers():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(3, 3, rngs=nnx.Rngs(params=key))

    keys = jax.random.split(jax.random.key(0), 2)
    pretrained = make(keys)
    model = make(jax.random.split(jax.random.key(1), 2))
    pnx.orthogonal(model, batch_axes=1)
    report = pnx.load_plain(model, nnx.state(pretrained))
    assert list(report.projected) == ["kernel"]
    k = model.kernel[...]
    assert k.shape == (2, 3, 3)
    for q in k:
        np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-5)
    state = pnx.plain_state(model)
    assert state["kernel"][...].shape == (2, 3, 3)
    np.testing.assert_allclose(state["kernel"][...], k, atol=1e-6)


def test_a_tied_leaf_reads_its_source_and_is_reported():
    tree = {"enc": {"kernel": _q(3, 5)}, "dec": {"kernel": jnp.eye(3, dtype=F32)}}
    tree = px.tie(
        px.orthogonal(tree, "enc/kernel"), "dec/kernel", "enc/kernel", transform=jnp.transpose
    )
    plain = {"enc": {"kernel": _q(3, 6)}, "dec": {"kernel": jnp.zeros((3, 3), F32)}}
    new, report = px.load_plain(tree, plain)
    assert [(e.path, e.action) for e in report.entries] == [
        ("dec/kernel", "tied"),
        ("enc/kernel", "projected"),
    ]
    out = px.materialize(new)
    np.testing.assert_allclose(out["dec"]["kernel"], out["enc"]["kernel"].T, atol=1e-6)
    np.testing.assert_allclose(out["enc"]["kernel"], plain["enc"]["kernel"], atol=1e-5)
