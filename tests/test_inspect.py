"""is_parametrized, originals, get_parametrized, summary, repr, transfer."""

import jax.numpy as jnp
import pytest
import toys

import paramx as px


def _tree():
    tree = {"enc": {"kernel": jnp.ones((2, 2), jnp.float32), "bias": jnp.ones(2, jnp.float32)},
            "dec": {"kernel": jnp.ones((2, 3), jnp.float32)}}  # fmt: skip
    tree = px.register_parametrization(tree, "enc/kernel", toys.symmetric)
    tree = px.register_parametrization(tree, "enc/kernel", toys.RunningMax())
    return px.register_parametrization(tree, "enc/bias", toys.Scale(2.0))


def test_is_parametrized():
    tree = _tree()
    assert px.is_parametrized(tree)
    assert px.is_parametrized(tree, "enc/kernel") and px.is_parametrized(tree, ("enc", "bias"))
    assert not px.is_parametrized(tree, "dec/kernel")
    assert px.is_parametrized(tree, lambda p, x: px.path_keys(p)[0] == "enc")
    assert not px.is_parametrized(tree, lambda p, x: px.path_keys(p)[0] == "dec")
    assert not px.is_parametrized({"a": jnp.ones(1)})
    with pytest.raises(ValueError, match="Closest existing paths: 'dec/kernel'"):
        px.is_parametrized(tree, "dec/kernal")


def test_originals_and_node_access():
    tree = _tree()
    (orig,) = px.originals(tree, "enc/kernel")
    assert orig is tree["enc"]["kernel"].original
    node = px.get_parametrized(tree, "enc/kernel")
    assert node.chain_names() == ["symmetric", "RunningMax"]
    with pytest.raises(
        ValueError,
        match="dec/kernel is not parametrized. Parametrized tensors: 'enc/bias', 'enc/kernel'",
    ):
        px.originals(tree, "dec/kernel")


def test_summary_and_repr():
    text = px.summary(_tree())
    lines = text.splitlines()
    assert lines[0].split() == ["path", "chain", "originals", "params", "state"]
    assert "enc/kernel" in lines[2] and "symmetric -> RunningMax" in lines[2]
    assert "1=float32[]" in lines[2]  # state of link 1
    assert "enc/bias" in lines[1] and "0/scale=float32[]" in lines[1]
    assert px.summary({"a": jnp.ones(1)}) == "No parametrized tensors."
    r = repr(_tree()["enc"]["kernel"])
    assert r.startswith("Parametrized(chain=[symmetric, RunningMax], original=float32[2, 2]")
    assert "state={'1': 'float32[]'}" in r


def test_transfer_copies_nodes_to_a_fresh_tree():
    src = _tree()
    fresh = {"enc": {"kernel": jnp.zeros((2, 2), jnp.float32), "bias": jnp.zeros(2, jnp.float32)},
             "dec": {"kernel": jnp.zeros((2, 3), jnp.float32)}}  # fmt: skip
    out = px.transfer_parametrizations_and_params(src, fresh)
    assert out["enc"]["kernel"] is src["enc"]["kernel"]
    assert out["dec"]["kernel"] is fresh["dec"]["kernel"]
    only = px.transfer_parametrizations_and_params(src, fresh, "enc/bias")
    assert px.is_parametrized(only, "enc/bias") and not px.is_parametrized(only, "enc/kernel")
    assert px.transfer_parametrizations_and_params(fresh, src) is src
    wrong = {"enc": {"kernel": jnp.zeros((3, 3), jnp.float32), "bias": jnp.zeros(2, jnp.float32)}}
    with pytest.raises(ValueError, match="the target's tensor is float32\\[3, 3\\]"):
        px.transfer_parametrizations_and_params(src, wrong, "enc/kernel")
    # A tensor the target lacks is created, as torch creates it on the target module (11.16).
    dec = px.register_parametrization(fresh, "dec/kernel", toys.forward_only)
    created = px.transfer_parametrizations_and_params(dec, wrong, "dec/kernel")
    assert created["dec"]["kernel"] is dec["dec"]["kernel"]
    assert "dec" not in wrong  # the input is not modified
