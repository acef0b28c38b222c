"""SOC applied term by term: ``lipschitz.soc_conv`` and the ``SOCConv`` layers (linen, NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close
from flax import nnx
from jax.test_util import check_grads

import paramx as px
import paramx.linen as pxl
import paramx.nnx as pnx
from paramx import lipschitz

CIRCULAR = lipschitz.ConvGeometry(padding="CIRCULAR")
SAME = lipschitz.ConvGeometry(padding="SAME")


def _kernel(cin, cout, k=3, scale=0.3, seed=0, dtype=jnp.float64):
    return (jax.random.normal(jax.random.key(seed), (k, k, cin, cout), jnp.float64) * scale).astype(
        dtype
    )


def _merged(raw, terms):
    """The SOC parametrization's value (the merged kernel) for the raw kernel ``raw``."""
    size = lipschitz.soc_kernel_size(raw.shape[0], terms)
    tree = lipschitz.soc({"k": jnp.zeros((*size, *raw.shape[2:]), raw.dtype)}, "k", terms=terms)
    leaves, treedef = jax.tree.flatten(tree)
    (i,) = [j for j, leaf in enumerate(leaves) if leaf.shape == raw.shape]
    leaves[i] = raw
    return px.materialize(jax.tree.unflatten(treedef, leaves))["k"]


@pytest.mark.parametrize(("cin", "cout"), [(4, 4), (3, 5), (5, 3)])
def test_circular_equals_the_merged_kernel_conv(cin, cout):
    raw = _kernel(cin, cout)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, cin), jnp.float64)
    got = jax.jit(lambda x, k: lipschitz.soc_conv(x, k, terms=6, geometry=CIRCULAR))(x, raw)
    want = lipschitz.conv(x, _merged(raw, 6), CIRCULAR)
    assert_close(got, want, scale=100)


def _operator_norm(f, x, iters=200):
    """Largest singular value of the linear map ``f`` by power iteration on ``fᵀ f``."""
    _, vjp = jax.vjp(f, x)
    v = x / jnp.linalg.norm(x)
    for _ in range(iters):
        w = vjp(f(v))[0]
        v = w / jnp.linalg.norm(w)
    return jnp.linalg.norm(f(v))


def test_same_padding_is_orthogonal_to_the_truncation():
    raw = _kernel(4, 4, scale=0.5)
    x = jax.random.normal(jax.random.key(2), (3, 7, 9, 4), jnp.float64)
    y = lipschitz.soc_conv(x, raw, terms=14, geometry=SAME)
    # L is skew-adjoint under zero padding too: exp(sL) is orthogonal; 14 terms leave < 1e-10.
    norms = jnp.sqrt(jnp.sum(y**2, axis=(1, 2, 3)) / jnp.sum(x**2, axis=(1, 2, 3)))
    assert_close(norms, jnp.ones(3, jnp.float64), scale=1e3)


@pytest.mark.parametrize(("cin", "cout", "strides"), [(3, 6, 1), (6, 3, 1), (4, 4, 2)])
def test_same_padding_is_one_lipschitz(cin, cout, strides):
    raw = _kernel(cin, cout, scale=1.0)
    g = lipschitz.ConvGeometry(padding="SAME", strides=strides)
    x = jax.random.normal(jax.random.key(3), (1, 8, 8, cin), jnp.float64)
    norm = _operator_norm(lambda v: lipschitz.soc_conv(v, raw, terms=4, geometry=g), x)
    assert norm <= 1 + 1e-9
    assert norm > 0.5


def test_a_stride_subsamples_the_stride_one_output_where_flax_does():
    # A strided SAME conv of the merged kernel (11 x 11 for a 3 x 3 raw kernel, 6 terms)
    # starts at row 0 of 9 (stride 2) but at column 1 of 8 (stride 3); SOC's series used to
    # start at 0 on every axis, a pixel off a strided nn.Conv (or soc() on one).
    raw = _kernel(4, 4)
    x = jax.random.normal(jax.random.key(4), (1, 9, 8, 4), jnp.float64)
    full = lipschitz.soc_conv(x, raw, geometry=SAME)
    strided = lipschitz.soc_conv(x, raw, geometry=lipschitz.ConvGeometry(strides=(2, 3)))
    assert strided.shape == (1, 5, 3, 4)
    assert_close(strided, full[:, ::2, 1::3])
    k = jax.random.normal(jax.random.key(5), (11, 11, 4, 4), jnp.float64)
    conv = lambda strides: nn.Conv(4, (11, 11), strides, padding="SAME", use_bias=False)
    one, two = (conv(s).apply({"params": {"kernel": k}}, x) for s in (1, (2, 3)))
    assert_close(two, one[:, ::2, 1::3])


def test_dense_kernel_is_the_matrix_case():
    raw = jax.random.normal(jax.random.key(5), (4, 4), jnp.float64)
    x = jax.random.normal(jax.random.key(6), (3, 4), jnp.float64)
    y = lipschitz.soc_conv(x, raw, terms=20)
    assert_close(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), scale=1e3)


def test_gradients_match_finite_differences():
    raw = _kernel(3, 3, scale=0.4)
    x = jax.random.normal(jax.random.key(7), (1, 5, 5, 3), jnp.float64)
    check_grads(
        lambda x, k: lipschitz.soc_conv(x, k, terms=4, geometry=SAME),
        (x, raw),
        order=1,
        modes=("rev",),
    )


def test_refusals_name_the_fix():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="'SAME' or 'CIRCULAR'.*soc_kernel_size"):
        lipschitz.soc_conv(
            x, jnp.zeros((3, 3, 4, 4)), geometry=lipschitz.ConvGeometry(padding="VALID")
        )
    with pytest.raises(ValueError, match="odd"):
        lipschitz.soc_conv(x, jnp.zeros((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="terms must be at least 2"):
        lipschitz.soc_conv(x, jnp.zeros((3, 3, 4, 4)), terms=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_output_keeps_the_input_dtype(dtype):
    x = jnp.ones((1, 6, 6, 4), dtype)
    assert lipschitz.soc_conv(x, _kernel(4, 4, dtype=jnp.float32)).dtype == dtype


def test_linen_layer():
    layer = pxl.SOCConv(6, (3, 3), terms=5, padding="CIRCULAR")
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 4), jnp.float32)
    variables = layer.init(jax.random.key(9), x)
    params = variables["params"]
    assert params["kernel"].shape == (3, 3, 4, 6) and params["bias"].shape == (6,)
    params = {**params, "bias": jnp.arange(6, dtype=jnp.float32)}
    y = jax.jit(layer.apply)({"params": params}, x)
    want = (
        lipschitz.soc_conv(x, params["kernel"], terms=5, geometry=CIRCULAR)
        + params["bias"][None, None, None]
    )
    assert_close(y, want)
    assert "bias" not in pxl.SOCConv(4, use_bias=False).init(jax.random.key(0), x)["params"]


def test_linen_layer_in_a_scanned_stack():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = nn.scan(
                lambda m, c, _: (m(c), None),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=3,
            )
            return cell(pxl.SOCConv(4, terms=8, use_bias=False), x, None)[0]

    x = jax.random.normal(jax.random.key(10), (2, 6, 6, 4), jnp.float32)
    variables = Stack().init(jax.random.key(11), x)
    y = Stack().apply(variables, x)
    assert_close(jnp.linalg.norm(y), jnp.linalg.norm(x), scale=10)


def test_nnx_layer_equals_the_function_and_trains_under_jit():
    layer = pnx.SOCConv(4, 6, (3, 3), terms=5, padding="CIRCULAR", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(12), (2, 8, 8, 4), jnp.float32)
    want = lipschitz.soc_conv(x, layer.kernel[...], terms=5, geometry=CIRCULAR)
    want = want + layer.bias[...][None, None, None]
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), want)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert grads["kernel"][...].shape == (3, 3, 4, 6)
    with pytest.raises(ValueError, match="'SAME' or 'CIRCULAR'"):
        pnx.SOCConv(4, 4, padding="VALID", rngs=nnx.Rngs(0))


def test_nnx_socconv_takes_lowercase_padding_as_nnx_conv_does():
    layer = pnx.SOCConv(4, 4, padding="same", rngs=nnx.Rngs(0))
    assert layer(jnp.ones((1, 8, 8, 4), jnp.float32)).shape == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="'SAME' or 'CIRCULAR'"):
        pnx.SOCConv(4, 4, padding="valid", rngs=nnx.Rngs(0))
