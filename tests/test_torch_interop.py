"""torch state_dict interop (paramx.interop) against state_dicts stored from torch 2.13.

tests/data/torch_state_dicts/ holds, per case, a tiny torch model's state_dict, a fixed input and
torch's output (eval mode; for spectral norm also one training-mode forward and the state_dict
after it). Each test builds the equivalent Flax linen model, registers the same
parametrizations on its params with paramx, reads the state_dict into that template, and
checks that the materialized tree reproduces torch's output, that writing it back gives
torch's keys and arrays exactly, and (spectral norm) that paramx's state update is torch's
training step. torch is not needed, except by the last test, which runs live models when
torch is importable.
"""

import functools
import importlib.util
import json
import warnings
from pathlib import Path

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
from paramx import interop
from paramx.interop import from_torch_state_dict, to_torch_state_dict

DATA = Path(__file__).parent / "data" / "torch_state_dicts"
MANIFEST = json.loads((DATA / "manifest.json").read_text())["cases"]


@functools.cache
def _arrays():
    with np.load(DATA / "state_dicts.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _load(case):
    arrays = _arrays()
    keys = MANIFEST[case]["keys"]
    out = {
        "x": arrays[f"{case}|x"],
        "y": arrays[f"{case}|y"],
        "sd": {k: arrays[f"{case}|sd|{k}"] for k in keys},
    }
    if MANIFEST[case]["train"]:
        out["y_train"] = arrays[f"{case}|y_train"]
        out["sd_train"] = {k: arrays[f"{case}|sd_train|{k}"] for k in keys}
    return out


# ----- the Flax twins -------------------------------------------------------------------------
class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(5, name="layers_0")(x))
        x = jnp.tanh(nn.Dense(5, name="layers_1")(x))
        return nn.LayerNorm(epsilon=1e-5, name="norm")(x)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(Encoder(name="encoder")(x))


class Single(nn.Module):
    make: object  # a layer factory taking name=

    @nn.compact
    def __call__(self, x):
        return self.make(name="layer")(x)


class Legacy(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (2,), padding="VALID", name="conv")(x).mean(axis=1)
        return nn.Dense(3, name="fc")(x)


def _single(make):
    return Single(make)


def _channels_last(x):
    return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


def _channels_first(y):
    return np.moveaxis(np.asarray(y), -1, 1) if y.ndim > 2 else np.asarray(y)


CT_PAD = ((1, 1),)  # torch ConvTranspose padding p with kernel k: Flax pads k - 1 - p per side

# case -> (flax model, register(params) -> template, from/to keywords)
TWINS = {
    "nested": (
        Nested(),
        lambda t: px.weight_norm(px.spectral_norm(t, "encoder/layers_1/kernel"), "head/kernel"),
        {
            "modules": {
                "encoder.layers.0": "encoder/layers_0",
                "encoder.layers.1": "encoder/layers_1",
            }
        },
    ),
    "linear_spectral": (
        _single(functools.partial(nn.Dense, 7)),
        lambda t: px.spectral_norm(t, "layer/kernel", n_power_iterations=2),
        {},
    ),
    "conv2d_spectral": (
        _single(functools.partial(nn.Conv, 4, (2, 3), padding=((1, 1), (1, 1)))),
        lambda t: px.spectral_norm(t, "layer/kernel"),
        {},
    ),
    "conv1d_weight_norm": (
        _single(functools.partial(nn.Conv, 4, (3,), strides=2, padding=((1, 1),))),
        lambda t: px.weight_norm(t, "layer/kernel"),
        {},
    ),
    "legacy_weight_norm": (
        Legacy(),
        lambda t: px.weight_norm(px.weight_norm(t, "conv/kernel", dim=None), "fc/kernel"),
        {},
    ),
    "chain_weight_norm_spectral": (
        _single(functools.partial(nn.Conv, 3, (3, 3), padding="VALID")),
        lambda t: px.spectral_norm(px.weight_norm(t, "layer/kernel"), "layer/kernel"),
        {},
    ),
    "chain_spectral_orthogonal": (
        _single(functools.partial(nn.Dense, 3)),
        lambda t: px.spectral_norm(
            px.orthogonal(
                px.spectral_norm(t, "layer/kernel"),
                "layer/kernel",
                "matrix_exp",
                use_trivialization=False,
            ),
            "layer/bias",
        ),
        {},
    ),
    # Flax's default ConvTranspose (transpose_kernel=False): layout "conv_transpose".
    "conv_transpose_spectral": (
        _single(functools.partial(nn.ConvTranspose, 4, (3,), strides=(2,), padding=CT_PAD)),
        lambda t: px.spectral_norm(t, "layer/kernel"),
        {"layouts": {"layer": "conv_transpose"}},
    ),
    # transpose_kernel=True keeps torch's kernel as (k, out, in): the default "conv" layout, and
    # torch's dim=1 (out) is paramx's dim=-2.
    "conv_transpose_spectral/transpose_kernel": (
        _single(
            functools.partial(
                nn.ConvTranspose, 4, (3,), strides=(2,), padding=CT_PAD, transpose_kernel=True
            )
        ),
        lambda t: px.spectral_norm(t, "layer/kernel", dim=-2),
        {},
    ),
}
_SHAPES = {"square": 4, "tall": 5, "wide": 3}  # Dense features (torch Linear out)
for _case in MANIFEST:
    if _case.startswith("orthogonal_"):
        _map, _shape, _triv = _case[len("orthogonal_") :].rsplit("_", 2)
        TWINS[_case] = (
            _single(functools.partial(nn.Dense, _SHAPES[_shape])),
            functools.partial(
                lambda t, m, triv: px.orthogonal(t, "layer/kernel", m, use_trivialization=triv),
                m=_map,
                triv=_triv == "triv",
            ),
            {},
        )


# ----- NNX twins: the same torch models read into NNX modules registered with paramx.nnx ------
class NNXSingle(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


class NNXSequentialNet(nnx.Module):
    """torch's SequentialNet: nnx.Sequential's `layers/0` is torch's `net.0` automatically."""

    def __init__(self, rngs):
        self.net = nnx.Sequential(
            pnx.spectral_norm(nnx.Linear(4, 5, rngs=rngs)),
            jnp.tanh,
            nnx.BatchNorm(5, rngs=rngs),  # mean/var are torch's running_mean/running_var
            pnx.weight_norm(nnx.Linear(5, 5, rngs=rngs)),
            jnp.tanh,
            pnx.orthogonal(nnx.Linear(5, 3, rngs=rngs)),
            nnx.Linear(3, 2, rngs=rngs),
        )

    def __call__(self, x):
        return self.net(x)


def _nnx_chain(rngs):
    layer = pnx.spectral_norm(nnx.Linear(4, 3, rngs=rngs))
    pnx.orthogonal(layer, "kernel", "matrix_exp", use_trivialization=False)
    return NNXSingle(pnx.spectral_norm(layer, "bias"))


NNX_TWINS = {
    "nnx_sequential": NNXSequentialNet,
    "linear_spectral": lambda rngs: NNXSingle(
        pnx.spectral_norm(nnx.Linear(5, 7, rngs=rngs), n_power_iterations=2)
    ),
    "chain_spectral_orthogonal": _nnx_chain,
    "orthogonal_householder_wide_triv": lambda rngs: NNXSingle(
        pnx.orthogonal(nnx.Linear(5, 3, rngs=rngs), orthogonal_map="householder")
    ),
    "orthogonal_cayley_tall_notriv": lambda rngs: NNXSingle(
        pnx.orthogonal(
            nnx.Linear(3, 5, rngs=rngs), orthogonal_map="cayley", use_trivialization=False
        )
    ),
}


def _setup(twin, *, abstract=True):
    """The twin's template: abstract by default (reading needs only shapes, and tracing is
    much cheaper than running the registrations); ``abstract=False`` runs them."""
    case = twin.split("/")[0]
    model, register, kw = TWINS[twin]
    data = _load(case)
    x = jnp.asarray(_channels_last(data["x"]))
    make = lambda: register(model.init(jax.random.key(1), x)["params"])
    template = jax.eval_shape(make) if abstract else make()
    return case, model, template, kw, data, x


def _apply(model):
    return jax.jit(lambda tree, x: model.apply({"params": px.materialize(tree)}, x))


def test_every_stored_case_has_a_twin():
    assert set(MANIFEST) <= {t.split("/")[0] for t in TWINS} | set(NNX_TWINS)
    assert len(MANIFEST) == 27


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_torch_outputs_reproduced_and_state_dict_round_trips(twin):
    case, model, template, kw, data, x = _setup(twin)
    tree = from_torch_state_dict(data["sd"], template, **kw)
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(template)
    y = _apply(model)(tree, x)
    assert_close(_channels_first(y), data["y"], jnp.float32)

    back = to_torch_state_dict(tree, **kw, legacy_weight_norm=case == "legacy_weight_norm")
    assert set(back) == set(data["sd"])
    for k, v in data["sd"].items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("twin", sorted(t for t in TWINS if MANIFEST[t.split("/")[0]]["train"]))
def test_state_update_is_torchs_training_step(twin):
    _, model, template, kw, data, x = _setup(twin)
    tree = from_torch_state_dict(data["sd"], template, **kw)

    @jax.jit
    def train_step(tree, x):
        plain, new_state = px.materialize(tree, update_state=True)
        return model.apply({"params": plain}, x), new_state

    y, new_state = train_step(tree, x)
    assert_close(_channels_first(y), data["y_train"], jnp.float32)
    updated = px.merge_state(px.split_state(tree)[0], new_state)
    back = to_torch_state_dict(updated, **kw)
    for k, v in data["sd_train"].items():
        assert_close(back[k], v, jnp.float32)
    moved = [k for k in data["sd"] if not np.array_equal(data["sd"][k], data["sd_train"][k])]
    assert moved and all(k.endswith(("._u", "._v")) for k in moved)


def test_conv_spectral_norm_v_is_permuted_and_u_is_not():
    _, _, template, _, data, _ = _setup("conv2d_spectral")
    tree = from_torch_state_dict(data["sd"], template)
    state = tree["layer"]["kernel"].state["0"]
    u_t = data["sd"]["layer.parametrizations.weight.0._u"]
    v_t = data["sd"]["layer.parametrizations.weight.0._v"]
    np.testing.assert_array_equal(state["u"], u_t)
    # torch flattens the weight (out, in, kh, kw) to (out, in*kh*kw); paramx the kernel
    # (kh, kw, in, out) to (out, kh*kw*in).
    np.testing.assert_array_equal(state["v"], v_t.reshape(3, 2, 3).transpose(1, 2, 0).ravel())
    assert not np.array_equal(state["v"], v_t)
    w_t = data["sd"]["layer.parametrizations.weight.original"]
    np.testing.assert_array_equal(tree["layer"]["kernel"].original, w_t.transpose(2, 3, 1, 0))


def test_layouts_of_originals_and_base():
    _, _, template, _, data, _ = _setup("orthogonal_householder_wide_triv")
    tree = from_torch_state_dict(data["sd"], template)
    node = tree["layer"]["kernel"]
    w_t = data["sd"]["layer.parametrizations.weight.original"]  # (3, 5)
    np.testing.assert_array_equal(node.original, w_t.T)  # Dense kernel (5, 3)
    np.testing.assert_array_equal(
        node.state["0"]["base"], data["sd"]["layer.parametrizations.weight.0.base"]
    )

    _, _, template, _, data, _ = _setup("nested")
    tree = from_torch_state_dict(data["sd"], template, **TWINS["nested"][2])
    g, v = tree["head"]["kernel"].originals
    np.testing.assert_array_equal(g, data["sd"]["head.parametrizations.weight.original0"].T)
    assert g.shape == (1, 2) and v.shape == (5, 2)
    np.testing.assert_array_equal(
        tree["encoder"]["norm"]["scale"], data["sd"]["encoder.norm.weight"]
    )


def test_legacy_and_parametrization_weight_norm_keys_read_the_same():
    _, _, template, _, data, _ = _setup("legacy_weight_norm")
    legacy = from_torch_state_dict(data["sd"], template)
    renamed = {}
    for k, v in data["sd"].items():
        module, name = k.rsplit(".", 1)
        suffix = {"weight_g": "original0", "weight_v": "original1"}.get(name)
        renamed[f"{module}.parametrizations.weight.{suffix}" if suffix else k] = v
    new = from_torch_state_dict(renamed, template)
    for a, b in zip(jax.tree_util.tree_leaves(legacy), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(a, b)
    assert to_torch_state_dict(new).keys() == renamed.keys()
    assert set(to_torch_state_dict(new, legacy_weight_norm=True)) == set(data["sd"])
    assert legacy["conv"]["kernel"].originals[0].shape == ()  # dim=None: g is a scalar
    # Both spellings present at once is a mismatch, not a silent choice.
    with pytest.raises(
        ValueError, match=r"mismatch at conv/kernel.*legacy weight_norm.* and torch"
    ):
        from_torch_state_dict({**data["sd"], **renamed}, template)


def test_legacy_weight_norm_writes_new_keys_for_a_chain():
    _, _, template, _, data, _ = _setup("chain_weight_norm_spectral")
    tree = from_torch_state_dict(data["sd"], template)
    assert set(to_torch_state_dict(tree, legacy_weight_norm=True)) == set(data["sd"])


def test_full_variables_through_an_empty_module_prefix():
    _, model, template, kw, data, x = _setup("nested")
    modules = {"": "params", **{k: "params/" + v for k, v in kw["modules"].items()}}
    tree = from_torch_state_dict(data["sd"], {"params": template}, modules=modules)
    y = jax.jit(lambda t, x: model.apply(px.materialize(t), x))(tree, x)
    assert_close(y, data["y"], jnp.float32)
    assert set(to_torch_state_dict(tree, modules=modules)) == set(data["sd"])


def test_abstract_template_and_duck_typed_tensors():  # concrete templates: tests below
    class FakeTensor:  # what the reader asks of a torch tensor
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    _, model, template, _, data, x = _setup("conv2d_spectral")
    assert isinstance(template["layer"]["bias"], jax.ShapeDtypeStruct)
    sd = {k: FakeTensor(v) for k, v in data["sd"].items()}
    tree = from_torch_state_dict(sd, template)
    assert_close(_channels_first(_apply(model)(tree, x)), data["y"], jnp.float32)


def test_inputs_are_not_modified():
    _, _, template, kw, data, _ = _setup("nested", abstract=False)
    sd = dict(data["sd"])
    before = [np.array(x) for x in jax.tree_util.tree_leaves(template)]
    from_torch_state_dict(sd, template, **kw)
    with pytest.raises(ValueError):
        from_torch_state_dict({**sd, "extra.weight": np.ones(2)}, template, **kw)
    assert sd.keys() == data["sd"].keys()
    for a, b in zip(before, jax.tree_util.tree_leaves(template)):
        np.testing.assert_array_equal(a, b)


# ----- errors -----------------------------------------------------------------------------------
def test_unexpected_and_missing_keys_name_paths_and_closest_keys():
    _, _, template, kw, data, _ = _setup("nested")
    sd = {k: v for k, v in data["sd"].items() if k != "head.bias"}
    sd["encoder.layers.2.weight"] = np.ones((5, 5), np.float32)
    with pytest.raises(ValueError) as e:
        from_torch_state_dict(sd, template, **kw)
    text = str(e.value)
    assert "head/bias: expected torch key 'head.bias'" in text
    assert "'encoder.layers.2.weight' (would be Flax path 'encoder/layers/2/kernel')" in text
    assert "encoder/layers_0/kernel" in text and "strict=False" in text

    # Without `modules`, torch's names are not the Flax twin's.
    unmapped = "encoder/layers_0/kernel: expected torch key 'encoder.layers_0.weight'"
    with pytest.raises(ValueError, match=unmapped):
        from_torch_state_dict(data["sd"], template)


def test_strict_false_keeps_template_values_and_warns():
    _, _, template, kw, data, _ = _setup("nested", abstract=False)
    sd = {k: v for k, v in data["sd"].items() if k != "head.bias"}
    sd["unrelated.running_mean"] = np.zeros(3, np.float32)
    with pytest.warns(UserWarning, match="unrelated.running_mean") as record:
        tree = from_torch_state_dict(sd, template, strict=False, **kw)
    assert "head.bias" in str(record[0].message)
    np.testing.assert_array_equal(tree["head"]["bias"], template["head"]["bias"])
    np.testing.assert_array_equal(tree["encoder"]["norm"]["bias"], data["sd"]["encoder.norm.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_torch_state_dict(data["sd"], template, strict=False, **kw)  # nothing to report


def test_parametrization_mismatch_is_explained():
    _, _, template, _, data, _ = _setup("linear_spectral")
    wn = {
        "layer.bias": data["sd"]["layer.bias"],
        "layer.parametrizations.weight.original0": np.ones((7, 1), np.float32),
        "layer.parametrizations.weight.original1": np.ones((7, 5), np.float32),
    }
    with pytest.raises(ValueError) as e:
        from_torch_state_dict(wn, template)
    text = str(e.value)
    assert "Parametrization mismatch at layer/kernel" in text
    assert "[spectral_norm]" in text and "like weight_norm" in text

    plain = {"layer.bias": data["sd"]["layer.bias"], "layer.weight": np.ones((7, 5), np.float32)}
    with pytest.raises(ValueError, match=r"plain tensor \(no parametrization\)"):
        from_torch_state_dict(plain, template)
    unregistered = jax.eval_shape(lambda t: px.remove_parametrizations(t, "layer/kernel"), template)
    with pytest.raises(ValueError, match=r"template has a plain array.*spectral_norm"):
        from_torch_state_dict(data["sd"], unregistered)


def test_shape_mismatch_names_both_shapes_and_the_rule():
    model = Single(functools.partial(nn.Dense, 7))
    x = jnp.ones((1, 4), jnp.float32)  # torch's Linear has 5 inputs
    init = lambda: px.spectral_norm(model.init(jax.random.key(0), x)["params"], "layer/kernel")
    template = jax.eval_shape(init)
    data = _load("linear_spectral")
    with pytest.raises(ValueError) as e:
        from_torch_state_dict(data["sd"], template)
    text = str(e.value)
    assert "torch's 'layer.parametrizations.weight.original' has shape (7, 5)" in text
    assert "is (5, 7) in paramx's layout, but the template has (4, 7)" in text
    assert "layout 'dense'" in text and "Linear weight (out, in)" in text


def test_conv_transpose_needs_its_layout():
    # In the default "conv" layout torch's (in, out, k) lands as (k, out, in): a shape error
    # that points at the layout.
    data = _load("conv_transpose_spectral")
    model, register, _ = TWINS["conv_transpose_spectral"]
    x = jnp.ones((1, 5, 3), jnp.float32)
    template = jax.eval_shape(lambda: register(model.init(jax.random.key(0), x)["params"]))
    with pytest.raises(ValueError, match=r"layout 'conv'.*`layouts=`"):
        from_torch_state_dict(data["sd"], template)


def test_orthogonal_on_a_conv_kernel_has_no_torch_layout():
    tree = px.orthogonal({"layer": {"kernel": jnp.ones((3, 2, 4))}}, "layer/kernel")
    with pytest.raises(ValueError, match="Only the 'dense' layout has a torch equivalent"):
        to_torch_state_dict(tree)
    with pytest.raises(ValueError, match="Only the 'dense' layout"):
        from_torch_state_dict({}, tree)


def test_trainable_half_is_refused():
    tree = px.spectral_norm({"fc": {"kernel": jnp.ones((3, 2))}}, "fc/kernel")
    params, _ = px.split_state(tree)
    with pytest.raises(ValueError, match="not the trainable half"):
        to_torch_state_dict(params)


def test_bad_modules_and_layouts():
    tree = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="one to one"):
        to_torch_state_dict(tree, modules={"x": "a", "y": "a"})
    with pytest.raises(ValueError, match="is not a layout"):
        to_torch_state_dict(tree, layouts={"a": "transposed"})
    with pytest.raises(ValueError, match=r"names torch module\(s\) \['c'\]"):
        to_torch_state_dict(tree, layouts={"c": "identity"})
    with pytest.raises(ValueError, match="both map to the torch tensor 'a.weight'"):
        to_torch_state_dict({"a": {"kernel": jnp.ones(2), "weight": jnp.ones(2)}})
    sd = to_torch_state_dict(tree, modules={"enc.0": "a"}, layouts={"enc.0": "identity"})
    assert set(sd) == {"enc.0.weight", "b.weight"}
    assert interop.LAYOUTS.keys() == {"dense", "conv", "conv_transpose", "identity"}


def test_custom_parametrization_arrays_are_copied_by_name():
    tree = px.register_parametrization(
        {"fc": {"kernel": jnp.ones((3, 2))}}, "fc/kernel", toys.Scale(3.0)
    )
    sd = to_torch_state_dict(tree)
    assert set(sd) == {"fc.parametrizations.weight.original", "fc.parametrizations.weight.0.scale"}
    assert sd["fc.parametrizations.weight.original"].shape == (2, 3)
    sd["fc.parametrizations.weight.0.scale"] = np.asarray(5.0, np.float32)
    back = from_torch_state_dict(sd, tree)
    assert float(back["fc"]["kernel"].params["0"]["scale"]) == 5.0
    want = 5.0 * np.asarray(tree["fc"]["kernel"].original)  # Scale: value = original * scale
    assert_close(px.materialize(back)["fc"]["kernel"], want, jnp.float32)


# ----- strict=False and the report (issue 11, item 17) ----------------------------------------
def _sn_tree():
    tree = {"fc": {"kernel": jnp.arange(6.0).reshape(3, 2) / 7, "bias": jnp.zeros(2)}}
    return px.spectral_norm(tree, "fc/kernel", key=jax.random.key(0))


def test_strict_false_reads_a_partial_parametrized_tensor_and_reports():
    tree = _sn_tree()
    sd = to_torch_state_dict(tree)
    sd["fc.parametrizations.weight.original"] = sd["fc.parametrizations.weight.original"] * 2
    del sd["fc.parametrizations.weight.0._u"]  # partial: the old code raised here
    new, report = from_torch_state_dict(sd, tree, strict=False, return_report=True)
    assert report.missing_keys == ["fc.parametrizations.weight.0._u"]
    assert report.missing_paths == ["fc/kernel (state['0']['u'])"]
    assert report.unexpected_keys == []
    node = new["fc"]["kernel"]
    np.testing.assert_array_equal(node.state["0"]["u"], tree["fc"]["kernel"].state["0"]["u"])
    np.testing.assert_array_equal(node.original, 2 * np.asarray(tree["fc"]["kernel"].original))
    with pytest.warns(UserWarning, match=r"0\._u"):  # without the report: a warning
        from_torch_state_dict(sd, tree, strict=False)
    with pytest.raises(ValueError, match=r"expected torch key 'fc.parametrizations.weight.0._u'"):
        from_torch_state_dict(sd, tree)  # strict: missing keys, not a "mismatch"


def test_strict_false_skips_a_parametrization_the_template_lacks_and_says_so():
    tree = _sn_tree()
    plain = {"fc.weight": np.ones((2, 3), np.float32), "fc.bias": np.ones(2, np.float32)}
    new, report = from_torch_state_dict(plain, tree, strict=False, return_report=True)
    assert report.unexpected_keys == ["fc.weight"]
    assert set(report.missing_keys) == {
        "fc.parametrizations.weight.original",
        "fc.parametrizations.weight.0._u",
        "fc.parametrizations.weight.0._v",
    }
    assert "Parametrization mismatch at fc/kernel" in str(report)
    assert "plain tensor (no parametrization)" in report.message
    np.testing.assert_array_equal(new["fc"]["bias"], np.ones(2))
    np.testing.assert_array_equal(new["fc"]["kernel"].original, tree["fc"]["kernel"].original)
    # The template lacks a link that the state_dict has: its keys are unexpected, never dropped
    # in silence.
    more = {**to_torch_state_dict(tree), "fc.parametrizations.weight.1.base": np.eye(3)}
    with pytest.raises(ValueError, match=r"mismatch at fc/kernel.*orthogonal with triv"):
        from_torch_state_dict(more, tree)
    _, report = from_torch_state_dict(more, tree, strict=False, return_report=True)
    assert report.unexpected_keys == ["fc.parametrizations.weight.1.base"]


def test_report_of_a_full_match_is_empty():
    tree = _sn_tree()
    _, report = from_torch_state_dict(to_torch_state_dict(tree), tree, return_report=True)
    assert report == interop.IncompatibleKeys([], [], [], "")
    assert str(report) == "All keys matched."


# ----- silent wrong values: shapes and dtypes -------------------------------------------------
def test_wrong_length_spectral_vectors_are_refused_not_sliced():
    tree = _sn_tree()  # kernel (3, 2): torch weight (2, 3), u (2,), v (3,)
    sd = to_torch_state_dict(tree)
    for key, n in (("fc.parametrizations.weight.0._u", 4), ("fc.parametrizations.weight.0._v", 5)):
        bad = {**sd, key: np.ones(n, np.float32)}  # the old code took the first entries
        with pytest.raises(ValueError) as e:
            from_torch_state_dict(bad, tree, strict=False)
        text = str(e.value)
        assert "Shape mismatch at fc/kernel" in text and repr(key) in text
        assert f"has shape ({n},)" in text and f"torch shape ({n - 2},)" in text


def test_wrong_rank_names_the_key_and_both_shapes():
    tree = {"conv": {"kernel": jnp.ones((3, 2, 4))}}  # torch Conv1d weight (4, 2, 3)
    with pytest.raises(ValueError) as e:
        from_torch_state_dict({"conv.weight": np.ones((4, 6), np.float32)}, tree)
    text = str(e.value)
    assert "'conv.weight' has shape (4, 6), but the template has (3, 2, 4)" in text
    assert "torch shape (4, 2, 3)" in text and "layout 'conv'" in text


def test_dtype_kinds_are_kept_and_floats_are_cast():
    tree = {"fc": {"kernel": jnp.zeros((3, 2), jnp.float32), "bias": jnp.zeros(2, jnp.float32)}}
    sd = {"fc.weight": np.ones((2, 3), np.float64), "fc.bias": np.zeros(2, np.float16)}
    new = from_torch_state_dict(sd, tree)  # as torch's load_state_dict copies
    assert new["fc"]["kernel"].dtype == jnp.float32 and new["fc"]["bias"].dtype == jnp.float32
    for bad in (np.zeros(2, np.int64), np.zeros(2, np.bool_), np.zeros(2, np.complex64)):
        with pytest.raises(ValueError, match=r"dtype mismatch at fc/bias: torch's 'fc.bias'"):
            from_torch_state_dict({**sd, "fc.bias": bad}, tree)


def test_stacked_tensors_are_refused():
    tree = px.register_parametrization(
        {"l": {"kernel": jnp.ones((2, 3, 4))}},
        "l/kernel",
        px.SpectralNorm(),
        key=jax.random.key(0),
        batch_axes=1,
    )
    with pytest.raises(ValueError, match=r"l/kernel is a stack of 2 tensors"):
        to_torch_state_dict(tree)
    with pytest.raises(ValueError, match=r"stack of 2 tensors"):
        from_torch_state_dict({}, tree)
    one = jax.tree.map(lambda x: x[0], tree)  # one layer: a (3, 4) kernel
    assert set(to_torch_state_dict(one)) == {
        "l.parametrizations.weight.original",
        "l.parametrizations.weight.0._u",
        "l.parametrizations.weight.0._v",
    }


# ----- module names: nn.Sequential ------------------------------------------------------------
class SetupSequential(nn.Module):
    def setup(self):
        self.net = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(5), nn.tanh, nn.Dense(2)])

    def __call__(self, x):
        return self.net(x)


class CompactSequential(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(5), nn.tanh, nn.Dense(2)])(x)


def _torch_sequential_sd():  # torch: nn.Sequential(Linear(4, 5), Tanh(), Linear(5, 5), ...)
    rng = np.random.default_rng(0)
    sd = {}
    for i, (n_in, n_out) in zip((0, 2, 4), ((4, 5), (5, 5), (5, 2))):
        sd[f"net.{i}.weight"] = rng.normal(size=(n_out, n_in)).astype(np.float32)
        sd[f"net.{i}.bias"] = rng.normal(size=n_out).astype(np.float32)
    return sd


SEQUENTIAL_NAMES = {
    "setup": (SetupSequential(), ("net/layers_0", "net/layers_2", "net/layers_4")),
    "compact": (CompactSequential(), ("Dense_0", "Dense_1", "Dense_2")),  # in the parent
}


@pytest.mark.parametrize("kind", sorted(SEQUENTIAL_NAMES))
def test_sequential_names_get_a_suggested_mapping(kind):
    model, flax_names = SEQUENTIAL_NAMES[kind]
    want = dict(zip(("net.0", "net.2", "net.4"), flax_names))
    sd = _torch_sequential_sd()
    x = jnp.ones((1, 4), jnp.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
    with pytest.raises(ValueError) as e:
        from_torch_state_dict(sd, template)
    assert f"modules={want!r}" in str(e.value)
    tree = from_torch_state_dict(sd, template, modules=want)
    for i, f in want.items():
        keys = tuple(f.split("/"))
        kernel = functools.reduce(lambda t, k: t[k], keys, tree)["kernel"]
        np.testing.assert_array_equal(kernel, sd[f"{i}.weight"].T)
    _, report = from_torch_state_dict(sd, template, strict=False, return_report=True)
    assert f"modules={want!r}" in str(report)


# ----- NNX ------------------------------------------------------------------------------------
def _nnx_setup(case):
    data = _load(case)
    model = NNX_TWINS[case](nnx.Rngs(0))
    return model, data, jnp.asarray(data["x"])


def _values(module):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(module))]


@pytest.mark.parametrize("case", sorted(NNX_TWINS))
def test_nnx_reads_torch_and_writes_torch_keys(case):
    model, data, x = _nnx_setup(case)
    model.eval()
    before = _values(model)
    state = from_torch_state_dict(data["sd"], model)
    assert isinstance(state, nnx.State)
    for a, b in zip(before, _values(model)):  # the module is not modified
        np.testing.assert_array_equal(a, b)
    nnx.update(model, state)
    assert_close(model(x), data["y"], jnp.float32)
    back = to_torch_state_dict(model)
    # torch's BatchNorm counter has no NNX equivalent (torch fills it in on load)
    want = {k: v for k, v in data["sd"].items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_nnx_training_read_is_torchs_training_step():
    model, data, x = _nnx_setup("linear_spectral")
    nnx.update(model, from_torch_state_dict(data["sd"], model))
    model.train()
    assert_close(model(x), data["y_train"], jnp.float32)  # the read ran the power iteration
    back = to_torch_state_dict(model)
    for k, v in data["sd_train"].items():
        assert_close(back[k], v, jnp.float32)


def test_nnx_state_without_the_module_is_refused():
    model, data, _ = _nnx_setup("linear_spectral")
    state = nnx.state(model)
    with pytest.raises(ValueError, match=r"needs the NNX module, not its state.*nnx.merge"):
        to_torch_state_dict(state)  # the old code wrote 'layer.parametrizations.kernel...'
    with pytest.raises(ValueError, match=r"needs the NNX module"):
        from_torch_state_dict(data["sd"], state)
    with pytest.raises(ValueError, match=r"laid out as the state of a paramx.nnx module"):
        to_torch_state_dict(nnx.to_pure_dict(state))
    # A plain module's state is fine.
    plain = NNXSingle(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    sd = to_torch_state_dict(nnx.state(plain))
    assert set(sd) == {"layer.weight", "layer.bias"} and sd["layer.weight"].shape == (3, 2)
    new = from_torch_state_dict({k: v + 1 for k, v in sd.items()}, nnx.state(plain))
    np.testing.assert_array_equal(new["layer"]["bias"][...], np.ones(3))


def test_nnx_strict_false_keeps_values_and_reports():
    model, data, _ = _nnx_setup("nnx_sequential")
    sd = {k: v for k, v in data["sd"].items() if not k.startswith("net.5.")}
    sd["net.7.weight"] = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"net/layers/5/kernel \(original\)"):
        from_torch_state_dict(sd, model)
    state, report = from_torch_state_dict(sd, model, strict=False, return_report=True)
    assert set(report.missing_keys) == {
        "net.5.bias",
        "net.5.parametrizations.weight.original",
        "net.5.parametrizations.weight.0.base",
    }
    assert report.unexpected_keys == ["net.7.weight"]
    kept = model.net.layers[5].parametrizations["kernel"].original[...]
    nnx.update(model, state)
    np.testing.assert_array_equal(model.net.layers[5].parametrizations["kernel"].original, kept)
    np.testing.assert_array_equal(model.net.layers[6].kernel, data["sd"]["net.6.weight"].T)


def test_nnx_names_follow_modules_and_closest_matches():
    model, data, _ = _nnx_setup("linear_spectral")
    renamed = {k.replace("layer.", "fc."): v for k, v in data["sd"].items()}
    with pytest.raises(ValueError) as e:
        from_torch_state_dict(renamed, model)
    assert "layer/kernel (original): expected torch key" in str(e.value)
    assert "modules={'fc': 'layer'}" in str(e.value)
    nnx.update(model, from_torch_state_dict(renamed, model, modules={"fc": "layer"}))
    assert set(to_torch_state_dict(model, modules={"fc": "layer"})) == set(renamed)


# ----- live torch (skipped where torch is not installed, e.g. in CI) ---------------------------
LIVE = [
    "nested",
    "conv2d_spectral",
    "conv1d_weight_norm",
    "legacy_weight_norm",
    "chain_weight_norm_spectral",
    "chain_spectral_orthogonal",
    "conv_transpose_spectral",
    "conv_transpose_spectral/transpose_kernel",
    "orthogonal_householder_wide_triv",
    "orthogonal_matrix_exp_tall_notriv",
    "orthogonal_cayley_square_triv",
]


@functools.cache
def _generator_module():
    spec = importlib.util.spec_from_file_location("make_sd", DATA / "make_torch_state_dicts.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make


@pytest.mark.parametrize("twin", LIVE)
def test_live_torch_model_round_trip(twin):
    torch = pytest.importorskip("torch")
    make = _generator_module()
    case = twin.split("/")[0]
    spec = make.make_cases()[case]
    torch.manual_seed(7)
    model_t = spec["build"]()
    make.perturb(model_t)
    model_t.eval()
    x_t = torch.randn(spec["x"])
    with torch.no_grad():
        y_t = model_t(x_t).numpy()
    assert list(model_t.state_dict()) == MANIFEST[case]["keys"]  # torch's key layout

    model, register, kw = TWINS[twin]
    x = jnp.asarray(_channels_last(x_t.numpy()))
    template = register(model.init(jax.random.key(1), x)["params"])
    tree = from_torch_state_dict(model_t.state_dict(), template, **kw)  # torch tensors
    assert_close(_channels_first(_apply(model)(tree, x)), y_t, jnp.float32)

    fresh = spec["build"]()  # other random values, same structure
    legacy = case == "legacy_weight_norm"  # a legacy model refuses the new keys
    back = to_torch_state_dict(tree, **kw, legacy_weight_norm=legacy)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    fresh.eval()
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x_t).numpy(), y_t)


@pytest.mark.parametrize("case", ["nnx_sequential", "chain_spectral_orthogonal"])
def test_live_torch_loads_what_an_nnx_model_writes(case):
    torch = pytest.importorskip("torch")
    make = _generator_module()
    spec = make.make_cases()[case]
    torch.manual_seed(3)
    model_t = spec["build"]()
    make.perturb(model_t)
    model_t.eval()
    model, _, _ = _nnx_setup(case)
    model.eval()
    nnx.update(model, from_torch_state_dict(model_t.state_dict(), model))  # torch tensors
    x_t = torch.randn(spec["x"])
    with torch.no_grad():
        y_t = model_t(x_t).numpy()
    assert_close(model(jnp.asarray(x_t.numpy())), y_t, jnp.float32)
    fresh = spec["build"]()
    back = to_torch_state_dict(model)  # no num_batches_tracked: torch fills it in
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    fresh.eval()
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x_t).numpy(), y_t)


class _TwoLinears(nnx.Module):
    def __init__(self):
        self.enc = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
        self.dec = nnx.Linear(4, 2, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("share", ["variable", "tie"])
def test_nnx_shared_parameters_are_listed_under_each_name(share):
    # NNX files a shared Variable under the first path it meets (dec before enc): the
    # encoder's weight used to be left out, and a pnx.tie'd kernel exported its source under
    # "dec.kernel.source.*" keys.
    m = _TwoLinears()
    if share == "variable":
        m.dec.kernel = m.enc.kernel
    else:
        pnx.tie(m.dec, "kernel", m.enc, "kernel")
    sd = to_torch_state_dict(m)
    assert sorted(sd) == ["dec.bias", "dec.weight", "enc.bias", "enc.weight"]
    np.testing.assert_array_equal(sd["enc.weight"], sd["dec.weight"])
    doubled = {key: 2 * v for key, v in sd.items()}
    nnx.update(m, from_torch_state_dict(doubled, m))
    np.testing.assert_allclose(m.enc.kernel[...], doubled["enc.weight"].T)
    np.testing.assert_allclose(m.dec.kernel[...], doubled["enc.weight"].T)
    np.testing.assert_allclose(m.dec.bias[...], doubled["dec.bias"])
    doubled["dec.weight"] = doubled["dec.weight"] + 1
    with pytest.raises(ValueError, match="dec/kernel and enc/kernel differ.*one shared Variable"):
        from_torch_state_dict(doubled, m)


def test_live_torch_shares_what_an_nnx_model_shares():
    torch = pytest.importorskip("torch")

    class AE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(4, 2)
            self.dec = torch.nn.Linear(4, 2)
            self.dec.weight = self.enc.weight

    torch.manual_seed(0)
    model_t = AE()
    m = _TwoLinears()
    pnx.tie(m.dec, "kernel", m.enc, "kernel")
    nnx.update(m, from_torch_state_dict(model_t.state_dict(), m))
    np.testing.assert_array_equal(m.dec.kernel[...], model_t.enc.weight.detach().numpy().T)
    fresh = AE()
    back = to_torch_state_dict(m)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert fresh.dec.weight is fresh.enc.weight
    np.testing.assert_array_equal(fresh.enc.weight.detach().numpy(), back["enc.weight"])


def test_nnx_ties_torch_cannot_hold_are_refused_and_shared_modules_listed_twice():
    class Net(nnx.Module):
        def __init__(self):
            self.enc = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
            self.layers = nnx.List([nnx.Linear(2, 4, rngs=nnx.Rngs(1))])

    m = Net()
    pnx.tie(m.layers[0], "kernel", m.enc, "kernel", transform=jnp.transpose)
    fix = r"through 'transpose'.*paramx\.nnx\.untie\(model\.layers\[0\], 'kernel'\)"
    with pytest.raises(ValueError, match=fix):
        to_torch_state_dict(m)
    with pytest.raises(ValueError, match=fix):
        from_torch_state_dict({}, m)
    m = _TwoLinears()
    pnx.orthogonal(m.enc)
    pnx.tie(m.dec, "kernel", m.enc, "kernel")
    with pytest.raises(ValueError, match="registered with paramx.nnx whose value is computed"):
        to_torch_state_dict(m)

    # One parametrized module at two paths: torch lists its tensors under both names.
    class Shared(nnx.Module):
        def __init__(self):
            self.a = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
            self.b = self.a

    m = Shared()
    sd = to_torch_state_dict(m)
    assert sorted(sd) == sorted(
        f"{x}.{k}"
        for x in "ab"
        for k in ("bias", "parametrizations.weight.0.base", "parametrizations.weight.original")
    )
    before = np.asarray(m.a.kernel)
    nnx.update(m, from_torch_state_dict(sd, m))
    np.testing.assert_allclose(m.b.kernel, before, atol=1e-6)


def test_stacked_plain_kernels_are_refused():
    # A stack of Dense layers (L, in, out) has a conv kernel's rank; it used to be written
    # as a torch Conv1d weight (out, in, L). Its bias (L, out) gives it away in linen, the
    # layer's own rank in NNX.
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(3)(x), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
    x = jnp.ones((1, 3), jnp.float32)
    params = {"blocks": stack().init(jax.random.key(0), x, None)["params"]}
    with pytest.raises(ValueError, match=r"blocks/Dense_0/kernel \(4, 3, 3\).*stack of 4"):
        to_torch_state_dict(params)
    with pytest.raises(ValueError, match="stack of 4"):
        from_torch_state_dict({}, params)
    for use_bias in (True, False):

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return nnx.Linear(3, 3, use_bias=use_bias, rngs=nnx.Rngs(key))  # noqa: B023

        with pytest.raises(ValueError, match=r"Linear kernel at kernel.*stack of 4 layers"):
            to_torch_state_dict(make(jax.random.split(jax.random.key(0), 4)))
    # A real 1-D conv kernel (width, in, out) with its (out,) bias is still a Conv1d weight.
    conv = {"c": {"kernel": jnp.ones((4, 3, 3)), "bias": jnp.zeros(3)}}
    assert to_torch_state_dict(conv)["c.weight"].shape == (3, 3, 4)
    assert to_torch_state_dict(nnx.Conv(3, 3, 4, rngs=nnx.Rngs(0)))["weight"].shape == (3, 3, 4)


def test_a_plain_tie_is_torchs_shared_parameter_both_ways():
    # torch's state_dict lists a shared weight under each name: the tied key used to be left
    # out on writing (a strict load failed) and have no place on reading.
    from paramx import interop

    k = jax.random.normal(jax.random.key(0), (4, 4), jnp.float32)
    tree = {"a": {"kernel": k, "bias": jnp.zeros(4, jnp.float32)}, "b": {"kernel": k}}
    tree = px.tie(tree, "b/kernel", "a/kernel")
    sd = interop.to_torch_state_dict(tree)
    assert sorted(sd) == ["a.bias", "a.weight", "b.weight"]
    np.testing.assert_array_equal(sd["a.weight"], sd["b.weight"])
    doubled = {key: 2 * v for key, v in sd.items()}
    back = interop.from_torch_state_dict(doubled, tree)
    assert px.ties(back) == {"b/kernel": "a/kernel"}
    np.testing.assert_allclose(px.materialize(back)["b"]["kernel"], 2 * k)
    doubled["b.weight"] = doubled["b.weight"] + 1
    with pytest.raises(ValueError, match="b/kernel is tied to a/kernel.*other values"):
        interop.from_torch_state_dict(doubled, tree)
    # A tie through a transform, or to a computed (parametrized) value, has no torch form.
    through = px.tie(
        {"a": {"kernel": k}, "b": {"kernel": k}}, "b/kernel", "a/kernel", transform=jnp.transpose
    )
    with pytest.raises(ValueError, match="through transpose.*paramx.untie"):
        interop.to_torch_state_dict(through)
    computed = px.tie(
        px.orthogonal({"a": {"kernel": k}, "b": {"kernel": k}}, "a/kernel"), "b/kernel", "a/kernel"
    )
    with pytest.raises(ValueError, match="parametrized tensor at a/kernel"):
        interop.to_torch_state_dict(computed)
