"""Sharding: materialize on parameters sharded over a device mesh, and data-parallel training.

The multi-device checks need 8 simulated CPU devices, which must be requested before JAX starts,
so they run in ONE fresh interpreter (``run_python`` with ``XLA_FLAGS``). That script computes
every number once and prints them as JSON; each test below asserts its share with a message
naming what went wrong. The single-device tests at the end run in this process.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, run_python

import paramx as px

SCRIPT = r'''
import contextlib
import json
import time
import traceback

T0 = time.time()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import paramx as px

R = {"errors": {}}  # name -> number, bool or string; the tests assert on them


def record(name, value):
    R[name] = value


@contextlib.contextmanager
def section(name):
    """A failing section is recorded, and the others still run."""
    try:
        yield
    except Exception:
        R["errors"][name] = traceback.format_exc()[-3000:]


def err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_err(a, b):
    return max(err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def same(a, b):
    return bool(a.is_equivalent_to(b, 2))


record("device_count", jax.device_count())

# ----- part 1: materialize on sharded originals ------------------------------------------------
ks = jax.random.split(jax.random.key(0), 2)
wide = jax.random.normal(ks[0], (16, 32), jnp.float32)
tall = jax.random.normal(ks[1], (32, 16), jnp.float32)
raw = {
    "orth_exp": wide,
    "orth_householder": tall,
    "spectral": wide,
    "weight": wide,
    "tanh": 0.5 * jnp.tanh(wide),
    "plain": wide,
}


@jax.jit
def register(tree):
    tree = px.orthogonal(tree, "orth_exp", "matrix_exp")
    tree = px.orthogonal(tree, "orth_householder", "householder")
    tree = px.spectral_norm(tree, "spectral")
    tree = px.weight_norm(tree, "weight")
    tanh = px.Parametrization(forward=jnp.tanh, right_inverse=jnp.arctanh, name="tanh")
    return px.register_parametrization(tree, "tanh", tanh)


params, state = px.split_state(register(raw))
coef = {k: jnp.sin(jnp.arange(v.size, dtype=jnp.float32)).reshape(v.shape) for k, v in raw.items()}


def make_step(shardings=None):
    @jax.jit
    def step(params, state):
        def loss_fn(params):
            plain, new = px.materialize(params, state, update_state=True, shardings=shardings)
            return sum(jnp.sum(coef[k] * plain[k] ** 2) for k in plain), (new, plain)

        (loss, (new, plain)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, new, plain, grads

    return step


ref_loss, ref_state, ref_plain, ref_grads = make_step()(params, state)
ref_eval = px.precompute(px.merge_state(params, state))  # no state update


def put(x, mesh, spec):
    """Shards a 2-D array along the axes of ``spec`` that divide it; anything else replicated."""
    if np.ndim(x) != 2:
        return jax.device_put(x, NamedSharding(mesh, P()))
    axes = [a if a is None or x.shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)]
    return jax.device_put(x, NamedSharding(mesh, P(*axes)))


def wanted(node, shape):
    """The sharding a materialized leaf should have: its original's of the same shape."""
    if isinstance(node, px.Parametrized):
        return [x for x in node.originals if x.shape == shape][0].sharding
    return node.sharding


def check(tag, sp, ss, loss, new, plain, grads):
    for k, v in plain.items():
        want = wanted(sp[k], v.shape)
        record(f"{tag}/{k}/value_err", err(v, ref_plain[k]))
        record(f"{tag}/{k}/kept", same(v.sharding, want))
        record(f"{tag}/{k}/specs", f"got {v.sharding.spec}, original {want.spec}")
    record(f"{tag}/loss_rel_err", err(loss, ref_loss) / abs(float(ref_loss)))
    record(f"{tag}/grads_err", tree_err(grads, ref_grads))
    record(f"{tag}/state_err", tree_err(new, ref_state))
    kept = jax.tree.map(lambda g, p: same(g.sharding, p.sharding), grads, sp)
    bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_leaves_with_path(kept) if not ok]
    record(f"{tag}/grads_not_kept", bad)
    kept = jax.tree.map(lambda a, b: same(a.sharding, b.sharding), new, ss)
    bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_leaves_with_path(kept) if not ok]
    record(f"{tag}/state_not_kept", bad)


configs = (
    ("auto", "model8", (8,), ("model",), (None, "model")),
    ("auto", "data2xmodel4", (2, 4), ("data", "model"), ("data", "model")),
    ("explicit", "data2xmodel4", (2, 4), ("data", "model"), ("data", "model")),
)
for mode, mesh_name, shape, names, spec in configs:
    tag = f"{mode}/{mesh_name}"
    with section(tag):
        axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
        mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
        sp = jax.tree.map(lambda x, mesh=mesh, spec=spec: put(x, mesh, spec), params)
        ss = jax.tree.map(lambda x, mesh=mesh, spec=spec: put(x, mesh, spec), state)
        # auto: the opt-in, the shardings of the merged tree taken outside jit (with the state's,
        # so that the new state keeps them too); explicit: nothing to pass, they are in the types
        shardings = None
        if mode == "auto":
            shardings = jax.tree.map(lambda x: x.sharding, px.merge_state(sp, ss))
        check(tag, sp, ss, *make_step(shardings)(sp, ss))
        if tag == "auto/model8":
            plain = px.precompute(px.merge_state(sp, ss))
            for k, v in plain.items():
                record(f"{tag}/cached/{k}/value_err", err(v, ref_eval[k]))
                record(f"{tag}/cached/{k}/kept", same(v.sharding, wanted(sp[k], v.shape)))

# Registering on kernels that are already sharded explicitly: QR (orthogonal's base) and the
# power iteration's products do not type-check there, so registration runs its work through
# `chain.run_auto` itself (auto mode over the axes in use, originals resharded like the kernel).
mesh = jax.make_mesh((2, 4), ("data", "model"))  # explicit axes, jax.make_mesh's default
kernel = jax.device_put(wide, NamedSharding(mesh, P("data", "model")))
for name, fn, how in (
    ("orthogonal", lambda t: px.orthogonal(t, "w"), "jit"),
    ("spectral_norm", lambda t: px.spectral_norm(t, "w"), "eager"),
):
    tag = f"register_explicit/{name}/{how}"
    with section(tag):
        reg = lambda k, fn=fn: fn({"w": k})
        got = (jax.jit(reg) if how == "jit" else reg)(kernel)
        record(f"{tag}/err", tree_err(got, fn({"w": wide})))
        record(f"{tag}/kept", same(got["w"].original.sharding, kernel.sharding))

# Explicitly sharded arrays closed over by a jitted function (concrete there, but inside a
# trace: no `jax.set_mesh`), and the health figures of `px.table` (the chain's work runs in
# auto mode, as in `materialize`).
for name, p in (("orthogonal", px.Orthogonal()), ("spectral_norm", px.SpectralNorm())):
    tree = px.register_parametrization({"w": kernel}, "w", p)
    params, state = px.split_state(tree)
    one = px.register_parametrization({"w": wide}, "w", p)  # one device
    params1, state1 = px.split_state(one)
    ref = px.materialize(params1, state1)["w"]
    tag = f"closure/{name}"
    with section(tag):
        got = jax.jit(lambda q, state=state: px.materialize(q, state))(params)["w"]
        record(f"{tag}/err", err(got, ref))
        record(f"{tag}/kept", same(got.sharding, kernel.sharding))
        loss = lambda q, s: jnp.sum(px.materialize(q, s)["w"] * ref)
        g = jax.jit(jax.grad(lambda q, state=state: loss(q, state)))(params)["w"].original
        g1 = jax.jit(jax.grad(lambda q, state=state1: loss(q, state)))(params1)["w"].original
        record(f"{tag}/grad_err", err(g, g1))
    tag = f"table/{name}"
    with section(tag):
        figures = px.table(tree).health["w"]
        plain = px.table(one).health["w"]
        record(f"{tag}/err", max(err(figures[k], plain[k]) for k in plain))
        record(f"{tag}/names", sorted(figures))
record("time_part1", time.time() - T0)

# ----- part 2: data-parallel training with spectral norm -------------------------------------
n_dev, steps, lr = 8, 5, 0.1
xk, yk, wk1, wk2, uk = jax.random.split(jax.random.key(1), 5)
x = jax.random.normal(xk, (64, 8), jnp.float32)
y = jnp.sin(x[:, :1] * 2.0)
base = {
    "w1": jax.random.normal(wk1, (8, 16), jnp.float32),
    "w2": 0.3 * jax.random.normal(wk2, (16, 1), jnp.float32),
}


def apply(plain, x):
    return jnp.tanh(x @ plain["w1"]) @ plain["w2"]


def local_step(params, state, x, y, axis_name):
    def loss_fn(params):
        plain, new = px.materialize(params, state, update_state=True)
        return jnp.mean((apply(plain, x) - y) ** 2), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return params, new, loss


_registered = {}


def registered(axis_name):
    if axis_name not in _registered:
        tree = jax.jit(lambda t: px.spectral_norm(t, "w1", axis_name=axis_name))(base)
        _registered[axis_name] = px.split_state(tree)
    return _registered[axis_name]


# single device, full batch (no named axis exists there, so no axis_name)
p_ref, s_ref = registered(None)
one = jax.jit(lambda p, s: local_step(p, s, x, y, None))
for _ in range(steps):
    p_ref, s_ref, _ = one(p_ref, s_ref)

dmesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Auto,))


_runs = {}


def replicated_run(axis_name, stacked_state):
    """shard_map over 'data': each replica has its own batch shard and its own copy of the
    state (one row of ``stacked_state`` each); returns params and every replica's u, v."""
    params, _ = registered(axis_name)

    def replica(params, state, x, y):
        local = jax.tree.map(lambda a: a[0], state)
        params, new, loss = local_step(params, local, x, y, "data")
        return params, jax.tree.map(lambda a: a[None], new), loss

    if axis_name not in _runs:
        _runs[axis_name] = jax.jit(
            jax.shard_map(
                replica,
                mesh=dmesh,
                in_specs=(P(), P("data"), P("data"), P("data")),
                out_specs=(P(), P("data"), P()),
                check_vma=False,
            )
        )
    state = stacked_state
    for _ in range(steps):
        params, state, _ = _runs[axis_name](params, state, x, y)
    return params, state


def node_state(s):
    return s["w1"]["0"]


_, s0 = registered(None)
same_start = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev, *a.shape)), s0)


def unit_rows(key, n):
    v = jax.random.normal(key, (n_dev, n), jnp.float32)
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


# each replica drew its own u, v (say, registered inside shard_map with a per-device key)
ku, kv = jax.random.split(uk)
own_start = {"w1": {"0": {"u": unit_rows(ku, 16), "v": unit_rows(kv, 8)}}, "w2": None}


def spread(stacked):
    """Largest difference between any replica's copy and replica 0's, over u and v."""
    uv = node_state(stacked)
    return max(err(uv[k][i], uv[k][0]) for k in ("u", "v") for i in range(n_dev))


for label, start in (("same_start", same_start), ("own_start", own_start)):
    for named in (True, False):
        tag = f"dp/{label}/{'axis_name' if named else 'no_axis_name'}"
        with section(tag):
            params_dp, state_dp = replicated_run("data" if named else None, start)
            record(f"{tag}/replica_spread", spread(state_dp))
            if label == "same_start":
                uv = node_state(state_dp)
                record(
                    f"{tag}/vs_single_device",
                    max(err(uv[k][0], node_state(s_ref)[k]) for k in ("u", "v")),
                )
                record(f"{tag}/params_vs_single_device", tree_err(params_dp, p_ref))

# GSPMD data parallel: one jitted step, batch sharded, params replicated
with section("gspmd"):
    p_g, s_g = registered(None)
    xs = jax.device_put(x, NamedSharding(dmesh, P("data")))
    ys = jax.device_put(y, NamedSharding(dmesh, P("data")))
    rep = NamedSharding(dmesh, P())
    p_g, s_g = jax.device_put((p_g, s_g), rep)
    gspmd = jax.jit(lambda p, s, x, y: local_step(p, s, x, y, None))
    for _ in range(steps):
        p_g, s_g, _ = gspmd(p_g, s_g, xs, ys)
    record("gspmd/params_vs_single_device", tree_err(p_g, p_ref))
    record("gspmd/state_vs_single_device", tree_err(s_g, s_ref))
    record("gspmd/batch_shards", len(xs.addressable_shards[0].data))
record("time_total", time.time() - T0)
print("RESULTS " + json.dumps(R))
'''

CONFIGS = ("auto/model8", "auto/data2xmodel4", "explicit/data2xmodel4")
LEAVES = ("orth_exp", "orth_householder", "spectral", "weight", "tanh", "plain")
F32 = 1e-5  # float32 tolerance (the script runs with JAX's defaults: float32)


def get(results, key):
    """A number the script computed; if it is missing, the error of the section that failed."""
    if key not in results:
        errors = [
            f"{name}:\n{tb}" for name, tb in results["errors"].items() if key.startswith(name)
        ]
        raise AssertionError(f"{key} was not computed. " + ("\n".join(errors) or "No error."))
    return results[key]


@pytest.fixture(scope="module")
def results():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", flags.strip())
        mp.setenv("JAX_PLATFORMS", "cpu")  # 8 simulated CPU devices, also on a GPU machine
        run = run_python("-c", SCRIPT, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    [line] = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS ") :])


def test_the_script_saw_eight_devices(results):
    assert get(results, "device_count") == 8, "XLA_FLAGS did not reach the fresh interpreter"


@pytest.mark.parametrize("config", CONFIGS)
def test_materialized_values_match_one_device_and_keep_the_originals_shardings(results, config):
    for leaf in LEAVES:
        tag = f"{config}/{leaf}"
        assert get(results, f"{tag}/value_err") <= F32, f"{tag}: value differs from one device"
        assert get(results, f"{tag}/kept"), f"{tag}: sharding not kept ({results[f'{tag}/specs']})"


@pytest.mark.parametrize("config", CONFIGS)
def test_train_step_grads_and_state_keep_shardings_and_match_one_device(results, config):
    assert get(results, f"{config}/loss_rel_err") <= F32, f"{config}: loss differs"
    assert get(results, f"{config}/grads_err") <= 10 * F32, f"{config}: gradients differ"
    assert get(results, f"{config}/state_err") <= F32, f"{config}: new state differs"
    assert get(results, f"{config}/grads_not_kept") == [], f"{config}: grads resharded"
    assert get(results, f"{config}/state_not_kept") == [], f"{config}: new state resharded"


def test_registering_on_explicitly_sharded_kernels(results):
    for tag in ("orthogonal/jit", "spectral_norm/eager"):
        tag = f"register_explicit/{tag}"
        assert get(results, f"{tag}/err") <= F32, f"{tag}: registered tree differs from one device"
        assert get(results, f"{tag}/kept"), f"{tag}: the original lost the kernel's sharding"


def test_explicitly_sharded_arrays_closed_over_by_jit_and_their_table(results):
    for name in ("orthogonal", "spectral_norm"):
        tag = f"closure/{name}"
        assert get(results, f"{tag}/err") <= F32, f"{tag}: value differs from eager"
        assert get(results, f"{tag}/kept"), f"{tag}: the value lost the kernel's sharding"
        assert get(results, f"{tag}/grad_err") <= 10 * F32, f"{tag}: gradient differs"
        tag = f"table/{name}"
        assert get(results, f"{tag}/err") <= 10 * F32, f"{tag}: figures differ from one device"
        assert get(results, f"{tag}/names"), f"{tag}: no health figures"


def test_cached_keeps_the_originals_shardings(results):
    for leaf in LEAVES:
        tag = f"auto/model8/cached/{leaf}"
        assert get(results, f"{tag}/value_err") <= F32, f"{tag}: value differs from one device"
        assert get(results, f"{tag}/kept"), f"{tag}: sharding not kept"


def test_shard_map_spectral_norm_with_axis_name_keeps_replicas_identical(results):
    for start in ("same_start", "own_start"):
        tag = f"dp/{start}/axis_name"
        spread = get(results, f"{tag}/replica_spread")
        assert spread <= 1e-7, f"{tag}: replicas' u, v differ by {spread}"
    tag = "dp/same_start/axis_name"
    assert get(results, f"{tag}/vs_single_device") <= F32, f"{tag}: u, v differ from one device"
    assert get(results, f"{tag}/params_vs_single_device") <= F32, f"{tag}: params differ"


def test_shard_map_spectral_norm_without_axis_name_lets_replicas_diverge(results):
    # Replicas whose u, v start apart stay apart without axis_name...
    spread = get(results, "dp/own_start/no_axis_name/replica_spread")
    assert spread > 1e-2, f"replicas agree ({spread}) although nothing averages u, v"
    # ...while identical starts stay identical even without it: the power iteration reads
    # only W (identical, the gradients being averaged) and each replica's own u, v.
    assert get(results, "dp/same_start/no_axis_name/replica_spread") <= 1e-7


def test_gspmd_data_parallel_step_matches_one_device(results):
    assert get(results, "gspmd/batch_shards") == 8, "the batch was not split over 8 devices"
    assert get(results, "gspmd/params_vs_single_device") <= F32
    assert get(results, "gspmd/state_vs_single_device") <= F32


# ----- in this process (one device): the `shardings=` argument itself -------------------------


def _tree():
    tree = {"w": jnp.eye(3, dtype=jnp.float32), "b": jnp.ones(3, jnp.float32)}
    tree = px.orthogonal(tree, "w")
    return px.weight_norm(tree, "b", dim=None)


def test_shardings_in_node_form_or_value_form_change_nothing_on_one_device():
    tree = _tree()
    want = px.materialize(tree)
    node_form = jax.tree.map(lambda x: x.sharding, tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    value_form = {"w": device, "b": None}
    for shardings in (node_form, value_form):
        got = jax.jit(lambda t, s=shardings: px.materialize(t, shardings=s))(tree)
        jax.tree.map(assert_close, got, want)
        assert got["w"].sharding == tree["w"].original.sharding
    plain, _ = px.materialize(tree, update_state=True, shardings=node_form)
    jax.tree.map(np.testing.assert_array_equal, plain, want)


def test_shardings_of_another_tree_are_refused_with_a_hint():
    tree = _tree()
    with pytest.raises(ValueError, match="`shardings` does not match the tree"):
        px.materialize(tree, shardings={"w": None})
    with pytest.raises(ValueError, match="jax.sharding.Sharding"):
        px.materialize(tree, shardings={"w": "model", "b": None})
