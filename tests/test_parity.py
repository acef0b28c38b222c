"""Parity with PyTorch 2.13 from golden files (tests/golden/, made by make_golden.py); no torch.

Golden arrays are in torch's layout. Where a case maps onto a Flax layout (a Dense kernel is
the transpose of torch's Linear weight), the test transposes, runs paramx's public API on
the Flax-layout tree, and transposes back; the power-iteration and weight-norm numerics are
also checked on torch's own layout with torch's ``dim``, which paramx's ``dim`` means too.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paramx as px
from paramx._src.parametrizations import spectral_norm as spectral_norm_module

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import load


def _cases(family, *kinds):
    return [pytest.param(c, id=c["id"]) for c in load.load(family) if c["kind"] in kinds]


def _close(actual, desired, case, scale=1.0):
    tol = load.tolerance(case["dtype"]) * scale
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), atol=tol, rtol=tol)


def _mT(x):
    return jnp.swapaxes(jnp.asarray(x), -1, -2)


# --- orthogonal -------------------------------------------------------------------------------
def _forward(case):
    """paramx's forward on the case's original and base, back in torch's layout."""
    p = px.Orthogonal(case["orthogonal_map"], case["use_trivialization"])
    state = {"base": jnp.asarray(case["base"])} if case["use_trivialization"] else None
    # Flax layout: the transpose; the base is the same (it lives in the tall orientation).
    flax_original = _mT(case["original"])
    out = jax.jit(lambda x, s: p.forward(x, params=None, state=s))(flax_original, state)
    return np.asarray(_mT(out))


@pytest.mark.parametrize("case", _cases("orthogonal", "forward"))
def test_orthogonal_forward_from_given_originals(case):
    _close(_forward(case), case["weight"], case)


@pytest.mark.parametrize("case", _cases("orthogonal", "forward_int_diag"))
def test_householder_forward_with_a_diagonal_other_than_signs(case):
    # torch multiplies column j (tall orientation) by int(X[j, j]): 0 for |X[j, j]| < 1, so
    # its value is not orthogonal there. paramx multiplies by the sign (orthogonal.py's
    # docstring): it agrees with torch where 1 <= |X[j, j]| < 2 and differs elsewhere only by
    # that factor; where torch's column is 0, paramx's is a unit column orthogonal to the rest.
    tall = (lambda x: np.swapaxes(x, -1, -2)) if case["transposed"] else (lambda x: x)
    ours, torch_value = tall(_forward(case)), tall(case["weight"])
    d = np.diagonal(tall(case["original"]), axis1=-2, axis2=-1)
    trunc, sign = np.trunc(d), np.where(d >= 0, 1.0, -1.0)
    assert np.any(trunc == 0) and np.any(np.abs(trunc) >= 2)  # the golden covers both cases
    kept = trunc != 0
    _close(ours[..., kept] * (trunc / sign)[kept], torch_value[..., kept], case)
    assert np.all(torch_value[..., ~kept] == 0)
    gram = ours.T @ ours
    _close(gram, np.eye(gram.shape[0]), case, scale=10)


@pytest.mark.parametrize("case", _cases("orthogonal", "registration"))
def test_orthogonal_registration(case):
    tree = px.orthogonal(
        {"kernel": _mT(case["W"])},
        "kernel",
        case["orthogonal_map"],
        use_trivialization=case["use_trivialization"],
    )
    _close(_mT(px.materialize(tree)["kernel"]), case["weight"], case, scale=10)
    _close(_mT(tree["kernel"].original), case["original"], case, scale=10)
    if case["use_trivialization"]:
        k = case["base_deterministic_columns"]
        _close(tree["kernel"].state["0"]["base"][..., :k], case["base"][..., :k], case, scale=10)
    else:
        assert tree["kernel"].state == {}


def test_orthogonal_default_map_table():
    table = load.manifest()["orthogonal_default_map"]
    assert len(table) >= 8
    for entry in table:
        x = jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
        assert px.Orthogonal().map_for(x) == entry["default_map"], entry


# --- spectral_norm ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases("spectral_norm", "power"))
def test_spectral_norm_power_iterations(case):
    p = px.SpectralNorm(case["n_power_iterations"], case["eps"], dim=case["dim"])
    w = jnp.asarray(case["W"])  # torch's layout and torch's dim: the same matrix
    state = {"u": jnp.asarray(case["u0"]), "v": jnp.asarray(case["v0"])}
    new = jax.jit(lambda w, s: p.update_state(w, params=None, state=s))(w, state)
    _close(new["u"], case["u"], case)
    _close(new["v"], case["v"], case)
    out = p.forward(w, params=None, state=new)
    mat = p.matrix(w)
    sigma = jnp.vdot(new["u"], mat @ new["v"])
    _close(sigma / case["sigma"], np.ones_like(case["sigma"]), case, scale=10)
    _close(out, case["weight"], case, scale=10)


@pytest.mark.parametrize("case", _cases("spectral_norm", "registration"))
def test_spectral_norm_registration_iteration_count(case):
    # torch: 15 iterations when built, plus k more if registered in training mode.
    p = px.SpectralNorm(case["n_power_iterations"], case["eps"], dim=case["dim"])
    mt = p._matrix_t(jnp.asarray(case["W"]))  # the transposed matrix _iterate works on
    assert np.array_equal(mt, p.matrix(jnp.asarray(case["W"])).T)
    warmup = spectral_norm_module._WARMUP_ITERATIONS  # what paramx's init runs
    assert warmup == 15
    extra = case["total_iterations"] - warmup
    state = {"u": jnp.asarray(case["u0"]), "v": jnp.asarray(case["v0"])}
    u, v = p._iterate(mt, state["u"], state["v"], warmup)
    if extra:  # torch's training-mode registration ran one more forward
        u, v = p._iterate(mt, u, v, extra)
    _close(u, case["u"], case, scale=10)
    _close(v, case["v"], case, scale=10)


def test_spectral_norm_linear_in_flax_layout_matches_torch():
    case = next(
        c
        for c in load.load("spectral_norm")
        if c["id"].startswith("spectral_norm.power.linear_7x5.float64.k3")
    )
    kernel = _mT(case["W"])  # Flax Dense kernel (in, out)
    p = px.SpectralNorm(3)  # default dim: the last axis, output features
    state = {"u": jnp.asarray(case["u0"]), "v": jnp.asarray(case["v0"])}
    new = p.update_state(kernel, params=None, state=state)
    _close(new["u"], case["u"], case)
    _close(_mT(p.forward(kernel, params=None, state=new)), case["weight"], case, scale=10)


@pytest.mark.parametrize("case", _cases("spectral_norm", "vector"))
def test_spectral_norm_vectors(case):
    tree = px.spectral_norm({"b": jnp.asarray(case["W"])}, "b")
    out = np.asarray(px.materialize(tree)["b"])
    _close(out, case["weight"], case)


# --- weight_norm ------------------------------------------------------------------------------
def _paramx_dim(case):
    return None if case["whole_tensor"] else case["dim_arg"]  # torch's dim=-1 is the whole tensor


@pytest.mark.parametrize("case", _cases("weight_norm", "weight_norm", "zero_row"))
def test_weight_norm(case):
    dim = _paramx_dim(case)
    tree = px.weight_norm({"w": jnp.asarray(case["W"])}, "w", dim=dim)
    g, v = px.originals(tree, "w")
    _close(g, case["g"], case)
    _close(v, case["v"], case)
    _close(px.materialize(tree)["w"], case["weight"], case)
    out = np.asarray(
        px.WeightNorm(dim).forward(jnp.asarray(case["g_in"]), jnp.asarray(case["v_in"]))
    )
    nan = np.isnan(case["out"])
    assert nan.any() == case["contains_nan"]
    assert np.all(np.isfinite(out)), "paramx returns finite values where torch returns NaN"
    _close(out[~nan], case["out"][~nan], case)
    assert np.all(out[nan] == 0)  # a zero slice of v stays zero


def test_weight_norm_linear_in_flax_layout_matches_torch():
    case = next(c for c in load.load("weight_norm") if c["id"] == "weight_norm.linear.dim0.float64")
    tree = px.weight_norm({"kernel": _mT(case["W"])}, "kernel")  # default dim: output features
    g, _ = px.originals(tree, "kernel")
    _close(_mT(g), case["g"], case)
