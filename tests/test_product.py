"""Product: one tensor split along an axis into blocks, each under its own constraint."""

from __future__ import annotations

import doctest
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from catalogue import adam_fit, random_quadratic
from conftest import assert_close
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx._src.integrations.nnx.wrappers import torch_function
from paramx._src.parametrizations.ordered import Ordered
from paramx._src.parametrizations.orthogonal import Orthogonal
from paramx._src.parametrizations.positive import Positive
from paramx._src.parametrizations.product import Product, product
from paramx._src.parametrizations.sphere import Sphere
from paramx._src.parametrizations.symmetric import Symmetric
from paramx._src.parametrizations.weight_norm import WeightNorm

N = 4
# Dense kernel (4, 4): the first 3 output units have unit weight vectors, the last one positive
# weights.
SP = Product((Sphere(axis=-2), Positive()), (3, None))
# Both factors project to their nearest point: so does the product.
SYM = Product((Symmetric(), Sphere()), (3, 2))
# A factor keeping state (Orthogonal's base), and one with two originals (weight norm's g, v).
ORTH = Product((Orthogonal(), Positive()), (3, 1))
WN = Product((WeightNorm(), Positive()), (2, 2))

_materialize = jax.jit(px.materialize)


# The protocol, compiled once per (parametrization, shape, dtype) instead of op by op.
@functools.partial(jax.jit, static_argnums=0)
def _in(p, x):
    return p.in_manifold(x)


@functools.partial(jax.jit, static_argnums=0)
def _dist(p, x):
    return p.distance(x)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _sample(p, key, shape, dtype):
    return p.sample(key, shape, dtype)


def _x(shape=(N, N), seed=0, dtype=jnp.float64):
    # NumPy's generator: no random-number program to compile per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _roundtrip(p, x):
    """``forward(right_inverse(x))`` of a product without state (one original or several)."""
    out = p.right_inverse(x)
    return p.forward(*(out if isinstance(out, tuple) else (out,)))


def _valid(seed=0, dtype=jnp.float64):
    """A (4, 4) value off SP's set that SP registers on (its last column positive)."""
    x = _x(seed=seed, dtype=dtype)
    return x.at[:, 3].set(jnp.abs(x[:, 3]) + 0.1)


def test_values_are_in_the_set_and_right_inverse_is_exact_on_it():
    w = _sample(SP, jax.random.key(1), (N, N), jnp.float64)
    assert bool(_in(SP, w)) and float(_dist(SP, w)) < 1e-12
    tree = product({"w": w}, "w", SP.factors, SP.sizes)
    assert tree["w"].chain[0] == SP and len(tree["w"].originals) == 1  # packed: one original
    assert_close(_materialize(tree)["w"], w)
    # Off the set: each block is mapped by its factor; the value is in the set.
    x = _valid()
    v = _materialize(product({"w": x}, "w", SP.factors, SP.sizes))["w"]
    assert bool(_in(SP, v))
    assert_close(v[:, :3], x[:, :3] / jnp.linalg.norm(x[:, :3], axis=0, keepdims=True))
    assert_close(v[:, 3], x[:, 3])


def test_the_projection_is_the_nearest_point_of_the_product_set():
    x = _x((3, 5), seed=2)
    p = _materialize(px.register_parametrization({"w": x}, "w", SYM))["w"]
    sym = (x[:, :3] + x[:, :3].T) / 2
    assert_close(p, jnp.concatenate([sym, x[:, 3:] / jnp.linalg.norm(x[:, 3:])], axis=-1))
    d = float(jnp.linalg.norm(x - p))
    np.testing.assert_allclose(float(_dist(SYM, x)), d, rtol=1e-12)
    assert float(_dist(SYM, p)) < 1e-12
    # Brute force: 1024 other points of the set, p moved by small and large steps and projected
    # back, are all farther from x.
    scale = jnp.repeat(jnp.array([0.03, 1.0]), 512)[:, None, None]
    noise = scale * _x((1024, 3, 5), seed=3)
    others = jax.jit(jax.vmap(lambda y: _roundtrip(SYM, y)))(p[None] + noise)
    assert bool(jnp.all(_in(SYM, others)))
    assert float(jnp.min(jnp.linalg.norm(others - x[None], axis=(-2, -1)))) >= d


def test_refusals_name_the_block_and_the_path_also_for_stacks_and_nnx():
    bad = _valid().at[1, 3].set(-1.0)  # a negative entry in the positive block
    with pytest.raises(ValueError, match=r"block 1 \(entries 3:4.*Positive.*\(at fc/kernel\)"):
        product({"fc": {"kernel": bad}}, "fc/kernel", SP.factors, SP.sizes)
    with pytest.raises(ValueError, match=r"sizes=\(3, None\).*\(at fc/kernel\)"):
        product({"fc": {"kernel": jnp.ones((4, 3))}}, "fc/kernel", SP.factors, SP.sizes)
    with pytest.raises(ValueError, match=r"add up to 5.*\(at w\)"):
        px.register_parametrization({"w": jnp.ones((3, 4))}, "w", SYM)
    # A stack (registered under vmap) is checked eagerly before it is traced: one bad tensor.
    stack = jnp.stack([_valid(1), bad])
    with pytest.raises(ValueError, match=r"block 1.*\(at fc/kernel\)"):
        product({"fc": {"kernel": stack}}, "fc/kernel", SP.factors, SP.sizes, batch_axes=1)
    layer = nnx.Linear(N, N, rngs=nnx.Rngs(0))
    layer.kernel[...] = bad.astype(jnp.float32)
    with pytest.raises(ValueError, match=r"block 1.*Linear\.kernel"):
        torch_function(Product)(layer, factors=SP.factors, sizes=SP.sizes)
    tree = product({"w": _valid()}, "w", SP.factors, SP.sizes)
    with pytest.raises(ValueError, match=r"block 0.*zero.*\(at w\)"):
        px.assign(tree, "w", _valid().at[:, 1].set(0.0))
    with pytest.raises(TypeError, match="floating-point"):
        product({"w": jnp.ones((N, N), jnp.int32)}, "w", SP.factors, SP.sizes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_are_kept(dtype):
    x = _valid(dtype=jnp.float32).astype(dtype)
    w = _materialize(product({"w": x}, "w", SP.factors, SP.sizes))["w"]
    assert w.dtype == dtype and bool(_in(SP, w))
    s = _sample(SP, jax.random.key(0), (N, N), dtype)
    assert s.dtype == dtype and bool(_in(SP, s))


def test_a_factor_counting_axes_from_the_front_is_checked_per_tensor_of_a_stack():
    # Ordered(axis=0) counts the axes of each block without the stack: the eager check must
    # not order along the stack axis (a valid stack was refused, an invalid one gave NaN).
    p = Product((Ordered(axis=0), Positive()), sizes=(2, None))
    one = jnp.array([[0.0, 1.0, 1.0], [1.0, 2.0, 1.0]])
    good = jnp.stack([one, one.at[:, :2].add(-5.0)])  # decreasing along the stack
    tree = px.register_parametrization({"w": good}, "w", p, batch_axes=1)
    np.testing.assert_allclose(px.materialize(tree)["w"], good, atol=1e-5)
    bad = jnp.stack([one[::-1], one[::-1] + 1.0])  # increasing along the stack only
    with pytest.raises(ValueError, match=r"block 0.*strictly increasing.*\(at w\)"):
        px.register_parametrization({"w": bad}, "w", p, batch_axes=1)
    with pytest.raises(ValueError, match=r"block 0.*strictly increasing.*\(at w\)"):
        px.assign(tree, "w", bad)


def test_stacks_jit_vmap_and_grad():
    stack = jnp.stack([_valid(1), _valid(2)])
    tree = product({"w": stack}, "w", SP.factors, SP.sizes, batch_axes=1)
    w = _materialize(tree)["w"]
    assert_close(w, jax.vmap(lambda x: _roundtrip(SP, x))(stack))
    assert _in(SP, w).shape == (2,) and bool(jnp.all(_in(SP, w)))
    assert _dist(SP, w).shape == (2,)
    g = jax.jit(jax.grad(lambda t: jnp.sum(px.materialize(t)["w"] ** 3)))(tree)
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in g["w"].originals)
    # A conv kernel (3, 3, in, out) split along the output channels: one answer per tap.
    conv = np.abs(np.random.default_rng(5).standard_normal((3, 3, 2, 4))) + 0.1
    conv[..., :3] /= np.linalg.norm(conv[..., :3], axis=-2, keepdims=True)
    conv[1, 2, 0, 3] = -1.0
    ok = _in(SP, jnp.asarray(conv))
    assert ok.shape == (3, 3) and int(jnp.sum(~ok)) == 1 and not bool(ok[1, 2])


def test_a_factor_with_state_and_one_with_two_originals():
    x = _valid(seed=6)
    tree = px.register_parametrization({"w": x}, "w", ORTH)
    node = tree["w"]
    assert set(node.state["0"]) == {"0"} and node.state["0"]["0"]["base"].shape == (N, N)
    w = _materialize(tree)["w"]
    assert bool(_in(ORTH, w))
    q = w[:, :3]
    assert_close(q.T @ q, jnp.eye(3))
    # Exact on the set; assignment resets the base; update_base keeps the value.
    assert_close(_materialize(px.register_parametrization({"w": w}, "w", ORTH))["w"], w)
    w2 = _materialize(px.register_parametrization({"w": _valid(seed=7)}, "w", ORTH))["w"]
    assigned = px.assign(tree, "w", w2)
    assert_close(_materialize(assigned)["w"], w2)
    # One original: Orthogonal's (4, 3) beside Positive's (4, 1). Move the first away from the
    # chart's centre, as training would.
    shift = 0.2 * jnp.tri(N, N, -1, dtype=jnp.float64).at[:, 3].set(0.0)
    moved = {"w": node.replace(originals=(node.originals[0] + shift,))}
    before = _materialize(moved)["w"]
    recentred = px.update_base(moved)
    assert_close(_materialize(recentred)["w"], before)
    new = recentred["w"].originals[0]
    assert_close(new[:, :3], -jnp.eye(N, 3, dtype=jnp.float64))  # Orthogonal's chart centre
    assert_close(new[:, 3], moved["w"].originals[0][:, 3])  # Positive's: untouched
    assert_close(recentred["w"].state["0"]["0"]["base"][:, :3], before[:, :3], scale=10)
    # Weight norm has two originals (g, v), g of another shape: the product holds three, and
    # must be the first link of a chain (as in torch); a packed product may come later.
    y = jnp.abs(_x(seed=8)) + 0.1
    wn = px.register_parametrization({"w": y}, "w", WN)
    assert len(wn["w"].originals) == 3
    assert_close(_materialize(wn)["w"], y)
    tanh = px.register_parametrization({"w": y}, "w", jnp.tanh)
    with pytest.raises(ValueError, match=r"first parametrization.*\(at w\)"):
        px.register_parametrization(tanh, "w", WN)
    later = px.register_parametrization(tanh, "w", SP)
    assert bool(_in(SP, _materialize(later)["w"]))


def test_training_with_a_state_carrying_factor_keeps_the_set():
    tree = px.register_parametrization({"w": _valid(seed=9)}, "w", ORTH)
    params, state = px.split_state(tree)
    target = _x(seed=10)

    @jax.jit
    def run(params):
        opt = optax.adam(1e-2)
        with jax.numpy_dtype_promotion("standard"):

            def step(_, carry):
                p, s = carry
                g = jax.grad(lambda p: jnp.sum((px.materialize(p, state)["w"] - target) ** 2))(p)
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            params, _ = jax.lax.fori_loop(0, 300, step, (params, opt.init(params)))
        return px.materialize(params, state)["w"]

    w = run(params)
    assert float(_dist(ORTH, w)) <= 10 * N * float(jnp.finfo(jnp.float64).eps)


def test_samples_are_independent_draws_of_the_factors():
    s = _sample(SP, jax.random.key(11), (2000, N, N), jnp.float64)
    cols, pos = s[..., :3], s[..., 3]
    np.testing.assert_allclose(jnp.linalg.norm(cols, axis=-2), 1.0, rtol=1e-12)
    # Uniform on the unit sphere of R⁴: each coordinate has mean 0 and variance 1/4.
    assert abs(float(jnp.mean(cols))) < 0.02
    np.testing.assert_allclose(float(jnp.mean(cols**2)), 0.25, rtol=0.03)
    # Exponential(1) entries: mean 1, variance 1.
    np.testing.assert_allclose(float(jnp.mean(pos)), 1.0, rtol=0.05)
    np.testing.assert_allclose(float(jnp.var(pos)), 1.0, rtol=0.1)
    # The blocks are independent: no correlation between |sphere entries| and positive ones.
    c = np.corrcoef(np.abs(np.asarray(cols[:, 0, 0])), np.asarray(pos[:, 0]))[0, 1]
    assert abs(c) < 0.08


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_quality_and_fitting_power(dtype):
    eps = float(jnp.finfo(dtype).eps)
    x0 = _sample(SP, jax.random.key(12), (N, N), dtype)
    target, q = random_quadratic(jax.random.key(13), (N, N), dtype)
    w, loss = adam_fit(SP, x0, target, q)
    assert w.dtype == dtype and bool(jnp.isfinite(loss))
    assert float(_dist(SP, w)) <= 10 * N * eps
    target = _sample(SP, jax.random.key(14), (N, N), dtype)
    _, loss = adam_fit(SP, x0, target, steps=2000)
    assert float(loss) <= 1e-4, float(loss)


def test_options_are_validated_and_hooks_follow_the_factors():
    with pytest.raises(TypeError, match="non-empty tuple"):
        Product((), ())
    with pytest.raises(TypeError, match="factor 1"):
        Product((Positive(), 3), (1, 1))
    with pytest.raises(ValueError, match="one entry per factor"):
        Product((Positive(), Sphere()), (1,))
    with pytest.raises(ValueError, match="at most one entry of sizes may be None"):
        Product((Positive(), Sphere()), (None, None))
    with pytest.raises(ValueError, match=">= 1"):
        Product((Positive(), Sphere()), (0, 2))
    with pytest.raises(TypeError, match="sizes must be an int"):
        Product((Positive(), Sphere()), (1.5, 2))
    with pytest.raises(ValueError, match="axis must be negative"):
        Product((Positive(), Sphere()), (1, 2), axis=0)
    with pytest.raises(TypeError, match="name"):
        Product((Positive(),), (1,), name=3)
    with pytest.raises(TypeError, match="hashable"):
        Product((px.Parametrization(jnp.tanh, name=[1]),), (1,))
    assert Product([Positive(), Sphere()], [1, 2]) == Product((Positive(), Sphere()), (1, 2))
    # A factor without the protocol (a plain function): the product has none either.
    plain = Product((jnp.tanh, Positive()), (1, None))
    assert getattr(plain, "sample", None) is None and getattr(plain, "distance", None) is None
    assert getattr(plain, "init", None) is None and getattr(plain, "update_base", None) is None
    with pytest.raises(TypeError, match="no `sample"):
        px.sampler(plain)
    assert plain.traceable is False and SP.traceable is True and Product.traceable is True
    assert getattr(ORTH, "init", None) is not None and getattr(ORTH, "update_base", None)
    plain = Product((jnp.tanh, Positive()), (3, None))
    w = _materialize(px.register_parametrization({"w": _valid()}, "w", plain))["w"]
    assert_close(w[:, 0], jnp.tanh(_valid()[:, 0]))  # no right_inverse: the block is stored


def test_nnx_function_comes_from_the_declaration(monkeypatch):
    fn = torch_function(Product)
    sig = inspect.signature(fn)
    assert list(sig.parameters) == ["module", "name", "factors", "sizes", "axis", "batch_axes"]
    assert sig.parameters["factors"].kind is inspect.Parameter.KEYWORD_ONLY
    monkeypatch.setattr(pnx, "product", fn, raising=False)
    test = doctest.DocTestParser().get_doctest(Product.nnx_doc, {}, "Product", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
