"""Batched LAPACK calls on the CPU: chunked below jaxlib's thread-pool threshold, never hanging.

jaxlib 0.10.2 runs a batched LAPACK call whose estimated work reaches 2e5 flops as tasks on
XLA:CPU's intra-op pool and blocks the pool worker that made the call until they finish; with as
many such calls at once as the pool has threads, the process hangs (``numerics.lapack``).
"""

import math
import subprocess

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close, run_python
from jax import lax
from jax.extend.core import jaxprs_in_params

import paramx as px
from paramx._src.core import stacks
from paramx._src.parametrizations import numerics

# A training step of six independently factorizing layers in a fresh interpreter with every
# CPU (the suite pins its workers to one), with a deadline: each step runs six batched LAPACK
# calls side by side.
_SIX_LAYER_STEP = """
import os
os.sched_setaffinity(0, range(os.cpu_count()))
import jax, jax.numpy as jnp
import paramx as px
from paramx import lipschitz
tree = {{}}
for i in range(6):
    tree[f"k{{i}}"] = jax.random.normal(jax.random.key(i), {shape}) * 0.1
    tree = {register}
params, state = px.split_state(tree)
loss = lambda p: sum(jnp.sum(v ** 2) for v in jax.tree.leaves(px.materialize(p, state)))
step = jax.jit(jax.grad(loss))
for _ in range(20):
    jax.block_until_ready(step(params))
print("ok")
"""
HANGS = {
    # Cayley convolutions of 16x16 inputs, 8 channels: a complex LU over 144 frequencies per
    # layer. Before numerics.lapack chunked it: hung within the first steps, 3 of 3 runs.
    "cayley_conv": ((16, 16, 8, 8), 'lipschitz.cayley_conv(tree, f"k{i}")'),
    # Stacks of 16 Cayley-orthogonal 64x64 kernels: vmap over the stack makes one LU over 16
    # matrices per layer. Before stacks.per_tensor chunked it: hung 2 of 2 runs (60 s).
    "batch_axes_stack": (
        (16, 64, 64),
        'px.register_parametrization(tree, f"k{i}", px.Orthogonal("cayley"), batch_axes=1)',
    ),
}


@pytest.mark.parametrize("case", sorted(HANGS))
def test_independent_batched_factorizations_in_one_step_do_not_hang(case):
    shape, register = HANGS[case]
    script = _SIX_LAYER_STEP.format(shape=shape, register=register)
    try:
        out = run_python("-c", script, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a training step with six {case} layers hung (no result in 300 s)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def _batch(shape, dtype, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = lax.complex(x, jax.random.normal(jax.random.key(seed + 1), shape, jnp.float64))
    return (x + (4 * jnp.broadcast_to(jnp.eye(shape[-1]), shape)).astype(x.dtype)).astype(dtype)


_LAPACK_PRIMITIVES = (
    "lu",
    "qr",
    "svd",
    "eig",
    "eigh",
    "geqrf",
    "householder_product",
    "cholesky",
    "triangular_solve",
)


def _lapack_calls(closed):
    """``(batch size, per-matrix work estimate)`` of every LAPACK-backed call in a jaxpr."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _LAPACK_PRIMITIVES:
                aval = eqn.invars[0].aval
                yield math.prod(aval.shape[:-2]), stacks.lapack_flops(aval.shape, aval.dtype)
            for sub in jaxprs_in_params(eqn.params):
                yield from walk(getattr(sub, "jaxpr", sub))

    return list(walk(closed.jaxpr))


def _lapack_batches(fn, *xs):
    """The batch size of every LAPACK-backed call in the jaxpr of ``numerics.lapack(fn, *xs)``."""
    closed = jax.make_jaxpr(lambda *xs: numerics.lapack(fn, *xs))(*xs)
    return [batch for batch, _ in _lapack_calls(closed)]


def _chunked(fn, *xs):
    """Whether ``numerics.lapack`` splits this call into calls under jaxlib's threshold."""
    work = max(stacks.lapack_flops(x.shape, x.dtype) for x in xs)
    per_call = (stacks.LAPACK_TASK_FLOPS - 1) // work
    batches = _lapack_batches(fn, *xs)
    return max(batches) <= max(per_call, 1) < math.prod(xs[0].shape[:-2])


CASES = {
    "svd": lambda x: jnp.linalg.svd(x, compute_uv=False),
    "svd_uv": lambda x: jnp.abs(jnp.linalg.svd(x, full_matrices=False)[0]),
    "lu": lambda x: lax.linalg.lu(x)[0],
    "qr": lambda x: jnp.abs(jnp.linalg.qr(x)[1]),
    "eigvalsh": lambda x: jnp.linalg.eigvalsh(x + jnp.swapaxes(x, -1, -2).conj()),
    "cholesky": lambda x: jnp.linalg.cholesky(x @ jnp.swapaxes(x, -1, -2).conj()),
    "det": jnp.linalg.det,
}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_calls_equal_one_call(name, dtype):
    fn = CASES[name]
    # 2x3x47 = 282 matrices of 12x12: about 17,000 flops each by jaxlib's SVD estimate, so 11
    # (real) or 3 (complex) per chunk, with a remainder; both over the threshold.
    x = _batch((2, 3, 47, 12, 12), dtype)
    assert _chunked(fn, x)
    got = jax.jit(lambda x: numerics.lapack(fn, x))(x)
    want = jax.jit(fn)(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, scale=1e3)


def test_a_batch_under_the_threshold_is_one_call():
    x = _batch((4, 12, 12), jnp.float64)
    assert _lapack_batches(jnp.linalg.det, x) == [4]
    assert str(jax.make_jaxpr(lambda x: numerics.lapack(jnp.linalg.det, x))(x)) == str(
        jax.make_jaxpr(jnp.linalg.det)(x)
    )


@pytest.mark.parametrize("lanes", [1, 3, 8])
def test_chunks_side_by_side_equal_one_call(lanes, monkeypatch):
    """On a machine with ``lanes`` CPUs: that many calls per step of the loop, and a rest."""
    monkeypatch.setattr(stacks, "lanes", lambda: lanes)
    x = _batch((5, 61, 12, 12), jnp.float64)  # 305 matrices, 11 per call
    assert max(_lapack_batches(jnp.linalg.slogdet, x)) <= 11
    got = jax.jit(lambda x: numerics.lapack(jnp.linalg.slogdet, x))(x)
    want = jnp.linalg.slogdet(x)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], scale=10)


def test_chunked_gradients_and_vmap_equal_one_call():
    a = _batch((300, 6, 6), jnp.float64, seed=3)
    b = _batch((300, 6, 6), jnp.float64, seed=5)

    def loss(a, solve):
        return jnp.sum(jnp.sin(solve(a, b)))

    direct = jax.jit(jax.grad(lambda a: loss(a, jnp.linalg.solve)))(a)
    chunks = jax.jit(
        jax.grad(lambda a: loss(a, lambda a, b: numerics.lapack(jnp.linalg.solve, a, b)))
    )(a)
    assert _chunked(jnp.linalg.solve, a, b)
    assert_close(chunks, direct, scale=1e2)
    stacked = jnp.stack([a, a + 1])
    got = jax.vmap(lambda a: numerics.lapack(jnp.linalg.det, a))(stacked)
    assert_close(got, jnp.linalg.det(stacked), scale=1e3)


def test_matrices_with_other_batch_shapes_are_one_call():
    """Broadcasting operands (a batch against one matrix) are left to ``fn`` as they are."""
    a = _batch((300, 6, 6), jnp.float64)
    b = jnp.ones((1, 6, 2))
    assert max(_lapack_batches(jnp.linalg.solve, a, b)) == 300
    assert_close(numerics.lapack(jnp.linalg.solve, a, b), jnp.linalg.solve(a, b))


# ----- stacks of tensors: vmap over layers ----------------------------------------------------
# A parametrization's own chunking sees one tensor: ``jax.vmap`` over a stack (``batch_axes``,
# ``nn.vmap`` layers, ``materialize(batch=True)``) multiplies each of its LAPACK calls by the
# stack size; ``stacks.per_tensor`` keeps the vmapped calls under the threshold.


def _stack(layers, n=24, dtype=jnp.float64):
    k = jax.random.normal(jax.random.key(2), (layers, n, n), dtype) * 0.3
    return {"k": k}


@pytest.mark.parametrize("how", ["batch_axes", "batch=True"])
def test_stacked_factorizations_stay_under_the_threshold_and_equal_per_layer(how):
    # 12 layers of 24x24 (138,240 flops each by jaxlib's estimate): one vmapped call over the
    # stack would be 12 times that; per_tensor runs one layer per call.
    layers = 12
    p = px.Orthogonal("cayley")
    if how == "batch_axes":
        tree = px.register_parametrization(_stack(layers), "k", p, batch_axes=1)
        params, state = px.split_state(tree)
        materialize = lambda pr: px.materialize(pr, state)["k"]
    else:
        k = _stack(layers)["k"]
        names = [f"k{i}" for i in range(layers)]
        tree = {n: k[i] for i, n in enumerate(names)}
        for n in names:
            tree = px.register_parametrization(tree, n, p)
        params, state = px.split_state(tree)
        materialize = lambda pr: jnp.stack(
            [px.materialize(pr, state, batch=True)[n] for n in names]
        )
    loss = lambda pr: jnp.sum(jnp.sin(materialize(pr)))
    calls = _lapack_calls(jax.make_jaxpr(jax.value_and_grad(loss))(params))
    assert calls and all(b * w < stacks.LAPACK_TASK_FLOPS for b, w in calls), calls
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    # The same layers one by one (no stack, no vmap).
    k = _stack(layers)["k"]
    want_value, want_grads = 0.0, []
    for i in range(layers):
        p_i, s_i = px.split_state(px.register_parametrization({"k": k[i]}, "k", p))
        v, g = jax.value_and_grad(
            lambda pr, s_i=s_i: jnp.sum(jnp.sin(px.materialize(pr, s_i)["k"]))
        )(p_i)
        want_value += v
        want_grads.append(jax.tree.leaves(g)[0])
    assert_close(value, want_value, scale=10)
    if how == "batch_axes":
        got = list(jax.tree.leaves(grads)[0])
    else:  # one node per layer, in the order of `names` (tree.leaves sorts k10 before k2)
        got = [jax.tree.leaves(grads[f"k{i}"])[0] for i in range(layers)]
    for g, w in zip(got, want_grads, strict=True):
        assert_close(g, w, scale=10)


def test_a_stack_without_factorizations_is_one_vmap():
    tree = px.register_parametrization(_stack(12), "k", px.WeightNorm(), batch_axes=1)
    params, state = px.split_state(tree)
    text = str(jax.make_jaxpr(lambda pr: px.materialize(pr, state))(params))
    assert "while" not in text and "scan" not in text


def test_cpu_work_on_an_accelerator_host_is_chunked_too(monkeypatch):
    # On a GPU host the default backend is "gpu", but work placed on the CPU with
    # jax.default_device meets jaxlib's thread pool all the same.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not stacks.on_cpu()
    for device in (jax.devices("cpu")[0], "cpu"):
        with jax.default_device(device):
            assert stacks.on_cpu()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert stacks.on_cpu()
