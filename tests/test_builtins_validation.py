"""The built-ins validate what they are given, and stay right on the edge cases.

Issue 11, items 2, 3, 7a, 18-21: safe registration (a wrong-shape assignment raises), the
householder column signs (the value stays orthogonal whatever the diagonal holds), the exact
Q factor as base, torch's error texts with what to do, non-float dtypes refused, options
checked at construction, zero-size and zero-valued tensors with finite gradients.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import paramx as px

MAPS = ["matrix_exp", "cayley", "householder"]
TALL_WIDE = [(6, 3), (3, 6)]


def _normal(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _orthogonality_error(q):
    """max |Q^H Q - I| of the tall orientation, in float64."""
    q = np.asarray(q).astype(np.complex128)
    if q.shape[-2] < q.shape[-1]:
        q = np.swapaxes(q, -1, -2)
    gram = np.conj(np.swapaxes(q, -1, -2)) @ q
    return float(np.abs(gram - np.eye(q.shape[-1])).max()) if q.size else 0.0


def _threshold(q):
    return 10 * max(q.shape[-2:]) * float(jnp.finfo(q.dtype).eps)


@jax.jit
def _linear_loss_grad(params, state, probe):
    """(gradient, materialized tree) in one compiled program."""

    def loss(p):
        out = px.materialize(p, state)
        terms = jax.tree_util.tree_map(lambda a, b: jnp.sum(jnp.real(a * b)), out, probe)
        return sum(jax.tree_util.tree_leaves(terms)), out

    return jax.grad(loss, has_aux=True)(params)


_materialize = jax.jit(px.materialize)


def _value_and_grads(tree, probe_seed=7):
    """The materialized tree, and the gradient of a linear loss of it w.r.t. the trainable
    half; one compilation for both."""
    params, state = px.split_state(tree)
    shapes = jax.eval_shape(px.materialize, tree)  # traced only, not compiled
    probe = jax.tree_util.tree_map(
        lambda x: _normal(x.shape, jnp.float32, probe_seed).astype(x.dtype), shapes
    )
    grads, value = _linear_loss_grad(params, state, probe)
    return value, grads


def _grads(tree, probe_seed=7):
    """The gradient of a linear loss of the materialized tree w.r.t. the trainable half."""
    return _value_and_grads(tree, probe_seed)[1]


def _all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree))


# --- item 2: every built-in registers safely and checks what is assigned ----------------------
def test_builtins_register_with_the_checks_on():
    w = _normal((4, 3))
    for tree in (
        px.orthogonal({"k": w}, "k"),
        px.orthogonal({"k": w}, "k", "householder", use_trivialization=False),
        px.spectral_norm({"k": w}, "k"),
        px.weight_norm({"k": w}, "k"),
    ):
        assert tree["k"].unsafe is False


@pytest.mark.parametrize("value_shape", [(5, 5), (2, 4, 3), (4, 4)])
def test_orthogonal_assign_of_a_wrong_shape_raises(value_shape):
    # torch: "Expected a matrix or batch of matrices of shape ... Got a tensor of shape ...".
    # Before: the (5, 5) value was accepted and changed the tree's shape. The base tells the
    # batch and the larger side; the core's check of the originals' shapes catches the rest.
    tree = px.orthogonal({"k": jnp.ones((4, 3), jnp.float32)}, "k")
    text = "shape" if value_shape == (4, 4) else "Expected a matrix or batch of matrices of shape"
    with pytest.raises(ValueError, match=text):
        px.assign(tree, "k", jnp.ones(value_shape, jnp.float32))
    assert tree["k"].original.shape == (4, 3)


def test_orthogonal_assign_of_the_transposed_shape_raises():
    for triv in (True, False):
        tree = px.orthogonal({"k": _normal((4, 3))}, "k", "householder", use_trivialization=triv)
        with pytest.raises(ValueError, match="shape"):
            px.assign(tree, "k", jnp.ones((3, 4), jnp.float32))


def test_spectral_and_weight_norm_assign_of_a_wrong_shape_raises():
    tree = px.spectral_norm({"k": _normal((4, 3))}, "k")
    with pytest.raises(ValueError, match="the registered tensor's"):
        px.assign(tree, "k", jnp.ones((5, 5), jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        px.assign(tree, "k", jnp.ones((3, 4), jnp.float32))
    tree = px.weight_norm({"k": _normal((4, 3))}, "k")
    with pytest.raises(ValueError, match="shape"):
        px.assign(tree, "k", jnp.ones((5, 5), jnp.float32))


# --- item 3: the householder signs keep the value orthogonal --------------------------------------
def test_default_orthogonal_survives_an_adamw_step():
    # Weight decay pulls the original's -1 diagonal to -0.9999: torch's int() made it 0 and the
    # kernel all zeros.
    tree = px.orthogonal({"kernel": _normal((6, 3))}, "kernel")
    params, state = px.split_state(tree)
    tx = optax.adamw(1e-2, weight_decay=1e-2)
    loss = lambda p: jnp.sum(px.materialize(p, state)["kernel"] * _normal((6, 3), seed=3))
    grads = jax.grad(loss)(params)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, tx.init(params), params)
    params = optax.apply_updates(params, updates)
    diag = jnp.diagonal(params["kernel"].original)
    assert float(jnp.max(jnp.abs(diag))) < 1.0  # the case torch gets wrong
    q = px.materialize(params, state)["kernel"]
    assert _orthogonality_error(q) <= _threshold(q)


@pytest.mark.parametrize("shape", TALL_WIDE)
@pytest.mark.parametrize("triv", [True, False])
@pytest.mark.parametrize("omap", MAPS)
def test_orthogonal_on_a_rank_deficient_value(omap, triv, shape):
    w = np.zeros(shape, np.float32)
    w[0, 0] = 2.0  # rank one; all but one diagonal entry of R are 0
    tree = px.orthogonal({"k": jnp.asarray(w)}, "k", omap, use_trivialization=triv)
    value, grads = _value_and_grads(tree)
    q = value["k"]
    assert _orthogonality_error(q) <= _threshold(q)
    assert _all_finite(grads)


FIRST_LINKS = {
    "spectral_norm": lambda t: px.spectral_norm(t, "k"),
    "tanh": lambda t: px.register_parametrization(t, "k", jnp.tanh),
}


@pytest.mark.parametrize("first", list(FIRST_LINKS))
@pytest.mark.parametrize("shape", TALL_WIDE)
@pytest.mark.parametrize("triv", [True, False])
@pytest.mark.parametrize("omap", MAPS)
def test_orthogonal_chained_after_spectral_norm_and_tanh(omap, triv, shape, first):
    # The current value's diagonal lies in (-1, 1): torch's int() zeroed every column.
    tree = FIRST_LINKS[first]({"k": _normal(shape, seed=1)})
    tree = px.register_parametrization(tree, "k", px.Orthogonal(omap, use_trivialization=triv))
    value, g = _value_and_grads(tree)
    q = value["k"]
    assert q.shape == shape
    assert _orthogonality_error(q) <= _threshold(q)
    assert _all_finite(g)
    assert float(jnp.sum(jnp.abs(g["k"].original))) > 0


def test_householder_forward_uses_signs_for_every_diagonal():
    # torch multiplies column j by int(x[j, j]); paramx by its sign, +1 for 0.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float64)
    x = x.at[jnp.arange(4), jnp.arange(4)].set(jnp.array([0.5, -1.7, 2.3, 0.0]))
    p = px.Orthogonal("householder", use_trivialization=False)
    q = p.forward(jnp.swapaxes(x, 0, 1), params=None, state=None)  # Flax layout: transposed
    assert _orthogonality_error(q) <= _threshold(q)
    ref = p.forward(
        jnp.swapaxes(x.at[jnp.arange(4), jnp.arange(4)].set(jnp.array([1.0, -1, 1, 1])), 0, 1),
        params=None,
        state=None,
    )
    np.testing.assert_allclose(q, ref, atol=1e-14)


# --- item 7a: registration keeps only an exactly orthogonal base ------------------------------
def test_float64_kernel_from_a_float32_orthogonal_init_gets_its_exact_q_factor():
    q32 = jnp.linalg.qr(_normal((6, 6), jnp.float32))[0]
    w = q32.astype(jnp.float64)  # orthogonal to 1e-7 only
    assert _orthogonality_error(w) > 1e-9
    tree = px.orthogonal({"k": w}, "k")
    base = tree["k"].state["0"]["base"]
    assert _orthogonality_error(base) < 1e-14  # torch keeps w (4e-8)
    assert _orthogonality_error(px.materialize(tree)["k"]) < 1e-14


def test_a_matrix_with_columns_off_by_1e_6_is_not_kept_as_base():
    # torch's rtol lets the diagonal of Q^H Q be 1e-5 off; paramx keeps only orthogonal bases.
    q = jnp.linalg.qr(_normal((5, 5), jnp.float64))[0] * (1 + 1e-6)
    base = px.orthogonal({"k": q}, "k")["k"].state["0"]["base"]
    assert _orthogonality_error(base) < 1e-14


def test_an_orthogonal_matrix_is_kept_bit_exactly():
    q = jnp.eye(4, dtype=jnp.float64)[jnp.array([2, 0, 3, 1])]
    tree = px.orthogonal({"k": q}, "k")
    np.testing.assert_array_equal(tree["k"].state["0"]["base"], q.T)  # square kernels flip
    np.testing.assert_array_equal(px.materialize(tree)["k"], q)


# --- item 18: torch's wording, plus what to do --------------------------------------------------
@pytest.mark.parametrize(
    "register, error, torch_text, advice",
    [
        (
            lambda t: px.orthogonal(t, "v"),
            ValueError,
            "Expected a matrix or batch of matrices. Got a tensor of 1 dimensions.",
            "register it on a kernel",
        ),
        (
            lambda t: px.orthogonal(t, "c", "householder"),
            ValueError,
            "The householder parametrization does not support complex tensors.",
            'orthogonal_map="matrix_exp"',
        ),
        (
            lambda t: px.spectral_norm(t, "k", dim=2),
            IndexError,
            "Dimension out of range (expected to be in range of [-2, 1] but got 2)",
            "dim is the axis of output features",
        ),
        (
            lambda t: px.weight_norm(t, "k", dim=-3),
            IndexError,
            "Dimension out of range (expected to be in range of [-2, 1] but got -3)",
            "dim is the axis of output features",
        ),
    ],
)
def test_registration_errors_keep_torchs_text_and_say_what_to_do(
    register, error, torch_text, advice
):
    tree = {"v": jnp.ones(3), "c": jnp.ones((3, 3), jnp.complex64), "k": jnp.ones((3, 4))}
    with pytest.raises(error) as info:
        register(tree)
    text = str(info.value)
    assert torch_text in text and advice in text


def test_option_errors_keep_torchs_text():
    with pytest.raises(
        ValueError,
        match='orthogonal_map has to be one of "matrix_exp", "cayley", '
        "\"householder\". Got: 'qr'. Pass one of",
    ):
        px.Orthogonal("qr")
    with pytest.raises(
        ValueError,
        match="Expected n_power_iterations to be positive, but got n_power_iterations=0",
    ):
        px.SpectralNorm(0)


@pytest.mark.parametrize("omap", ["matrix_exp", "cayley"])
def test_assigning_without_trivialization_says_what_to_do(omap):
    tree = px.orthogonal({"k": _normal((3, 3))}, "k", omap, use_trivialization=False)
    with pytest.raises(NotImplementedError) as info:
        px.assign(tree, "k", jnp.eye(3))
    text = str(info.value)
    assert "It is not possible to assign to the matrix exponential or the Cayley" in text
    assert "use_trivialization=True" in text


def test_errors_raised_inside_a_builtin_name_the_path():
    # The core appends the path to what a built-in raises inside register / assign.
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel"):
        px.orthogonal({"params": {"Dense_0": {"kernel": jnp.ones(3)}}}, "params/Dense_0/kernel")
    with pytest.raises(TypeError, match=r"params/Dense_0/kernel"):
        px.spectral_norm(
            {"params": {"Dense_0": {"kernel": jnp.ones((3, 2), jnp.int32)}}},
            "params/Dense_0/kernel",
        )


# --- item 19: non-float tensors are refused ---------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
@pytest.mark.parametrize(
    "register",
    [
        lambda t: px.orthogonal(t, "k"),
        lambda t: px.orthogonal(t, "k", "cayley", use_trivialization=False),
        lambda t: px.spectral_norm(t, "k"),
        lambda t: px.spectral_norm(t, "b"),
        lambda t: px.weight_norm(t, "k"),
        lambda t: px.weight_norm(t, "b", dim=None),
    ],
)
def test_integer_and_boolean_tensors_are_refused(register, dtype):
    tree = {"k": jnp.ones((4, 3), dtype), "b": jnp.ones((3,), dtype)}
    with pytest.raises(TypeError, match="needs a floating-point"):
        register(tree)


def test_householder_refuses_complex_and_the_others_support_it():
    w = jax.lax.complex(_normal((5, 3)), _normal((5, 3), seed=1))
    with pytest.raises(ValueError, match="householder parametrization does not support complex"):
        px.orthogonal({"k": w}, "k", "householder", use_trivialization=False)
    # spectral norm: sigma is the top singular value, as torch's complex support.
    tree = px.spectral_norm({"k": w}, "k")
    params, state = px.split_state(tree)
    for _ in range(3):
        _, state = px.materialize(params, state, update_state=True)
    out = px.materialize(params, state)["k"]
    assert out.dtype == w.dtype
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), 2), 1.0, rtol=1e-4)
    assert _all_finite(_grads(tree))
    # weight norm: g holds the real norms; registration keeps the value.
    tree = px.weight_norm({"k": w}, "k")
    g, _ = px.originals(tree, "k")
    np.testing.assert_allclose(np.imag(np.asarray(g)), 0)
    np.testing.assert_allclose(px.materialize(tree)["k"], w, rtol=1e-5, atol=1e-6)
    assert _all_finite(_grads(tree))


def test_low_precision_floats_compute_in_float32():
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn):
        w = _normal((4, 3)).astype(dtype)
        q = px.materialize(px.orthogonal({"k": w}, "k"))["k"]
        assert q.dtype == dtype
        assert _orthogonality_error(q.astype(jnp.float32)) < 0.2


# --- item 20: options are checked when given -------------------------------------------------
@pytest.mark.parametrize(
    "make, error, text",
    [
        (lambda: px.SpectralNorm(eps=0), ValueError, "eps must be positive and finite"),
        (lambda: px.SpectralNorm(eps=-1e-12), ValueError, "eps must be positive"),
        (lambda: px.SpectralNorm(eps=float("nan")), ValueError, "eps must be positive"),
        (lambda: px.SpectralNorm(eps=float("inf")), ValueError, "eps must be positive"),
        (lambda: px.SpectralNorm(eps="1e-12"), TypeError, "eps must be a positive real"),
        (lambda: px.SpectralNorm(eps=True), TypeError, "eps must be a positive real"),
        (lambda: px.SpectralNorm(1.5), TypeError, "n_power_iterations must be an int"),
        (lambda: px.SpectralNorm(True), TypeError, "n_power_iterations must be an int"),
        (lambda: px.SpectralNorm(-2), ValueError, "Expected n_power_iterations to be positive"),
        (lambda: px.SpectralNorm(dim=1.0), TypeError, "dim must be an int"),
        (lambda: px.SpectralNorm(dim=True), TypeError, "dim must be an int"),
        (lambda: px.SpectralNorm(axis_name=["data"]), TypeError, "axis_name must be a hashable"),
        (lambda: px.WeightNorm(dim="0"), TypeError, "dim must be an int"),
        (lambda: px.WeightNorm(dim=False), TypeError, "dim must be an int"),
        (lambda: px.Orthogonal("qr"), ValueError, "orthogonal_map has to be one of"),
        (lambda: px.Orthogonal(0), TypeError, "orthogonal_map has to be one of"),
        (lambda: px.Orthogonal(use_trivialization=1), TypeError, "must be True or False"),
        (lambda: px.Orthogonal(use_trivialization="no"), TypeError, "must be True or False"),
        (lambda: px.Orthogonal(name=3), TypeError, "name must be a str"),
    ],
)
def test_options_are_validated_at_construction(make, error, text):
    with pytest.raises(error, match=text):
        make()


def test_registration_functions_validate_before_touching_the_tree():
    tree = {"k": _normal((4, 3))}
    with pytest.raises(ValueError, match="eps must be positive"):
        px.spectral_norm(tree, "k", eps=0.0)
    with pytest.raises(TypeError, match="n_power_iterations must be an int"):
        px.spectral_norm(tree, "k", n_power_iterations=1.5)
    with pytest.raises(TypeError, match="must be True or False"):
        px.orthogonal(tree, "k", use_trivialization=None)
    assert isinstance(tree["k"], jax.Array)


def test_numpy_scalars_are_accepted_and_compare_equal():
    assert px.SpectralNorm(np.int64(2), np.float32(1e-6), np.int32(0)) == px.SpectralNorm(
        2, float(np.float32(1e-6)), 0
    )
    assert type(px.SpectralNorm(np.int64(2)).n_power_iterations) is int
    assert px.Orthogonal(use_trivialization=np.bool_(False)) == px.Orthogonal(
        use_trivialization=False
    )
    assert px.WeightNorm(np.int64(-1)) == px.WeightNorm(-1)


# --- item 21: zero-size and zero-valued tensors -----------------------------------------------
@pytest.mark.parametrize("shape", [(4, 0), (0, 3), (2, 0, 3)])
def test_spectral_norm_on_zero_size_tensors(shape):
    # Before: ZeroDivisionError (reshape(-1, 0)).
    tree = px.spectral_norm({"k": jnp.zeros(shape, jnp.float32)}, "k")
    params, state = px.split_state(tree)
    out, new_state = px.materialize(params, state, update_state=True)
    assert out["k"].shape == shape
    assert _all_finite(new_state) and _all_finite(_grads(tree))


def test_spectral_norm_of_a_zero_vector_has_a_finite_gradient():
    # Before: the value was 0 but the gradient NaN (sqrt's derivative at 0).
    tree = px.spectral_norm({"bias": jnp.zeros(3, jnp.float32)}, "bias")
    np.testing.assert_array_equal(px.materialize(tree)["bias"], jnp.zeros(3, jnp.float32))
    g = _grads(tree)
    assert _all_finite(g)
    params, state = px.split_state(tree)
    tx = optax.adam(1e-3)
    loss = lambda p: jnp.sum(px.materialize(p, state)["bias"] * jnp.arange(3.0, dtype=jnp.float32))
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
        updates, _ = tx.update(jax.grad(loss)(params), tx.init(params))
    assert _all_finite(px.materialize(optax.apply_updates(params, updates), state))


def test_spectral_norm_registered_on_zeros_normalizes_once_the_weight_moves():
    # Before: u and v became 0 on the zero weight and stayed 0: sigma 0, never normalized.
    tree = px.spectral_norm({"k": jnp.zeros((4, 3), jnp.float32)}, "k")
    assert _all_finite(px.materialize(tree)) and _all_finite(_grads(tree))
    w = _normal((4, 3), seed=2)
    params, state = px.split_state(px.assign(tree, "k", w))
    for _ in range(20):
        _, state = px.materialize(params, state, update_state=True)
    out = px.materialize(params, state)["k"]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), 2), 1.0, rtol=1e-4)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (0, 4, 3)])
@pytest.mark.parametrize("triv", [True, False])
@pytest.mark.parametrize("omap", MAPS)
def test_orthogonal_on_zero_size_tensors(omap, triv, shape):
    tree = px.orthogonal({"k": jnp.zeros(shape, jnp.float32)}, "k", omap, use_trivialization=triv)
    value, grads = _value_and_grads(tree)
    out = value["k"]
    assert out.shape == shape and out.dtype == jnp.float32
    assert _all_finite(grads)
    if triv:
        assert px.assign(tree, "k", jnp.zeros(shape, jnp.float32))["k"].original.shape == shape


@pytest.mark.parametrize("triv", [True, False])
@pytest.mark.parametrize("omap", MAPS)
def test_orthogonal_on_an_empty_stack(omap, triv):
    # A stack of 0 matrices (batch_axes=1): each matrix is computed under vmap, which gave
    # the adaptive matrix exponential an empty batch (ValueError from a max over nothing).
    shape = (0, 3, 3)
    tree = px.orthogonal(
        {"k": jnp.zeros(shape, jnp.float32)}, "k", omap, use_trivialization=triv, batch_axes=1
    )
    value, grads = _value_and_grads(tree)
    assert value["k"].shape == shape
    assert _all_finite(grads)
    assert px.table(tree).health["k"]["orth_error"].shape == (0,)


@pytest.mark.parametrize("triv", [True, False])
@pytest.mark.parametrize("omap", MAPS)
def test_orthogonal_on_a_zero_matrix(omap, triv):
    tree = px.orthogonal({"k": jnp.zeros((5, 3), jnp.float32)}, "k", omap, use_trivialization=triv)
    value, grads = _value_and_grads(tree)
    q = value["k"]
    assert _orthogonality_error(q) <= _threshold(q)
    assert _all_finite(grads)


@pytest.mark.parametrize("dim", [-1, 0, None])
@pytest.mark.parametrize("shape", [(4, 0), (0, 3)])
def test_weight_norm_on_zero_size_tensors(shape, dim):
    tree = px.weight_norm({"k": jnp.zeros(shape, jnp.float32)}, "k", dim=dim)
    assert px.materialize(tree)["k"].shape == shape
    assert _all_finite(_grads(tree))


@pytest.mark.parametrize("dim", [-1, None])
def test_weight_norm_on_a_zero_tensor(dim):
    tree = px.weight_norm({"k": jnp.zeros((4, 3), jnp.float32)}, "k", dim=dim)
    np.testing.assert_array_equal(px.materialize(tree)["k"], jnp.zeros((4, 3), jnp.float32))
    g = _grads(tree)
    assert _all_finite(g)
    assert math.isfinite(float(jnp.sum(jnp.abs(g["k"].originals[1]))))
