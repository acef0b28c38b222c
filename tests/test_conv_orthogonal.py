"""Orthogonal convolutions: SOC (skew-orthogonal conv) and the Cayley conv in the Fourier domain.

Correctness is measured on the operator the declared Flax conv applies: the exact spectrum by
FFT for circular padding (``circular_singular_values``), a converged power iteration on the
actual conv and its adjoint otherwise; float32 kernels, measurements in float64.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import paramx as px
from paramx._src.parametrizations.conv_orthogonal import (
    BlockOrthogonalConv,
    CayleyConv,
    SkewOrthogonalConv,
    _adjoint,
    _compose,
    _compose_plain,
    bcop,
    cayley_conv,
    soc,
    soc_kernel_size,
)
from paramx._src.parametrizations.convops import (
    ConvGeometry,
    circular_singular_values,
    conv,
    conv_transpose,
)

CIRC = ConvGeometry(input_size=(8, 8), padding="CIRCULAR")


def _kernel(key, shape, scale=0.3, dtype=jnp.float32):
    """Standard normal entries times ``scale`` (numpy's generator: no compile per shape)."""
    x = np.random.default_rng(key).standard_normal(shape).astype(np.float32) * scale
    return jnp.asarray(x).astype(dtype)


def _value(tree):
    return px.materialize(tree)["conv"]["kernel"]


def _with_raw(tree, raw):
    node = tree["conv"]["kernel"]
    return {"conv": {"kernel": node.replace(originals=(raw,))}}


# Registration and materialization as one compiled program per shape (eager dispatch of the
# many small ops would dominate the file's time).
@functools.partial(jax.jit, static_argnames=("terms", "batch_axes"))
def _soc_value(kernel, terms=6, batch_axes=0):
    tree = soc({"conv": {"kernel": kernel}}, "conv/kernel", terms=terms, batch_axes=batch_axes)
    return _value(tree)


@functools.partial(jax.jit, static_argnames=("batch_axes",))
def _bcop_value(kernel, batch_axes=0):
    return _value(bcop({"conv": {"kernel": kernel}}, "conv/kernel", batch_axes=batch_axes))


@jax.jit
def _cayley_value(kernel, raw):
    """The Cayley conv registered on ``kernel`` (the base), with the raw kernel ``raw``."""
    return _value(_with_raw(cayley_conv({"conv": {"kernel": kernel}}, "conv/kernel"), raw))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _power_norm(kernel, geometry, iters=300):
    """The operator norm of ``conv(., kernel, geometry)`` by power iteration on its normal
    operator, in float64 (a measurement, from below; converged on these small sizes)."""
    k = kernel.astype(jnp.float64)
    shape = (1, *geometry.input_size, k.shape[-2])
    x = jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float64) * 0.7).reshape(shape)

    def body(_, x):
        y = conv_transpose(conv(x, k, geometry), k, geometry)
        return y / jnp.linalg.norm(y)

    x = jax.lax.fori_loop(0, iters, body, x / jnp.linalg.norm(x))
    return jnp.linalg.norm(conv(x, k, geometry))


def _circular_sv(kernel, size=(8, 8)):
    """All singular values of the circular conv, in numpy float64 (taps wrap around; the
    offset of Flax's padding is a phase, which leaves them unchanged)."""
    k = np.asarray(np.asarray(kernel, np.float32), np.float64)
    grid = np.zeros((*size, *k.shape[-2:]))
    for t in np.ndindex(*k.shape[:2]):
        grid[t[0] % size[0], t[1] % size[1]] += k[t]
    return np.linalg.svd(np.fft.fft2(grid, axes=(0, 1)), compute_uv=False)


def _circular_norm(kernel):
    return float(_circular_sv(kernel).max())


def test_the_measurement_agrees_with_convops():
    k = _kernel(0, (3, 3, 4, 6), 1.0)
    with jax.numpy_dtype_promotion("standard"):  # convops promotes float32 to complex64
        expected = jax.jit(circular_singular_values, static_argnums=1)(k, (8, 8))
    np.testing.assert_allclose(
        np.sort(_circular_sv(k).ravel()),
        np.sort(np.asarray(expected).ravel()),
        rtol=1e-5,
    )


def _assert_norms_kept(w, channels):
    """||conv(x)|| = ||x|| to 1e-5 relative on random inputs (circular, stride 1)."""
    x = _kernel(5, (3, 8, 8, channels), 1.0, jnp.float64)
    y = conv(x, w.astype(jnp.float64), CIRC)
    ratio = jnp.sqrt(jnp.sum(y**2, axis=(1, 2, 3)) / jnp.sum(x**2, axis=(1, 2, 3)))
    np.testing.assert_allclose(ratio, 1, rtol=1e-5)


# ----- the kernel algebra ------------------------------------------------------------------------
def test_compose_and_adjoint_are_the_conv_algebra():
    a, b = (_kernel(i, s, 1.0, jnp.float64) for i, s in ((0, (3, 3, 4, 4)), (1, (5, 5, 4, 4))))
    x, y = (_kernel(i, (1, 12, 12, 4), 1.0, jnp.float64) for i in (2, 3))
    g = ConvGeometry(padding="CIRCULAR")

    @jax.jit
    def gaps(a, b, x, y):
        composed = conv(conv(x, a, g), b, g) - conv(x, _compose(a, b), g)
        adjoint = jnp.vdot(conv(x, a, g), y) - jnp.vdot(x, conv(y, _adjoint(a), g))
        return jnp.max(jnp.abs(composed)), adjoint / jnp.linalg.norm(x)

    composed, adjoint = gaps(a, b, x, y)
    assert float(composed) < 1e-10 and abs(float(adjoint)) < 1e-10


@pytest.mark.parametrize(
    "sa, sb",
    [((3, 3), (3, 3)), ((5, 3), (3, 1)), ((7,), (3,)), ((1, 1), (5, 5)), ((3, 1, 3), (1, 3, 3))],
)
def test_compose_derivatives_equal_autodiff(sa, sb):
    """The custom JVP (each tangent in the convolution's input slot), in forward and reverse
    mode, against autodiff of the same convolution (``_compose_plain``), for spatial ranks
    1-3, unequal sizes and channels (i, m, j) = (3, 4, 5)."""
    a = _kernel(10, (*sa, 3, 4), 1.0, jnp.float64)
    b = _kernel(11, (*sb, 4, 5), 1.0, jnp.float64)
    da, db = _kernel(14, a.shape, 1.0, jnp.float64), _kernel(15, b.shape, 1.0, jnp.float64)
    out, tangent = jax.jvp(_compose, (a, b), (da, db))
    ref, ref_tangent = jax.jvp(_compose_plain, (a, b), (da, db))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-12, atol=1e-12)
    cbar = _kernel(12, out.shape, 1.0, jnp.float64)
    got, want = jax.vjp(_compose, a, b)[1](cbar), jax.vjp(_compose_plain, a, b)[1](cbar)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    check_grads(_compose, (a, b), order=2, modes=("fwd", "rev"))


def test_compose_backward_has_no_filter_gradient_convolution():
    """Autodiff of ``b`` takes the convolution's filter gradient (a conv that reads the
    input's feature axis as its batch: XLA:CPU ran SOC's bound 20x slower than its forward);
    with the custom JVP every convolution of the gradient keeps the forward's batch and
    feature axes."""
    a = _kernel(13, (3, 3, 4, 4), 1.0, jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(_compose(_compose(a, a), a) ** 2)))(a)

    def convs(j):
        for e in j.eqns:
            if e.primitive.name == "conv_general_dilated":
                yield e.params["dimension_numbers"]
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from convs(sub)

    found = list(convs(jaxpr.jaxpr))
    assert len(found) == 2 + 2 * 2  # two forwards, two transposed tangent terms each
    for dn in found:
        assert dn.lhs_spec == dn.out_spec == (0, 3, 1, 2)


# ----- SOC -------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [(4, 4), (6, 4)])
def test_soc_is_contractive_at_every_frequency(channels):
    size = soc_kernel_size(3, terms=6)
    assert size == (11, 11)
    k = _kernel(0, (*size, *channels))
    w = _soc_value(k)
    assert w.shape == (11, 11, *channels) and w.dtype == jnp.float32
    register = lambda k: soc({"conv": {"kernel": k}}, "conv/kernel")
    tree = jax.eval_shape(register, jax.ShapeDtypeStruct(k.shape, k.dtype))
    assert px.originals(tree, "conv/kernel")[0].shape == (3, 3, *channels)
    s = _circular_sv(w)
    # 1-Lipschitz to 1e-4; orthogonal to the truncation (2 tau = 3.2e-3 for terms=6)
    assert s.max() <= 1 + 1e-4
    assert s.min() >= 1 - 2 * SkewOrthogonalConv().truncation - 1e-5
    if channels == (4, 4):
        return
    # zero padding, strides and dilation: crops and subsamplings of a contraction
    for g in (
        ConvGeometry(input_size=(8, 8), strides=2, padding="SAME", kernel_dilation=2),
        ConvGeometry(input_size=(8, 8), strides=(1, 2), padding=((5, 5), (4, 6))),
    ):
        measured = float(_power_norm(w, g))
        assert 0.9 < measured <= 1 + 1e-4
        assert float(SkewOrthogonalConv(geometry=g).lipschitz_bound(w)) >= measured


@pytest.mark.parametrize("channels", [(4, 4), (4, 6)])
def test_soc_with_enough_terms_preserves_norms(channels):
    w = _soc_value(_kernel(1, (*soc_kernel_size(3, terms=10), *channels)), terms=10)
    assert w.shape == (19, 19, *channels)
    _assert_norms_kept(w, channels[0])  # orthogonal (4 -> 4), an isometry (4 -> 6)


def test_soc_small_raw_kernels_are_near_the_identity_and_large_ones_are_rescaled():
    p = SkewOrthogonalConv(terms=4)
    forward = jax.jit(p.forward)
    eye = jnp.zeros((7, 7, 4, 4)).at[3, 3].set(jnp.eye(4)) / (1 + p.truncation)
    np.testing.assert_allclose(forward(jnp.zeros((3, 3, 4, 4))), eye, atol=1e-7)
    assert _circular_norm(forward(_kernel(2, (3, 3, 4, 4), 100.0))) <= 1 + 1e-4


def test_soc_of_a_large_raw_kernel_with_many_terms_is_finite():
    # The powers L^j were taken before the rescaling: with ||L|| about 100 and 20 terms,
    # L^19 overflowed float32 and the value, soc_conv's output and the gradients were NaN.
    from paramx._src.parametrizations.conv_orthogonal import soc_conv

    raw = _kernel(4, (3, 3, 16, 16), 20.0)
    w = jax.jit(SkewOrthogonalConv(terms=20).forward)(raw)
    assert bool(jnp.isfinite(w).all())
    assert _circular_norm(w) <= 1 + 1e-4
    x = _kernel(5, (1, 8, 8, 16), 1.0)
    y = soc_conv(x, raw, terms=20)
    assert bool(jnp.isfinite(y).all())
    np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-4)
    g = jax.grad(lambda k: jnp.sum(soc_conv(x, k, terms=20)))(raw)
    assert bool(jnp.isfinite(g).all())


def test_soc_dense_kernels_are_orthogonal_matrices():
    forward = jax.jit(SkewOrthogonalConv(terms=12).forward)
    for shape in [(3, 5), (5, 3)]:
        w = np.asarray(forward(_kernel(3, shape, 1.0)), np.float64)
        gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
        np.testing.assert_allclose(gram, np.eye(3), atol=1e-5)


def test_soc_refuses_declared_sizes_no_raw_kernel_gives():
    tree = {"conv": {"kernel": jnp.zeros((3, 3, 4, 4))}}
    with pytest.raises(ValueError, match=r"soc_kernel_size\(3, terms=6\).*conv/kernel"):
        soc(tree, "conv/kernel")
    with pytest.raises(ValueError, match="odd.*conv/kernel"):
        soc({"conv": {"kernel": jnp.zeros((4, 4, 2, 2))}}, "conv/kernel", terms=2)
    with pytest.raises(TypeError, match="conv/kernel"):
        soc({"conv": {"kernel": jnp.zeros((11, 11, 2, 2), jnp.int32)}}, "conv/kernel")
    with pytest.raises(ValueError, match="bias.*conv/kernel"):
        soc({"conv": {"kernel": jnp.zeros((3,))}}, "conv/kernel")


def test_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="terms must be at least 2"):
        SkewOrthogonalConv(terms=1)
    with pytest.raises(TypeError, match="terms must be an int"):
        SkewOrthogonalConv(terms=6.0)
    with pytest.raises(ValueError, match="max_norm"):
        SkewOrthogonalConv(max_norm=0.0)
    with pytest.raises(TypeError, match="ConvGeometry"):
        SkewOrthogonalConv(geometry="SAME")
    with pytest.raises(ValueError, match="CIRCULAR.*SkewOrthogonalConv"):
        CayleyConv(ConvGeometry(input_size=(8, 8), padding="SAME"))
    with pytest.raises(ValueError, match="stride 1.*SkewOrthogonalConv"):
        CayleyConv(ConvGeometry(input_size=(8, 8), strides=2, padding="CIRCULAR"))
    with pytest.raises(ValueError, match="stride 1.*SkewOrthogonalConv"):
        CayleyConv(ConvGeometry(input_size=(8, 8), kernel_dilation=2, padding="CIRCULAR"))
    with pytest.raises(TypeError, match="name"):
        CayleyConv(name=3)
    assert SkewOrthogonalConv(terms=6) == SkewOrthogonalConv()  # equal options share jit


# ----- Cayley ------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [(4, 4), (4, 6), (6, 4)])
def test_cayley_conv_is_orthogonal_at_every_dft_frequency(channels):
    # a random base (the registered kernel's polar factor) and a random raw kernel
    w = _cayley_value(_kernel(0, (8, 8, *channels), 1.0), _kernel(9, (8, 8, *channels), 0.5))
    s = _circular_sv(w)
    np.testing.assert_allclose(s, 1, atol=1e-5)
    assert float(CayleyConv(CIRC).lipschitz_bound(w)) >= s.max()
    if channels[1] >= channels[0]:  # orthogonal, or an isometry: norms are preserved
        _assert_norms_kept(w, channels[0])


def test_cayley_conv_right_inverse_is_exact_on_orthogonal_convs():
    zero = jnp.zeros((8, 8, 4, 4), jnp.float64)
    q = _cayley_value(_kernel(0, (8, 8, 4, 4), 1.0, jnp.float64), zero + 0.1)
    np.testing.assert_allclose(_cayley_value(q, zero), q, atol=1e-12)
    # a Dense kernel is an orthogonal matrix (geometry None)
    d = _cayley_value(_kernel(2, (5, 3), 1.0), _kernel(3, (5, 3), 1.0))
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-5)


def test_cayley_conv_refuses_a_kernel_smaller_than_the_input():
    tree = {"conv": {"kernel": jnp.zeros((3, 3, 4, 4))}}
    with pytest.raises(ValueError, match=r"kernel_size=\(8, 8\).*CIRCULAR.*conv/kernel"):
        cayley_conv(tree, "conv/kernel", geometry=CIRC)


# ----- BCOP --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 3, 4, 6), (3, 3, 6, 4), (2, 4, 3, 3)])
def test_bcop_is_orthogonal_at_every_frequency(shape):
    register = lambda k: bcop({"conv": {"kernel": k}}, "conv/kernel")
    tree = jax.eval_shape(register, jax.ShapeDtypeStruct(shape, jnp.float32))
    c = max(shape[-2:])
    axes = [(shape[0] - 1, c, c // 2), (shape[1] - 1, c, c // 2)]
    assert [r.shape for r in px.originals(tree, "conv/kernel")] == [shape[-2:], *axes]
    w = _bcop_value(_kernel(0, shape, 0.3))
    assert w.shape == shape and w.dtype == jnp.float32  # the declared size, even ones too
    s = _circular_sv(w)
    np.testing.assert_allclose(s, 1, atol=1e-5)
    assert float(BlockOrthogonalConv().lipschitz_bound(w)) >= s.max()
    if shape[-1] >= shape[-2]:
        _assert_norms_kept(w, shape[-2])
    if shape == (3, 3, 6, 4):  # any padding and stride: a crop and a subsampling
        g = ConvGeometry(input_size=(8, 8), strides=2, padding="SAME", kernel_dilation=2)
        assert float(_power_norm(w, g)) <= 1 + 1e-4


def test_bcop_in_a_flax_conv_and_its_refusals():
    import flax.linen as nn

    layer = nn.Conv(6, (3, 3), strides=2, padding="SAME", use_bias=False)
    x = _kernel(3, (2, 8, 8, 4), 1.0)
    variables = layer.init(jax.random.key(0), x)
    tree = bcop(variables, "params/kernel")
    y = jax.jit(layer.apply)(px.materialize(tree), x)  # the declared shape: Flax accepts it
    assert y.shape == (2, 4, 4, 6)
    assert float(jnp.linalg.norm(y)) <= float(jnp.linalg.norm(x))
    with pytest.raises(TypeError, match="conv/kernel"):
        bcop({"conv": {"kernel": jnp.zeros((3, 3, 2, 2), jnp.int32)}}, "conv/kernel")
    with pytest.raises(ValueError, match="bias.*conv/kernel"):
        bcop({"conv": {"kernel": jnp.zeros((3,))}}, "conv/kernel")


# ----- transformations, gradients, dtypes ---------------------------------------------------------
def test_gradients_match_finite_differences_in_float64():
    # SOC, on the branch that rescales (min(1, max_norm / r) < 1)
    p = SkewOrthogonalConv(terms=3)
    probe = _kernel(1, (5, 5, 2, 3), 1.0, jnp.float64)
    f = jax.jit(lambda x: jnp.sum(p.forward(x) * probe))
    check_grads(f, (_kernel(0, (3, 3, 2, 3), 2.0, jnp.float64),), order=1, modes=["rev"])
    # Cayley (linalg.cayley's custom VJP, the FFTs, the product with a base: any kernel here)
    c = CayleyConv()
    base = {"base": _kernel(2, (4, 4, 3, 3), 1.0, jnp.float64)}
    probe = _kernel(3, (4, 4, 2, 3), 1.0, jnp.float64)
    g = jax.jit(lambda x: jnp.sum(c.forward(x, params=None, state=base) * probe))
    check_grads(g, (_kernel(4, (4, 4, 2, 3), 0.5, jnp.float64),), order=1, modes=["rev"])


def test_jit_vmap_and_grad():
    size = soc_kernel_size(3, terms=4)
    stack = _kernel(0, (2, *size, 4, 4))
    w = _soc_value(stack, terms=4, batch_axes=1)
    assert w.shape == (2, *size, 4, 4)
    np.testing.assert_allclose(w[1], _soc_value(stack[1], terms=4), atol=1e-6)
    bstack = _kernel(1, (2, 3, 3, 4, 4))
    np.testing.assert_allclose(_bcop_value(bstack, 1)[0], _bcop_value(bstack[0]), atol=1e-6)
    tree = soc({"conv": {"kernel": stack}}, "conv/kernel", terms=4, batch_axes=1)
    g = jax.jit(jax.grad(lambda t: jnp.sum(_value(t) ** 3)))(tree)["conv"]["kernel"].originals[0]
    assert g.shape == (2, 3, 3, 4, 4) and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).sum()) > 0


def test_bfloat16_runs_and_the_bound_covers_its_rounding():
    w = _soc_value(_kernel(0, (11, 11, 4, 4), 0.3, jnp.bfloat16))
    assert w.dtype == jnp.bfloat16
    assert float(SkewOrthogonalConv().lipschitz_bound(w)) >= _circular_norm(w)
    b = _bcop_value(_kernel(0, (3, 3, 4, 4), 0.3, jnp.bfloat16))
    assert b.dtype == jnp.bfloat16
    assert float(BlockOrthogonalConv().lipschitz_bound(b)) >= _circular_norm(b) > 0.95
    raw = jnp.zeros((8, 8, 4, 4), jnp.bfloat16)
    c = _cayley_value(_kernel(1, (8, 8, 4, 4), 1.0, jnp.bfloat16), raw)
    assert c.dtype == jnp.bfloat16
    assert float(CayleyConv(CIRC).lipschitz_bound(c)) >= _circular_norm(c) > 0.95


def test_option_and_channel_errors_say_what_is_wrong():
    from paramx import lipschitz as L

    # SOC's max_norm is a rotation bound, not an eps floor (the message used to say "eps").
    with pytest.raises(ValueError, match="largest rotation angle"):
        L.soc({"k": jnp.ones((11, 11, 4, 4), jnp.float32)}, "k", max_norm=0)
    # One channel: BCOP's projectors have rank 0 and the kernel came out 1 x 1, refused as
    # a shape change with advice to pass unsafe=True.
    k = jax.random.normal(jax.random.key(0), (3, 3, 1, 1), jnp.float32)
    with pytest.raises(ValueError, match="one channel in and out.*at k"):
        L.bcop({"k": k}, "k")
    one = L.bcop({"k": k[:1, :1]}, "k")
    assert px.materialize(one)["k"].shape == (1, 1, 1, 1)


def test_cayley_conv_of_a_one_tap_single_channel_kernel():
    # XLA:CPU's FFT of a one-element array fails a layout check (it crashed the process's
    # computation with a RET_CHECK); one tap needs no DFT.
    from paramx import lipschitz as L

    for shape in [(1, 1), (1, 1, 1), (1, 1, 1, 1)]:
        k = -jnp.ones(shape, jnp.float32)
        tree = L.cayley_conv({"k": k}, "k")
        params, state = px.split_state(tree)
        np.testing.assert_allclose(np.abs(px.materialize(tree)["k"]), 1.0, atol=1e-6)
        g = jax.grad(lambda p, state=state: jnp.sum(px.materialize(p, state)["k"]))(params)
        assert bool(jnp.all(jnp.isfinite(g["k"].originals[0])))
