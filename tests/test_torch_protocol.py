"""The torch protocol: parametrizations declare their torch keys and layouts; the interop reads
only that declaration (paramx._src.integrations.torch's docstring documents the hooks).

A parametrization defined here, with no change to the integration, round-trips through
to_torch_state_dict / from_torch_state_dict; one without the hooks gets the generic rule; a
wrong declaration is refused with its path and hook named; and the integration's source never
names the built-in parametrization classes (checked with ast).
"""

import ast
import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import paramx as px
from paramx.interop import from_torch_state_dict, to_torch_state_dict

SRC = Path(__file__).resolve().parents[1] / "paramx" / "_src"
BUILTIN_MODULES = {
    f"paramx._src.parametrizations.{m}" for m in ("orthogonal", "spectral_norm", "weight_norm")
}
BUILTIN_CLASSES = {"Orthogonal", "SpectralNorm", "WeightNorm"}


# ----- parametrizations defined only here ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GainDirection:
    """w = g * v with a gain g (1, out): two originals, like weight_norm without the norm."""

    torch_legacy_suffixes = ("_gain", "_dir")

    def forward(self, g, v):
        return g * v

    def right_inverse(self, w):
        return jnp.ones((1, w.shape[-1]), w.dtype), w

    def torch_originals(self, link):
        return [
            link.array(name, ("original", i), like_weight=True)
            for i, name in enumerate(link.original_names)
        ]


@dataclasses.dataclass(frozen=True)
class Mask:
    """w * mask with the mask (in, out) as state; torch keeps it as ``<i>.mask_t`` (out, in)
    and a learnable bias-like offset as ``<i>.shift``."""

    def init(self, value, key):
        mask = jnp.arange(value.size, dtype=value.dtype).reshape(value.shape)
        return {"shift": jnp.zeros((1, value.shape[-1]), value.dtype)}, {"mask": mask}

    def forward(self, w, *, params, state):
        return w * state["mask"] + params["shift"]

    def right_inverse(self, w, *, params, state):
        return w, state

    def torch_arrays(self, link):
        link.require_state("the mask")
        return [
            link.array("mask_t", ("state", "mask"), to_flax=np.transpose, to_torch=np.transpose),
            link.array("shift", ("params", "shift")),
        ]


@dataclasses.dataclass(frozen=True)
class Undeclared:
    """Arrays of its own and no torch hooks: the generic rule."""

    def init(self, value, key):
        return {"a": {"b": jnp.ones((1, value.shape[-1]))}}, {"m": jnp.ones(value.shape)}

    def forward(self, w, *, params, state):
        return w * state["m"] + params["a"]["b"]

    def right_inverse(self, w, *, params, state):
        return w, state


def _tree(kernel=None):
    kernel = jnp.arange(6.0).reshape(3, 2) + 1 if kernel is None else kernel
    return {"fc": {"kernel": kernel, "bias": jnp.zeros(2)}}


def _registered(kernel=None):
    tree = px.register_parametrization(_tree(kernel), "fc/kernel", GainDirection())
    return px.register_parametrization(tree, "fc/kernel", Mask())


# ----- a user-defined parametrization round-trips ---------------------------------------------
def test_user_defined_parametrization_round_trips():
    tree = _registered()
    sd = to_torch_state_dict(tree)
    prefix = "fc.parametrizations.weight."
    assert list(sd) == [
        "fc.bias",
        prefix + "original0",
        prefix + "original1",
        prefix + "1.mask_t",
        prefix + "1.shift",
    ]
    node = tree["fc"]["kernel"]
    assert sd[prefix + "original0"].shape == (2, 1)  # g (1, out) in the weight's layout
    np.testing.assert_array_equal(sd[prefix + "original1"], np.asarray(node.originals[1]).T)
    np.testing.assert_array_equal(sd[prefix + "1.mask_t"], np.asarray(node.state["1"]["mask"]).T)

    # Read into a template with other values: every declared array comes from the state_dict.
    sd[prefix + "1.mask_t"] = sd[prefix + "1.mask_t"] * 2
    sd[prefix + "1.shift"] = np.array([[0.5, -0.5]], np.float32)
    back = from_torch_state_dict(sd, _registered(jnp.zeros((3, 2))))
    got = back["fc"]["kernel"]
    np.testing.assert_array_equal(got.state["1"]["mask"], 2 * node.state["1"]["mask"])
    np.testing.assert_array_equal(got.params["1"]["shift"], [[0.5, -0.5]])
    for a, b in zip(got.originals, node.originals):
        np.testing.assert_array_equal(a, b)
    assert to_torch_state_dict(back).keys() == sd.keys()


def test_user_defined_legacy_suffixes():
    tree = px.register_parametrization(_tree(), "fc/kernel", GainDirection())
    sd = to_torch_state_dict(tree, legacy_weight_norm=True)
    assert sorted(sd) == ["fc.bias", "fc.weight_dir", "fc.weight_gain"]
    template = px.register_parametrization(_tree(jnp.zeros((3, 2))), "fc/kernel", GainDirection())
    back = from_torch_state_dict(sd, template)
    np.testing.assert_array_equal(px.materialize(back)["fc"]["kernel"], _tree()["fc"]["kernel"])


# ----- the generic rule -----------------------------------------------------------------------
def test_undeclared_parametrization_gets_the_generic_rule():
    tree = px.register_parametrization(_tree(), "fc/kernel", Undeclared())
    sd = to_torch_state_dict(tree)
    prefix = "fc.parametrizations.weight."
    assert sorted(sd) == ["fc.bias", prefix + "0.a.b", prefix + "0.m", prefix + "original"]
    assert sd[prefix + "original"].shape == (2, 3)  # the original takes the weight's layout
    assert sd[prefix + "0.m"].shape == (3, 2)  # a link's own array is copied as is
    back = from_torch_state_dict(sd, tree)
    want = px.materialize(tree)["fc"]["kernel"]
    np.testing.assert_array_equal(px.materialize(back)["fc"]["kernel"], want)


def test_plain_parametrization_without_hooks():
    positive = px.Parametrization(forward=jnp.exp, right_inverse=jnp.log, name="positive")
    tree = px.register_parametrization(_tree(), "fc/kernel", positive)
    sd = to_torch_state_dict(tree)
    assert sd["fc.parametrizations.weight.original"].shape == (2, 3)
    back = from_torch_state_dict(sd, tree)
    np.testing.assert_allclose(back["fc"]["kernel"].originals[0], tree["fc"]["kernel"].originals[0])


def test_generic_shape_mismatch_names_the_hook():
    tree = px.register_parametrization(_tree(), "fc/kernel", Undeclared())
    sd = to_torch_state_dict(tree)
    sd["fc.parametrizations.weight.0.m"] = sd["fc.parametrizations.weight.0.m"].T
    with pytest.raises(ValueError, match=r"fc/kernel.*Undeclared declares no `torch_arrays`"):
        from_torch_state_dict(sd, tree)


# ----- wrong declarations ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Forgetful(Mask):
    def torch_arrays(self, link):
        t = np.transpose
        return [link.array("mask_t", ("state", "mask"), to_flax=t, to_torch=t)]


@dataclasses.dataclass(frozen=True)
class Raw(Mask):
    def torch_arrays(self, link):
        return [("mask", "shift")]


@dataclasses.dataclass(frozen=True)
class OneWay(Mask):
    def torch_arrays(self, link):
        return [link.array("mask_t", ("state", "mask"), to_flax=np.transpose)]


def test_incomplete_declaration_is_refused():
    tree = px.register_parametrization(_tree(), "fc/kernel", Forgetful())
    with pytest.raises(ValueError, match=r"Forgetful\.torch_arrays .* at fc/kernel .*'shift'"):
        to_torch_state_dict(tree)


def test_declaration_of_the_wrong_type_is_refused():
    tree = px.register_parametrization(_tree(), "fc/kernel", Raw())
    with pytest.raises(TypeError, match=r"Raw\.torch_arrays .* fc/kernel; build each entry"):
        to_torch_state_dict(tree)
    tree = px.register_parametrization(_tree(), "fc/kernel", OneWay())
    with pytest.raises(ValueError, match="give both"):
        to_torch_state_dict(tree)


def test_a_layout_that_does_not_fit_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Counter:
        def init(self, value, key):
            return None, {"count": jnp.zeros(3)}

        def forward(self, w, *, params, state):
            return w

        def right_inverse(self, w, *, params, state):
            return w, state

        def torch_arrays(self, link):
            return [link.array("count", ("state", "count"), like_weight=True)]

    tree = px.register_parametrization(_tree(), "fc/kernel", Counter())
    with pytest.raises(ValueError, match=r"state\['0'\]\['count'\] of the tensor at fc/kernel"):
        to_torch_state_dict(tree)


def test_legacy_suffixes_must_match_the_originals():
    @dataclasses.dataclass(frozen=True)
    class OneSuffix(GainDirection):
        torch_legacy_suffixes = ("_g",)

    tree = px.register_parametrization(_tree(), "fc/kernel", OneSuffix())
    with pytest.raises(ValueError, match="one suffix per original"):
        to_torch_state_dict(tree, legacy_weight_norm=True)


# ----- the built-ins declare; the integration never names them -------------------------------
def test_builtins_declare_the_protocol():
    assert px.WeightNorm.torch_legacy_suffixes == ("_g", "_v")
    assert callable(px.WeightNorm().torch_originals)
    assert callable(px.SpectralNorm().torch_arrays)
    assert callable(px.Orthogonal().torch_arrays)


def _builtin_uses(path: Path) -> list[str]:
    """Imports of the built-in parametrizations, and isinstance checks against them."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name in BUILTIN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in BUILTIN_MODULES:
                out.append(f"from {node.module} import ...")
            out += [a.name for a in node.names if a.name in BUILTIN_CLASSES]
            if node.module == "paramx._src.parametrizations":
                out += [a.name for a in node.names if f"{node.module}.{a.name}" in BUILTIN_MODULES]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            names = {
                n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
                for n in ast.walk(node.args[1])
            }
            out += sorted(names & BUILTIN_CLASSES)
        elif isinstance(node, ast.Name) and node.id in BUILTIN_CLASSES:
            out.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in BUILTIN_CLASSES:
            out.append(node.attr)
    return [f"{path.relative_to(SRC.parent.parent)}:{u}" for u in out]


def test_the_detector_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from paramx._src.parametrizations.weight_norm import WeightNorm\n"
        "import paramx as px\n"
        "def f(p):\n    return isinstance(p, px.SpectralNorm)\n"
    )
    global SRC
    old, SRC = SRC, tmp_path / "a" / "b"
    try:
        found = _builtin_uses(bad)
    finally:
        SRC = old
    assert len(found) >= 3 and any("SpectralNorm" in f for f in found), found


def test_torch_integration_never_names_the_builtins():
    files = sorted((SRC / "integrations" / "torch").rglob("*.py"))
    assert len(files) >= 8
    found = [u for f in files for u in _builtin_uses(f)]
    assert not found, found


def test_integration_modules_never_name_the_builtins():
    # Every integration (optax, serialization, linen, nnx/, torch/) learns what it needs from
    # the parametrization's declarations; paramx.nnx gets its torch-named functions from the
    # tuple of built-ins the parametrizations layer exports, not from names in the integration.
    files = sorted((SRC / "integrations").rglob("*.py"))
    assert {f.parent.name for f in files} >= {"integrations", "nnx", "torch"}
    found = [u for f in files for u in _builtin_uses(f)]
    assert not found, found
