"""The device-friendly plans: no data-dependent control flow, products only, the polar map.

On a GPU or TPU every ``lax.cond`` predicate and ``while_loop`` condition computed on the
device is a device-to-host round trip, and so is a host callback. These tests look at the
jaxpr (so they run on CPU): the forward+backward of every built-in orthogonal map under the
device plan (``expm_plan="static"``), and of every exported parametrization with the plan a
GPU or TPU picks by default, contains no ``while``, no data-dependent ``cond`` and no callback.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import exported_parametrizations, suitable_shape

import paramx as px
from paramx._src.parametrizations import linalg

MAPS = ["matrix_exp", "cayley", "householder", "polar"]


_CALLBACKS = ("pure_callback", "io_callback", "debug_callback", "debug_print")


def control_flow(jaxpr) -> int:
    """``while``, data-dependent ``cond`` and host-callback equations in a jaxpr, sub-jaxprs
    included: each one a device-to-host round trip on an accelerator.

    A ``cond`` with ``branches_platforms`` is ``lax.platform_dependent`` (``jnp.diagonal``
    uses one): its branch is chosen when compiling for a platform, not at run time. A ``scan``
    (a loop of static length, ``fori_loop`` with Python bounds) is not counted: its trip
    count is known when compiling.
    """
    count = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("while", *_CALLBACKS) or (
            name == "cond" and not eqn.params.get("branches_platforms")
        ):
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += control_flow(sub)
    return count


def dots(jaxpr, dtype=None) -> int:
    """``dot_general`` equations (with operands of ``dtype``, if given), sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += dtype is None or eqn.invars[0].aval.dtype == dtype
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += dots(sub, dtype)
    return count


def _grad_jaxpr(p, shape, dtype=jnp.float32):
    w = jax.random.normal(jax.random.key(0), shape, dtype)
    params, state = px.split_state(px.register_parametrization({"w": w}, "w", p))
    loss = lambda pr: jnp.sum(px.materialize(pr, state)["w"] ** 2)
    return jax.make_jaxpr(jax.grad(loss))(params).jaxpr


@pytest.mark.parametrize("omap", MAPS)
@pytest.mark.parametrize("triv", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (2, 5, 5)])
def test_no_data_dependent_control_flow_under_the_device_plan(omap, triv, shape):
    p = px.Orthogonal(omap, triv, expm_plan="static")
    assert control_flow(_grad_jaxpr(p, shape)) == 0


def test_the_counter_sees_the_adaptive_plans_control_flow():
    assert control_flow(_grad_jaxpr(px.Orthogonal("matrix_exp", expm_plan="adaptive"), (5, 5))) > 0


def test_the_counter_sees_callbacks_and_loops_of_unknown_length():
    def f(x):
        y = jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        jax.debug.print("{}", y)
        return jax.lax.while_loop(lambda c: c[0] < c[1], lambda c: (c[0] + 1, c[1]), (0, 3))[0]

    assert control_flow(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr) == 3
    scan = lambda x: jax.lax.fori_loop(0, 3, lambda i, x: x * 2, x)
    assert control_flow(jax.make_jaxpr(scan)(jnp.ones(2)).jaxpr) == 0


# Exported classes that need options, and options that change the program: one case each.
_OPTIONED = [
    px.constraints.LowRank(2),
    px.constraints.FixedRank(2),
    px.constraints.PositiveSemidefiniteFixedRank(2),
    px.constraints.AlmostOrthogonal(0.1),
    px.SpectralNorm(n_power_iterations=3),
    *(px.Orthogonal(m, t) for m in ("matrix_exp", "cayley", "householder") for t in (False, True)),
]
_CONV = [  # (parametrization, kernel shape)
    (px.lipschitz.ConvSpectralNorm(geometry=px.lipschitz.ConvGeometry(input_size=(6, 6))),
     (3, 3, 4, 4)),
    (px.lipschitz.SkewOrthogonalConv(), (11, 11, 4, 4)),
    (px.lipschitz.BlockOrthogonalConv(), (3, 3, 4, 4)),
    (px.lipschitz.CayleyConv(geometry=px.lipschitz.ConvGeometry((6, 6), padding="CIRCULAR")),
     (6, 6, 4, 4)),
]  # fmt: skip
_EVERY = [(cls(), None) for cls in exported_parametrizations()] + [(p, None) for p in _OPTIONED]
_EVERY += _CONV


@pytest.mark.parametrize(
    "p, shape", _EVERY, ids=[f"{type(p).__name__}-{i}" for i, (p, _) in enumerate(_EVERY)]
)
def test_no_exported_parametrization_makes_host_round_trips_on_an_accelerator(
    p, shape, monkeypatch
):
    # What a GPU or TPU runs: plan=None resolves to the device plan there. Found by looking
    # (conftest.exported_parametrizations), so a new built-in is checked without editing this.
    monkeypatch.setattr(linalg, "default_plan", lambda: "static")
    shape = shape or suitable_shape(p)
    key = jax.random.key(0)
    sample = getattr(p, "sample", None)
    w = sample(key, shape, jnp.float32) if callable(sample) else jax.random.normal(key, shape)
    tree = px.register_parametrization({"w": w}, "w", p, key=jax.random.key(1))
    params, state = px.split_state(tree)

    def loss(params):  # a training step's materialization: value, state update, gradient
        value, new_state = px.materialize(params, state, update_state=True)
        return jnp.sum(jnp.real(value["w"]) ** 2), new_state

    assert control_flow(jax.make_jaxpr(jax.grad(loss, has_aux=True))(params).jaxpr) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.complex64])
def test_expm_static_plan_has_no_control_flow(dtype):
    a = jnp.zeros((3, 4, 4), dtype)
    loss = lambda a: jnp.sum(jnp.real(linalg.expm_skew(a, plan="static")))
    assert control_flow(jax.make_jaxpr(jax.value_and_grad(loss))(a).jaxpr) == 0


def test_expm_plan_option_is_validated_and_reaches_the_map():
    with pytest.raises(ValueError, match="expm_plan"):
        px.Orthogonal(expm_plan="fast")
    with pytest.raises(TypeError, match="expm_plan"):
        px.Orthogonal(expm_plan=True)
    assert px.Orthogonal().expm_plan is None
    w = jax.random.normal(jax.random.key(1), (5, 5), jnp.float32)
    values = [
        px.materialize(px.register_parametrization({"w": w}, "w", px.Orthogonal(expm_plan=plan)))
        for plan in ("adaptive", "static")
    ]
    np.testing.assert_allclose(values[0]["w"], values[1]["w"], atol=2e-6)


# ----- the polar map ---------------------------------------------------------------------------


def _polar_forward(x, triv=False):
    p = px.Orthogonal("polar", use_trivialization=triv)
    state = p.init(x, jax.random.key(0))[1]
    return p.forward(x, params=None, state=state)


def test_polar_forward_is_at_most_15_products_and_backward_at_most_twice_that():
    x = jnp.zeros((256, 256), jnp.float32)
    forward = dots(jax.make_jaxpr(_polar_forward)(x).jaxpr)
    assert forward <= 15, forward
    # Eight of them (the Gram matrices and the iterate of the phase) multiply bfloat16
    # operands, on purpose; the accumulated factor P and the finishing steps do not.
    assert dots(jax.make_jaxpr(_polar_forward)(x).jaxpr, jnp.bfloat16) == 8
    loss = lambda x: jnp.sum(_polar_forward(x) * x)
    both = dots(jax.make_jaxpr(jax.value_and_grad(loss))(x).jaxpr)
    assert both <= 3 * forward, (both, forward)
    # float64 tensors run the iteration at full precision.
    assert dots(jax.make_jaxpr(_polar_forward)(x.astype(jnp.float64)).jaxpr, jnp.bfloat16) == 0


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (2, 24, 24)])
@pytest.mark.parametrize("triv", [True, False])
def test_polar_values_are_orthogonal_and_right_inverse_is_exact(shape, triv):
    p = px.Orthogonal("polar", use_trivialization=triv)
    q = p.sample(jax.random.key(2), shape)
    tree = px.register_parametrization({"w": q}, "w", p)
    w = px.materialize(tree)["w"]
    np.testing.assert_allclose(w, q, atol=2e-6)  # the registered orthogonal value, kept
    n = max(shape[-2:])
    gram = w @ jnp.swapaxes(w, -1, -2) if shape[-2] <= shape[-1] else jnp.swapaxes(w, -1, -2) @ w
    k = gram.shape[-1]
    assert float(
        jnp.abs(gram - jnp.broadcast_to(jnp.eye(k, dtype=gram.dtype), gram.shape)).max()
    ) <= 10 * n * float(jnp.finfo(jnp.float32).eps)
    # A general value: its polar factor (trivialization: the Q factor of QR, as other maps).
    v = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    assigned = px.materialize(px.assign(tree, "w", v))["w"]
    assert bool(jnp.all(p.in_manifold(assigned)))
    if not triv:
        u, _, vt = np.linalg.svd(np.asarray(v, np.float64), full_matrices=False)
        np.testing.assert_allclose(assigned, u @ vt, atol=2e-6)


def test_polar_trains_near_orthogonal_originals():
    # Originals a gradient step away from orthogonal stay inside the iteration's range.
    q = px.Orthogonal().sample(jax.random.key(4), (64, 64))
    x = q + 0.05 * jax.random.normal(jax.random.key(5), (64, 64), jnp.float32)
    w = _polar_forward(x)
    err = float(jnp.abs(w.T @ w - jnp.eye(64, dtype=w.dtype)).max())
    assert err <= 10 * 64 * float(jnp.finfo(jnp.float32).eps), err
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64))
    assert float(np.abs(np.asarray(w, np.float64) - u @ vt).max()) < 1e-2


def test_polar_refuses_complex_tensors():
    tree = {"w": jnp.eye(3, dtype=jnp.complex64)}
    with pytest.raises(ValueError, match="polar parametrization does not support complex"):
        px.register_parametrization(tree, "w", px.Orthogonal("polar"))


def _dot_precisions(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_dot_precisions(sub))
    return found


@pytest.mark.parametrize("triv", [True, False])
def test_polar_and_static_plan_multiply_at_full_precision(triv):
    # Every product asks for HIGHEST, the bfloat16 ones of the polar phase included (their
    # operands are bfloat16 on purpose; HIGHEST keeps TF32-style downgrades off the rest).
    highest = jax.lax.Precision.HIGHEST
    for p in (px.Orthogonal("polar", triv), px.Orthogonal("matrix_exp", triv, expm_plan="static")):
        precisions = _dot_precisions(_grad_jaxpr(p, (6, 4)))
        assert precisions
        for prec in precisions:
            assert prec is not None
            assert all(q == highest for q in (prec if isinstance(prec, tuple) else (prec, prec)))
