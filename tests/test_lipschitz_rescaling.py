"""AOL and SLL: the rescaled Dense and conv kernels are 1-Lipschitz operators (measured exactly),
the SLL residual block is 1-Lipschitz and equals the paper's form, and the layers train."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close
from flax import nnx

import paramx as px
from paramx._src.integrations.lipschitz_layers import (
    NNXSLLConv,
    SLLConv,
    SLLDense,
    SLLLinear,
    sll_block,
)
from paramx._src.parametrizations import convops
from paramx._src.parametrizations.convops import ConvGeometry
from paramx._src.parametrizations.lipschitz_rescaling import (
    AOL,
    SLL,
    abs_gram,
    aol,
    certified_bound,
    rescaling,
    sll,
)

TOL = 1 + 1e-4
SIZE = (8, 8)


def _kernel(shape, seed=0, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _value(p, w):
    return px.materialize(px.register_parametrization({"w": w}, "w", p))["w"]


GEOMETRIES = (
    ConvGeometry(padding="SAME"),
    ConvGeometry(padding="VALID"),
    ConvGeometry(strides=2, padding="SAME"),
    ConvGeometry(strides=2, padding="CIRCULAR"),
    ConvGeometry(padding=((2, 0), (1, 1)), kernel_dilation=2),
)


@jax.jit
def _conv_norms(kernel):
    """The exact operator norms of ``convops.conv`` on 8x8 inputs, one per geometry of
    ``GEOMETRIES``: the largest singular value of its matrix (the conv of every basis image)."""
    c = kernel.shape[-2]
    n = SIZE[0] * SIZE[1] * c
    basis = jnp.eye(n, dtype=jnp.float32).reshape(n, *SIZE, c)
    norms = []
    for g in GEOMETRIES:
        rows = convops.conv(basis, kernel.astype(jnp.float32), g).reshape(n, -1)
        norms.append(jnp.linalg.svd(rows, compute_uv=False)[0])
    return jnp.stack(norms)


@jax.jit
def _circular_norm(kernel):
    """The exact norm of the circular stride-1 conv on 8x8 inputs (Sedghi et al.)."""
    with jax.numpy_dtype_promotion("standard"):  # convops' FFT mixes float32 and complex64
        return jnp.max(convops.circular_singular_values(kernel, SIZE))


@jax.jit
def _dense_norm(w):
    return jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)[0]


# ----- the rescaled operators are 1-Lipschitz -------------------------------------------------


@pytest.mark.parametrize("p", [AOL(), SLL()], ids=["aol", "sll"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_dense_operator_norm_is_at_most_one(p, shape):
    w = _kernel(shape, scale=3.0)
    assert float(_dense_norm(w)) > 1.5  # the raw kernel is not 1-Lipschitz
    k = _value(p, w)
    norm = float(_dense_norm(k))
    assert norm <= TOL
    bound = float(p.lipschitz_bound(k))
    assert norm <= bound <= TOL


@pytest.mark.parametrize("p", [AOL(), SLL()], ids=["aol", "sll"])
def test_conv_operator_norm_is_at_most_one_for_every_geometry(p):
    w = _kernel((3, 3, 3, 5), seed=1, scale=2.0)
    assert float(_circular_norm(w)) > 1.5  # the raw kernel is not 1-Lipschitz
    k = _value(p, w)
    # circular, stride 1: the exact spectrum by FFT
    assert float(_circular_norm(k)) <= TOL
    # zero padding, strides, dilation, circular with stride: the exact norm of the conv's matrix
    norms = np.asarray(_conv_norms(k))
    assert norms.max() <= TOL, norms
    assert norms.max() <= float(p.lipschitz_bound(k)) <= TOL


def test_certified_bound_bounds_any_kernel():
    w = _kernel((3, 3, 3, 5), seed=2)  # the shapes of the tests above: compiled once
    norm = float(np.max(np.asarray(_conv_norms(w))))
    assert norm <= float(certified_bound(w)) <= 2 * norm
    d = _kernel((6, 4), seed=3)
    assert float(_dense_norm(d)) <= float(AOL().lipschitz_bound(d))


def test_aol_is_sll_with_unit_weights_and_matches_the_formula():
    w = _kernel((6, 4), seed=4)
    a = np.abs(np.asarray(w, np.float64).T @ np.asarray(w, np.float64))
    d = a.sum(axis=1) ** -0.5
    assert_close(AOL().forward(w), np.asarray(w, np.float64) * d[None, :], jnp.float32)
    assert_close(SLL().forward(w, jnp.zeros(4, jnp.float32)), AOL().forward(w), jnp.float32)
    # the conv autocorrelation, from its definition
    k = _kernel((2, 2, 2, 3), seed=5)
    kn = np.asarray(k, np.float64)
    want = np.zeros((3, 3))
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            r = np.zeros((3, 3))
            for y in range(2):
                for x in range(2):
                    if 0 <= y + dy < 2 and 0 <= x + dx < 2:
                        r += kn[y + dy, x + dx].T @ kn[y, x]
            want += np.abs(r)
    assert_close(abs_gram(k), want, jnp.float32)


# ----- right inverse ------------------------------------------------------------------------


@pytest.mark.parametrize("p", [AOL(), SLL()], ids=["aol", "sll"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 4, 4)], ids=str)
def test_right_inverse_is_exact_on_the_image_and_rescales_otherwise(p, shape):
    w = _kernel(shape, seed=6, dtype=jnp.float64)
    v = _value(p, w)
    assert_close(_value(p, v), v, jnp.float64, scale=100)
    # any other value comes back as V / sqrt(rho(|V^T V|))
    rho = float(jnp.max(jnp.linalg.eigvalsh(abs_gram(w))))
    assert_close(_value(p, w), w / np.sqrt(rho), jnp.float64, scale=100)
    # an orthogonal kernel (a degenerate top eigenvalue) is kept
    q = jnp.linalg.qr(_kernel((6, 4), seed=7, dtype=jnp.float64))[0]
    assert_close(_value(p, q), q, jnp.float64, scale=100)


# ----- the SLL block --------------------------------------------------------------------------


def _paper_block(x, w, b, log_q, geometry=None):
    """The paper's form ``x - 2 W T⁻¹ relu(Wᵀx + b)``, T computed here from its definition."""
    q = jnp.exp(log_q)
    t = (abs_gram(w) @ q) / q
    if w.ndim == 2:
        return x - 2 * ((jax.nn.relu(x @ w + b[None, :]) / t[None, :]) @ w.T)
    g = ConvGeometry(input_size=x.shape[1:-1], padding=geometry.padding, strides=geometry.strides)
    h = jax.nn.relu(convops.conv(x, w, g) + b.reshape(1, 1, 1, -1)) / t.reshape(1, 1, 1, -1)
    return x - 2 * convops.conv_transpose(h, w, g)


def _block_inputs(shape, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w = 2 * jax.random.normal(k1, shape, jnp.float32)
    b = jax.random.normal(k2, shape[-1:], jnp.float32)
    log_q = 0.5 * jax.random.normal(k3, shape[-1:], jnp.float32)
    return w, b, log_q


@pytest.mark.parametrize(
    "shape,geometry,xshape",
    [
        ((4, 6), None, (1, 4)),
        ((3, 3, 3, 5), ConvGeometry(padding="SAME"), (1, 6, 6, 3)),
        ((3, 3, 2, 4), ConvGeometry(padding="CIRCULAR", strides=2), (1, 6, 6, 2)),
    ],
    ids=["dense", "conv-same", "conv-circular-stride2"],
)
def test_sll_block_is_one_lipschitz_and_equals_the_paper_form(shape, geometry, xshape):
    w, b, log_q = _block_inputs(shape, seed=8)

    def block(x):
        return sll_block(x, w, b, log_q, geometry)

    @jax.jit
    def check(x):
        jac = jax.jacobian(block)(x).reshape(x.size, x.size)
        sigma = jnp.linalg.svd(jac, compute_uv=False)[0]
        return block(x), _paper_block(x, w, b, log_q, geometry), sigma

    xs = jax.random.normal(jax.random.key(9), (3, *xshape), jnp.float32)
    for x in xs:
        got, want, sigma = check(x)
        assert_close(got, want, jnp.float32, scale=10)
        assert 0.5 < float(sigma) <= TOL  # 1-Lipschitz, and not trivially contracting
    # the identity behind the layers: T^-1 relu(z) = T^-1/2 relu(T^-1/2 z)
    r = rescaling(w, log_q)
    want = w * r.reshape((1,) * (w.ndim - 1) + (-1,))
    assert_close(SLL().forward(w, log_q), want, jnp.float32)


def test_sll_block_bound():
    w = _kernel((5, 3), seed=10, scale=2.0)
    p = SLL()
    k = p.forward(w, jnp.zeros(3))
    assert float(p.block_lipschitz_bound(k)) <= TOL
    assert float(p.block_lipschitz_bound(w)) > 2  # 2 |w|^2 - 1 for a raw kernel


# ----- edge cases, transforms, dtypes -----------------------------------------------------------


@jax.jit
def _values_and_grads(w):
    """AOL's and SLL's values and gradients (of a loss that is not constant at zero)."""

    def loss(w, log_q, p):
        k = p.forward(w) if log_q is None else p.forward(w, log_q)
        return jnp.sum(k**2 + k)

    lq = jnp.zeros(w.shape[-1:], w.dtype)
    return (
        (AOL().forward(w), jax.grad(loss)(w, None, AOL())),
        (SLL().forward(w, lq), jax.grad(loss, argnums=(0, 1))(w, lq, SLL())),
    )


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 2, 4)], ids=str)
def test_zero_kernels_give_finite_values_and_gradients(shape):
    for value, grads in _values_and_grads(jnp.zeros(shape, jnp.float32)):
        assert not np.any(np.asarray(value))
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
        assert np.any(np.asarray(leaves[0]))  # a zero kernel can still leave zero
    # a zero column among others
    w = _kernel(shape, seed=11).at[..., 0].set(0)
    for value, grads in _values_and_grads(w):
        assert not np.any(np.asarray(value[..., 0]))
        assert np.all(np.isfinite(np.asarray(value)))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


def test_jit_vmap_grad_on_a_stack():
    register = sll  # two originals, both stacked; AOL's stacks run in the conformance suite
    stack = _kernel((3, 3, 3, 4, 4), seed=12, scale=2.0)
    tree = register({"conv": {"kernel": stack}}, "conv/kernel", batch_axes=1)
    value = jax.jit(px.materialize)(tree)["conv"]["kernel"]
    assert value.shape == stack.shape
    assert all(float(_circular_norm(v)) <= TOL for v in value)
    single = register({"k": stack[1]}, "k")
    assert_close(value[1], px.materialize(single)["k"], jnp.float32)
    params, state = px.split_state(tree)
    g = jax.jit(jax.grad(lambda t: jnp.sum(px.materialize(t, state)["conv"]["kernel"])))(params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("p", [AOL(), SLL()], ids=["aol", "sll"])
def test_bfloat16_runs(p):
    w = _kernel((3, 3, 4, 4), seed=13, dtype=jnp.bfloat16)
    tree = px.register_parametrization({"w": w}, "w", p)
    k = jax.jit(px.materialize)(tree)["w"]
    assert k.dtype == jnp.bfloat16
    assert [o.dtype for o in tree["w"].originals] == [jnp.bfloat16] * len(tree["w"].originals)
    assert float(_circular_norm(k)) <= 1.02
    assert float(p.lipschitz_bound(k)) <= 1.02


def test_registration_on_plain_inits_in_linen_and_nnx():
    from paramx._src.integrations.nnx.wrappers import torch_function

    x = jnp.ones((1, 8, 8, 3), jnp.float32)
    layer = px.linen.Parametrize(nn.Conv(5, (3, 3), use_bias=False), {"kernel": AOL()})
    variables = layer.init(jax.random.key(0), x)
    k = px.materialize(variables["params"])["kernel"]
    assert float(jnp.max(_conv_norms(k))) <= TOL
    assert layer.apply(variables, x).shape == (1, 8, 8, 5)
    sll_fn = torch_function(SLL)  # paramx.nnx.sll
    conv = sll_fn(nnx.Conv(3, 5, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
    assert float(jnp.max(_conv_norms(conv.kernel[...]))) <= TOL
    assert conv(x).shape == (1, 8, 8, 5)


# ----- errors and options ---------------------------------------------------------------------


@pytest.mark.parametrize("register", [aol, sll], ids=["aol", "sll"])
def test_errors_name_the_path_and_say_what_to_do(register):
    with pytest.raises(ValueError, match=r"(?s)Dense kernel.*conv/kernel"):
        register({"conv": {"kernel": jnp.ones(3)}}, "conv/kernel")
    with pytest.raises(TypeError, match=r"(?s)complex.*conv/kernel"):
        register({"conv": {"kernel": jnp.ones((2, 2), jnp.complex64)}}, "conv/kernel")
    with pytest.raises(TypeError, match=r"(?s)float.*conv/kernel"):
        register({"conv": {"kernel": jnp.ones((2, 2), jnp.int32)}}, "conv/kernel")
    with pytest.raises(ValueError, match=r"(?s)batch_axes.*conv/kernel"):
        register({"conv": {"kernel": jnp.ones((2, 2, 2, 2, 2, 2))}}, "conv/kernel")


def test_sll_refuses_weights_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"log q must have shape \(3,\)"):
        SLL().forward(jnp.ones((2, 3)), jnp.zeros(2))


@pytest.mark.parametrize("cls", [AOL, SLL])
def test_options_are_validated(cls):
    with pytest.raises(TypeError, match="geometry must be a paramx.lipschitz.ConvGeometry"):
        cls(geometry="SAME")
    with pytest.raises(ValueError, match="REFLECT"):
        cls(geometry=ConvGeometry(padding="REFLECT"))
    with pytest.raises(TypeError, match="name must be a str"):
        cls(name=1)
    g = ConvGeometry(input_size=(8, 8), strides=2)
    assert cls(g) == cls(g) and cls(g).geometry is g


def test_layers_refuse_reflect_padding_and_unbatched_conv_inputs():
    with pytest.raises(ValueError, match="REFLECT"):
        NNXSLLConv(2, 3, (3, 3), padding="REFLECT", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="REFLECT"):
        SLLConv(3, (3, 3), padding="REFLECT").init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    block = NNXSLLConv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch axis"):
        block(jnp.ones((4, 4, 2), jnp.float32))


# ----- the layers train ---------------------------------------------------------------------


def _data(xshape, seed=14):
    x = jax.random.normal(jax.random.key(seed), xshape, jnp.float32)
    return x, jnp.tanh(2 * x[..., ::-1])


def test_linen_block_trains():
    x, y = _data((4, 6, 6, 2))
    block = SLLConv(4, (3, 3), padding="CIRCULAR")
    params = block.init(jax.random.key(0), x)["params"]
    tx = optax.adam(3e-2)

    def loss(p):
        return jnp.mean((block.apply({"params": p}, x) - y) ** 2)

    @jax.jit
    def step(carry):
        p, s = carry
        g = jax.grad(loss)(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
    first = float(loss(params))
    for _ in range(8):
        params, state = step((params, state))
    assert float(loss(params)) < 0.95 * first
    # still 1-Lipschitz after training: the rescaled kernel has norm <= 1
    k = SLL().forward(params["kernel"], params["log_q"])
    assert float(SLL().lipschitz_bound(k)) <= TOL
    # the Dense block's parameters
    dense = SLLDense(8).init(jax.random.key(0), x[:, 0, 0])["params"]
    assert jax.tree.map(jnp.shape, dense) == {"kernel": (2, 8), "bias": (8,), "log_q": (8,)}


def test_nnx_block_trains():
    x, y = _data((16, 4))
    model = SLLLinear(4, 8, rngs=nnx.Rngs(0))
    with jax.numpy_dtype_promotion("standard"):
        opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss(m):
            return jnp.mean((m(x) - y) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        with jax.numpy_dtype_promotion("standard"):
            opt.update(model, grads)
        return value

    first = float(step(model, opt))
    for _ in range(8):
        last = float(step(model, opt))
    assert last < 0.95 * first
    conv = NNXSLLConv(2, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
    assert conv.kernel.shape == (3, 3, 2, 4)
    assert conv(jnp.ones((1, 5, 5, 2), jnp.float32)).shape == (1, 5, 5, 2)
