"""conv_spectral_norm: a conv kernel divided by the operator norm of its convolution.

The reference is the exact norm of the conv's matrix, built by differentiating
``convops.conv`` (8x8 inputs, a few channels: a 256 x 256 matrix) and read by SVD.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import paramx as px
from paramx._src.parametrizations import convops
from paramx._src.parametrizations.conv_spectral_norm import (
    ConvSpectralNorm,
    conv_spectral_norm,
    gram_bound,
    operator_norm,
)
from paramx._src.parametrizations.convops import ConvGeometry

N = 8
CIRC = ConvGeometry(input_size=(N, N), padding="CIRCULAR")
SAME = ConvGeometry(input_size=(N, N))

# (name, geometry, kernel shape): stride 2, dilation 2, VALID, SAME, CIRCULAR, explicit
# pairs, REFLECT, in != out, a stride that does not divide the size.
GEOMETRIES = [
    ("circular-s2-in<out", ConvGeometry((N, N), strides=2, padding="CIRCULAR"), (3, 3, 3, 6)),
    (
        "circular-d2-in>out",
        ConvGeometry((N, N), padding="CIRCULAR", kernel_dilation=2),
        (3, 3, 6, 3),
    ),
    ("valid-d2", ConvGeometry((N, N), padding="VALID", kernel_dilation=2), (3, 3, 4, 4)),
    ("pairs-s2", ConvGeometry((N, N), strides=2, padding=((2, 0), (1, 3))), (3, 3, 3, 6)),
    ("reflect", ConvGeometry((N, N), padding="REFLECT"), (3, 3, 4, 4)),
    ("circular-n9-s2", ConvGeometry((9, 9), strides=2, padding="CIRCULAR"), (3, 3, 4, 4)),
]


@functools.partial(jax.jit, static_argnums=1)
def exact_norm(kernel, geometry):
    """The norm of the conv's matrix (the conv of every basis input at once), exactly."""
    shape = (*geometry.input_size, kernel.shape[-2])
    size = int(np.prod(shape))
    basis = jnp.eye(size, dtype=kernel.dtype).reshape(size, *shape)
    matrix = convops.conv(basis, kernel, geometry).reshape(size, -1)
    gram = jnp.matmul(matrix, matrix.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(gram)))


def kernel_for(shape, dtype=jnp.float32, seed=0):
    return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) / 3).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def measure_all(k, geometry, power):
    """Every measurement of one kernel, compiled once per geometry."""
    out = {
        "exact": exact_norm(k, geometry),
        "gram": gram_bound(k, geometry),
        "reshaped": operator_norm(k, geometry, method="reshaped"),
    }
    if power:  # power iteration on the conv and its adjoint (conv_transpose)
        out["power"] = operator_norm(k, geometry, iterations=300)
    if geometry.is_circular():
        out["fft"] = operator_norm(k, geometry, method="fft")
        out["gram2"] = gram_bound(k, geometry, iterations=2)
        out["gram4"] = gram_bound(k, geometry, iterations=4)
    if geometry.padding != "REFLECT":  # the bound for every input size: no input_size needed
        free = ConvGeometry(strides=geometry.strides, padding=geometry.padding)
        out["free"] = gram_bound(k, free, iterations=4)
    return out


@pytest.mark.parametrize("name,geometry,shape", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_measurements_against_the_exact_norm(name, geometry, shape):
    power = name in ("pairs-s2", "circular-s2-in<out")
    m = measure_all(kernel_for(shape, jnp.float64), geometry, power)
    m = {key: float(v) for key, v in m.items()}
    exact = m["exact"]
    assert m["gram"] >= exact * (1 - 1e-9)
    # Tight for circular padding whose strides divide the size; within the zero-vs-circular
    # gap (boundary effects of an 8x8 input) otherwise; REFLECT carries a sqrt(copies) factor.
    limit = {"valid-d2": 1.5, "reflect": 2.0, "circular-n9-s2": 1.4}
    assert m["gram"] <= exact * limit.get(name, 1.25)
    if name.startswith("circular") and name != "circular-n9-s2":
        assert m["gram"] == pytest.approx(exact, rel=1e-9)
        assert m["fft"] == pytest.approx(exact, rel=1e-9)
        # Gram iteration converges fast: the bound falls with each step, to the norm.
        assert m["gram2"] >= m["gram4"] >= m["gram"] >= exact * (1 - 1e-12)
    if "free" in m:
        assert m["free"] >= exact * (1 - 1e-9)
    if power:
        assert m["power"] <= exact * (1 + 1e-9)
        assert m["power"] == pytest.approx(exact, rel=1e-3)
    # torch's spectral_norm divides by the reshaped kernel's sigma: not the conv's norm.
    assert m["reshaped"] < exact


@jax.jit
def _fft_gram(k):
    fft = px.materialize(conv_spectral_norm({"k": k}, "k", geometry=CIRC, method="fft"))["k"]
    gram_c = px.materialize(conv_spectral_norm({"k": k}, "k", geometry=CIRC, method="gram"))["k"]
    gram_s = px.materialize(conv_spectral_norm({"k": k}, "k", geometry=SAME, method="gram"))["k"]
    return fft, gram_c, gram_s


def test_fft_and_gram_normalize_to_at_most_one():
    fft, gram_c, gram_s = _fft_gram(kernel_for((3, 3, 4, 6), seed=1))
    assert float(exact_norm(fft, CIRC)) == pytest.approx(1.0, abs=1e-5)
    # Tight on circular convs, less the bound's rounding margin (gram_bound: about 1e-5 here).
    assert 1 - 1e-4 <= float(exact_norm(gram_c, CIRC)) <= 1 + 1e-4
    same = float(exact_norm(gram_s, SAME))
    assert 0.85 <= same <= 1 + 1e-4  # a certified bound: the true norm is below it


def test_power_method_converges_under_training_updates():
    geometry = SAME
    k = kernel_for((3, 3, 4, 6), seed=1)
    tree = conv_spectral_norm({"conv": {"kernel": k}}, "conv/kernel", geometry=geometry)
    params, state = px.split_state(tree)
    exact = float(exact_norm(k, geometry))

    @jax.jit
    def updates(state, n):
        return jax.lax.fori_loop(
            0, n, lambda _, s: px.materialize(params, s, update_state=True)[1], state
        )

    # After the 15 warm-up iterations the estimate is within a few percent, from below.
    w0 = px.materialize(params, state)["conv"]["kernel"]
    assert 1.0 <= float(exact_norm(w0, geometry)) <= 1.05
    state = updates(state, 200)
    w = px.materialize(params, state)["conv"]["kernel"]
    assert float(exact_norm(w, geometry)) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(w, k / exact, rtol=1e-4)
    # Evaluation mode does not move the state.
    again = px.materialize(params, state)["conv"]["kernel"]
    np.testing.assert_array_equal(again, w)
    # lipschitz_bound of "power" is the certified Gram bound, above the true norm.
    p = tree["conv"]["kernel"].chain[0]
    assert float(p.lipschitz_bound(w)) >= float(exact_norm(w, geometry))


def test_state_is_the_input_shaped_iterate_and_not_differentiated():
    k = kernel_for((3, 3, 4, 6))
    tree = conv_spectral_norm({"conv": {"kernel": k}}, "conv/kernel", geometry=SAME)
    node = tree["conv"]["kernel"]
    assert node.state["0"]["u"].shape == (1, N, N, 4)
    assert float(jnp.linalg.norm(node.state["0"]["u"])) == pytest.approx(1.0, abs=1e-6)
    params, state = px.split_state(tree)

    @jax.jit
    def loss_and_grad(params, state):
        def loss(p):
            plain, new = px.materialize(p, state, update_state=True)
            return jnp.sum(plain["conv"]["kernel"] ** 2), new

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, new_state), grads = loss_and_grad(params, state)
    g = grads["conv"]["kernel"].original
    assert g.shape == k.shape and bool(jnp.all(jnp.isfinite(g)))
    assert not np.array_equal(
        new_state["conv"]["kernel"]["0"]["u"], state["conv"]["kernel"]["0"]["u"]
    )


def test_gradients_against_finite_differences():
    k = kernel_for((3, 3, 2, 3), jnp.float64)
    g = ConvGeometry((5, 5), padding="CIRCULAR")
    for method in ("fft", "gram"):
        p = ConvSpectralNorm(g, method=method)
        f = jax.jit(lambda w, p=p: p.forward(w, params=None, state=None))
        check_grads(f, (k,), 1, ("rev",))
    # power: the gradient of sigma = ||conv(u)|| with u fixed, through the kernel.
    tree = conv_spectral_norm({"k": k}, "k", geometry=ConvGeometry((5, 5)))
    params, state = px.split_state(tree)
    f = jax.jit(lambda w: px.materialize({"k": params["k"].replace(originals=(w,))}, state)["k"])
    check_grads(f, (k,), 1, ("rev",))


@functools.partial(jax.jit, static_argnums=1)
def _zero_case(z, method):
    tree = conv_spectral_norm({"k": z}, "k", geometry=CIRC, method=method)
    params, state = px.split_state(tree)
    plain, state = px.materialize(params, state, update_state=True)
    grads = jax.grad(lambda p: jnp.sum(px.materialize(p, state)["k"]))(params)
    return plain["k"], grads["k"].original


def test_zero_kernel_stays_zero_with_finite_gradients():
    z = jnp.zeros((3, 3, 4, 4))
    for method in ("power", "fft", "gram"):
        value, grad = _zero_case(z, method)
        assert float(jnp.max(jnp.abs(value))) == 0.0
        assert bool(jnp.all(jnp.isfinite(grad))), method


def test_stacks_vmap_and_dtypes():
    ks = jnp.stack([kernel_for((3, 3, 4, 4), seed=0), 3 * kernel_for((3, 3, 4, 4), seed=1)])
    tree = conv_spectral_norm({"k": ks}, "k", geometry=CIRC, method="fft", batch_axes=1)
    w = jax.jit(px.materialize)(tree)["k"]
    norms = jax.vmap(lambda x: operator_norm(x, CIRC, method="fft"))(w)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # bfloat16 kernels are normalized in float32 and keep their dtype
    tree = conv_spectral_norm({"k": ks[0].astype(jnp.bfloat16)}, "k", geometry=CIRC, method="gram")
    w = px.materialize(tree)["k"]
    assert w.dtype == jnp.bfloat16
    assert float(operator_norm(w.astype(jnp.float32), CIRC, method="fft")) == pytest.approx(
        1, abs=2e-2
    )


def test_axis_name_averages_the_iterate_across_replicas():
    k = kernel_for((3, 3, 4, 4))
    p = ConvSpectralNorm(SAME, axis_name="data")
    us = jax.random.normal(jax.random.key(3), (2, 1, N, N, 4))
    new = jax.vmap(lambda u: p.update_state(k, params=None, state={"u": u}), axis_name="data")(us)
    np.testing.assert_allclose(new["u"][0], new["u"][1], atol=1e-6)


def test_errors_name_the_path_and_what_to_do():
    tree = {"conv": {"kernel": kernel_for((3, 3, 4, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"(?s)input_size.*gram.*conv/kernel"):
        conv_spectral_norm(tree, "conv/kernel", geometry=None)
    with pytest.raises(ValueError, match=r"(?s)CIRCULAR.*'power'.*'gram'"):
        conv_spectral_norm(tree, "conv/kernel", geometry=SAME, method="fft")
    with pytest.raises(ValueError, match=r"(?s)Dense kernel.*conv/bias"):
        conv_spectral_norm(tree, "conv/bias", geometry=SAME)
    with pytest.raises(ValueError, match=r"(?s)input_size.*1 entries.*conv/kernel"):
        conv_spectral_norm(tree, "conv/kernel", geometry=ConvGeometry(input_size=(8,)))
    with pytest.raises(TypeError, match="conv/kernel"):
        conv_spectral_norm(
            {"conv": {"kernel": jnp.ones((3, 3, 2, 2), jnp.int32)}}, "conv/kernel", geometry=SAME
        )
    with pytest.raises(ValueError, match="REFLECT"):
        gram_bound(kernel_for((3, 3, 2, 2)), ConvGeometry(padding="REFLECT"))


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"method": "exact"}, ValueError),
        ({"n_power_iterations": 0}, ValueError),
        ({"n_power_iterations": 1.5}, TypeError),
        ({"gram_iterations": 0}, ValueError),
        ({"eps": 0.0}, ValueError),
        ({"geometry": "SAME"}, TypeError),
        ({"axis_name": ["a"]}, TypeError),
        ({"geometry": SAME, "method": "fft"}, ValueError),
    ],
)
def test_options_are_validated_at_construction(kwargs, error):
    with pytest.raises(error):
        ConvSpectralNorm(**kwargs)


def test_operator_norm_options():
    k = kernel_for((3, 3, 2, 2))
    with pytest.raises(ValueError, match="method"):
        operator_norm(k, CIRC, method="svd")
    with pytest.raises(ValueError, match="iterations"):
        operator_norm(k, CIRC, iterations=-1)
    with pytest.raises(ValueError, match="'power'"):
        operator_norm(k, SAME, method="fft")
    dense = kernel_for((5, 3))
    assert float(operator_norm(dense)) == pytest.approx(float(jnp.linalg.norm(dense, 2)), rel=1e-5)


def test_dense_kernels_need_no_geometry():
    dense = kernel_for((5, 3))
    for method in ("gram", "fft"):
        w = px.materialize(conv_spectral_norm({"w": dense}, "w", geometry=None, method=method))["w"]
        assert 1 - 1e-3 <= float(jnp.linalg.norm(w, 2)) <= 1 + 1e-5, method
