"""paramx.constraints.symmetric: the parametrization added by following docs/design.md's guide."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx import interop


def _kernel(shape=(4, 4), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def test_the_value_is_symmetric_and_registration_keeps_the_symmetric_part():
    k = _kernel()
    tree = px.constraints.symmetric({"kernel": k}, "kernel")
    w = jax.jit(px.materialize)(tree)["kernel"]
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(w, (k + k.T) / 2, rtol=1e-6)


def test_right_inverse_is_exact_on_symmetric_values_and_assignment_projects():
    s = _kernel() + _kernel().T
    tree = px.constraints.symmetric({"w": s}, "w")
    np.testing.assert_array_equal(px.materialize(tree)["w"], s)
    a = _kernel(seed=1)
    assigned = px.materialize(px.assign(tree, "w", a))["w"]
    np.testing.assert_allclose(assigned, (a + a.T) / 2, rtol=1e-6)


def test_only_the_lower_triangle_is_learned():
    tree = px.constraints.symmetric({"w": _kernel()}, "w")
    params, _ = px.split_state(tree)
    grads = jax.grad(lambda p: jnp.sum(px.materialize(p)["w"] * _kernel(seed=2)))(params)
    g = grads["w"].original
    np.testing.assert_array_equal(jnp.triu(g, 1), 0.0)
    assert float(jnp.abs(g[jnp.tril_indices(4)]).min()) > 0


def test_stacks_and_conv_kernels_are_symmetric_per_matrix():
    conv = _kernel((3, 3, 4, 4))
    w = px.materialize(px.constraints.symmetric({"k": conv}, "k"))["k"]
    np.testing.assert_array_equal(w, jnp.swapaxes(w, -1, -2))
    stack = _kernel((5, 4, 4))
    node = px.constraints.symmetric({"k": stack}, "k", batch_axes=1)["k"]
    assert node.batch_shape == (5,)
    np.testing.assert_allclose(
        px.tensor.materialize(node), (stack + jnp.swapaxes(stack, -1, -2)) / 2, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
def test_dtypes_are_kept(dtype):
    k = _kernel(dtype=jnp.float32).astype(dtype)
    w = px.materialize(px.constraints.symmetric({"w": k}, "w"))["w"]
    assert w.dtype == dtype
    np.testing.assert_array_equal(w, w.T)


def test_bad_tensors_are_refused_with_the_path():
    with pytest.raises(ValueError, match=r"square.*\(at fc/kernel\)"):
        px.constraints.symmetric({"fc": {"kernel": jnp.ones((3, 4))}}, "fc/kernel")
    with pytest.raises(TypeError, match=r"floating-point"):
        px.constraints.symmetric({"w": jnp.ones((3, 3), jnp.int32)}, "w")
    tree = px.constraints.symmetric({"w": jnp.eye(3)}, "w")
    with pytest.raises(ValueError, match=r"(?i)shape"):
        px.assign(tree, "w", jnp.eye(4))


def test_nnx_gets_a_symmetric_function_from_the_declaration_alone():
    assert str(inspect.signature(pnx.symmetric)).startswith("(module")
    assert "batch_axes" in inspect.signature(pnx.symmetric).parameters
    layer = pnx.symmetric(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(layer.kernel, layer.kernel.T)
    layer.kernel = _kernel(seed=3)
    np.testing.assert_array_equal(layer.kernel, layer.kernel.T)


def test_torch_state_dict_holds_torchs_upper_triangle_and_round_trips():
    k = _kernel()
    tree = px.constraints.symmetric({"fc": {"kernel": k}}, "fc/kernel")
    sd = interop.to_torch_state_dict(tree)
    original = np.asarray(sd["fc.parametrizations.weight.original"])
    # torch's usual Symmetric reads X.triu() of its (out, in) weight's original.
    np.testing.assert_array_equal(np.tril(original, -1), 0.0)
    torch_value = np.triu(original) + np.triu(original, 1).T
    np.testing.assert_allclose(torch_value.T, px.materialize(tree)["fc"]["kernel"], rtol=1e-6)
    back = interop.from_torch_state_dict(sd, tree)
    np.testing.assert_array_equal(
        px.materialize(back)["fc"]["kernel"], px.materialize(tree)["fc"]["kernel"]
    )


def test_samples_follow_the_gaussian_orthogonal_ensemble():
    s = px.constraints.Symmetric().sample(jax.random.key(0), (4000, 3, 3), jnp.float64)
    np.testing.assert_array_equal(s, jnp.swapaxes(s, -1, -2))
    diag = s[:, jnp.arange(3), jnp.arange(3)].ravel()
    upper = s[:, 0, 1:].ravel()
    # 12,000 and 8,000 draws: the sample variance is within 5% of 1 and 1/2 (about 4 sigma).
    assert abs(float(jnp.var(diag)) - 1.0) < 0.05 and abs(float(jnp.mean(diag))) < 0.05
    assert abs(float(jnp.var(upper)) - 0.5) < 0.025 and abs(float(jnp.mean(upper))) < 0.04
    # Entries above the diagonal are uncorrelated with each other and with the diagonal.
    assert abs(float(jnp.corrcoef(s[:, 0, 1], s[:, 0, 2])[0, 1])) < 0.06
    assert abs(float(jnp.corrcoef(s[:, 0, 1], s[:, 0, 0])[0, 1])) < 0.06


def test_sampler_without_sample_says_what_to_do():
    with pytest.raises(TypeError, match="no `sample"):
        px.sampler(px.WeightNorm())
