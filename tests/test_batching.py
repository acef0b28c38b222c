"""Batched materialization (``materialize(..., batch=)``, ``paramx/_src/core/batching.py``).

Equal parametrized tensors (equal chains, equal shapes and dtypes) are computed in one vmapped
call; values, new state and gradients must be those of the per-tensor computation, and anything
that cannot be batched falls back to it.
"""

import dataclasses
import json
import os

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

import paramx as px
from paramx._src.core import batching
from paramx._src.core.node import is_node

TOL = 1e-12  # float64 (conftest enables x64): batched products may round differently


def layers(n, shape, dtype=jnp.float64, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return {f"l{i}": {"kernel": jax.random.normal(k, shape, dtype)} for i, k in enumerate(keys)}


def step_outputs(tree, batch):
    """Loss, gradients, new state and values of a jitted training-style step."""
    params, state = px.split_state(tree)

    def loss_fn(params):
        plain, new = px.materialize(params, state, update_state=True, batch=batch)
        leaves = jax.tree.leaves(plain)
        loss = sum(jnp.sum(jnp.sin(x) * (i + 1)) for i, x in enumerate(leaves))
        return loss, (new, plain)

    (loss, (new, plain)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, grads, new, plain


def assert_trees_close(a, b, what):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what} at {path}"
        scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
        err = float(np.max(np.abs(x - y), initial=0.0)) / scale
        assert err <= TOL, f"{what} at {jax.tree_util.keystr(path)}: error {err:.3g}"


def at(*names):
    """Selects the top-level keys ``names``."""
    return lambda path, x: px.path_keys(path)[0] in names


def grouped(tree, batch=True, shardings_targets=None):
    """Which node paths ``batched_values`` computed in groups."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    targets = shardings_targets or [None] * len(flat)
    done = batching.batched_values(flat, targets, False, batch)
    return sorted(jax.tree_util.keystr(flat[i][0]) for i in done)


BUILTINS = [
    ("orthogonal", px.Orthogonal(), (6, 6)),
    ("orthogonal_tall_cayley", px.Orthogonal("cayley"), (7, 4)),
    ("orthogonal_householder", px.Orthogonal("householder", use_trivialization=False), (5, 3)),
    ("spectral_norm", px.SpectralNorm(), (6, 4)),
    ("weight_norm", px.WeightNorm(), (5, 4)),
]


@pytest.mark.parametrize("p,shape", [b[1:] for b in BUILTINS], ids=[b[0] for b in BUILTINS])
def test_values_state_and_grads_equal_the_per_tensor_ones(p, shape):
    tree = px.register_parametrization(layers(5, shape), lambda path, x: True, p)
    assert len(grouped(tree)) == 5, "five equal tensors form one group"
    loss_b, grads_b, new_b, plain_b = step_outputs(tree, True)
    loss_p, grads_p, new_p, plain_p = step_outputs(tree, False)
    assert abs(float(loss_b) - float(loss_p)) <= TOL * max(1.0, abs(float(loss_p)))
    assert_trees_close(plain_b, plain_p, "value")
    assert_trees_close(new_b, new_p, "new state")
    assert_trees_close(grads_b, grads_p, "gradient")


def _primitives(jaxpr):
    """The names of every primitive in ``jaxpr`` and the jaxprs nested in it."""
    from jax.extend.core import jaxprs_in_params

    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for sub in jaxprs_in_params(eqn.params):
            yield from _primitives(getattr(sub, "jaxpr", sub))


def test_a_group_is_split_and_stacked_without_constant_offset_slices():
    """XLA:CPU compiles each distinct kernel once: slices at constant offsets (``jnp.split``
    for the values, the transpose of ``jnp.stack`` for the gradients) are one kernel per tensor,
    which made a group of 64 small weight-norm layers compile twice as slowly as the layers one
    by one (4.1 s against 2.1 s). The group's forward and backward read its pieces by one slice
    with offsets XLA cannot fold."""
    tree = px.register_parametrization(layers(6, (4, 3)), lambda p, x: True, px.WeightNorm())
    params, _ = px.split_state(tree)

    def loss(params):
        plain = px.materialize(params, batch=True)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(plain))

    used = set(_primitives(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    assert "dynamic_slice" in used, used
    assert not used & {"slice", "split"}, used & {"slice", "split"}


@pytest.mark.parametrize("p", [px.WeightNorm(), px.SpectralNorm()], ids=["weight", "spectral"])
def test_forward_mode_through_a_group_equals_the_per_tensor_one(p):
    """The group's stack and split have their own derivative rules: forward mode (``jvp``)
    and forward-over-reverse give the per-tensor results."""
    tree = px.register_parametrization(layers(3, (4, 3)), lambda p, x: True, p)
    params, state = px.split_state(tree)
    tangent = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)

    def values(params, batch):
        return px.materialize(params, state, batch=batch)

    def loss(params, batch):
        return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(values(params, batch)))

    def forward_mode(batch):
        def jvp(p, t):
            return jax.jvp(lambda q: values(q, batch), (p,), (t,))

        def hvp(p, t):  # forward over reverse
            return jax.jvp(jax.grad(lambda q: loss(q, batch)), (p,), (t,))[1]

        return jax.jit(jvp)(params, tangent), jax.jit(hvp)(params, tangent)

    (jvp_b, hvp_b), (jvp_p, hvp_p) = forward_mode(True), forward_mode(False)
    assert_trees_close(jvp_b, jvp_p, "jvp")
    assert_trees_close(hvp_b, hvp_p, "forward-over-reverse")


def test_stacking_integer_leaves_under_forward_mode():
    """Integer leaves (a counter in a parametrization's state) pass through the group's stack
    and split under forward mode with float0 tangents (JAX does not call the rules for them)."""
    from paramx._src.core import stacks

    xs = [jnp.arange(3) + i for i in range(4)]

    def roundtrip(xs):
        return stacks.unstack(stacks.stack(xs))

    zeros = [np.zeros(3, jax.dtypes.float0)] * 4
    out, tangents = jax.jvp(roundtrip, (xs,), (zeros,))
    assert [np.asarray(x).tolist() for x in out] == [np.asarray(x).tolist() for x in xs]
    assert all(t.dtype == jax.dtypes.float0 and t.shape == (3,) for t in tangents)


def test_chains_stacks_and_mixed_groups():
    """A two-link chain with params, stacked tensors (``batch_axes``) and shapes that differ:
    equal ones are grouped, the rest computed one by one, and the results match."""
    tree = {f"a{k}": v for k, v in layers(3, (4, 4)).items()}
    tree |= {f"s{k}": v for k, v in layers(2, (3, 5, 5), seed=1).items()}
    tree |= {"odd": {"kernel": jnp.full((4, 3), 0.1)}}
    small = lambda path, x: px.path_keys(path)[0][0] in "ao"
    tree = px.register_parametrization(tree, small, px.SpectralNorm())
    tree = px.register_parametrization(tree, small, jnp.tanh, unsafe=True)  # a second link
    tree = px.register_parametrization(
        tree, lambda path, x: px.path_keys(path)[0][0] == "s", px.Orthogonal(), batch_axes=1
    )
    got = grouped(tree)
    assert got == sorted(
        [f"['a{k}']['kernel']" for k in ("l0", "l1", "l2")]
        + [f"['s{k}']['kernel']" for k in ("l0", "l1")]
    ), got
    for a, b in zip(step_outputs(tree, True), step_outputs(tree, False)):
        assert_trees_close(a, b, "chained / stacked step")


def test_plain_materialize_and_precompute_are_unchanged():
    tree = px.register_parametrization(layers(4, (3, 3)), lambda p, x: True, px.WeightNorm())
    plain_b = jax.jit(lambda t: px.materialize(t, batch=True))(tree)
    assert_trees_close(plain_b, px.materialize(tree, batch=False), "eager vs batched")
    assert_trees_close(px.materialize(tree, batch=True), px.precompute(tree), "precompute")


def test_chains_group_by_equality():
    def double(x):
        return 2 * x

    tree = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(3), "d": jnp.ones(3)}
    tree = px.register_parametrization(tree, at("a", "b"), double)
    tree = px.register_parametrization(tree, "c", lambda x: 2 * x)  # another function object
    tree = px.register_parametrization(tree, "d", px.Parametrization(forward=double))
    assert grouped(tree) == ["['a']", "['b']"], "a plain function compares by identity"

    # Frozen dataclasses compare by their options.
    tree = {k: jnp.ones((3, 3)) for k in "abc"}
    tree = px.register_parametrization(tree, at("a", "b"), px.Orthogonal("cayley"))
    tree = px.register_parametrization(tree, "c", px.Orthogonal("householder"))
    assert grouped(tree) == ["['a']", "['b']"]
    # dtypes and shapes must match too.
    tree = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3), jnp.float32), "c": jnp.ones((3, 4))}
    tree = px.register_parametrization(tree, at("a", "b", "c"), jnp.tanh, unsafe=True)
    assert grouped(tree) == []


@dataclasses.dataclass  # eq=True without frozen: unhashable
class Unhashable:
    scale: float = 2.0

    def forward(self, x):
        return self.scale * x


@dataclasses.dataclass(frozen=True)
class ArrayOption:  # == between two instances gives an array, whose truth value raises
    scale: object

    def forward(self, x):
        return self.scale * x


def test_unhashable_and_non_comparable_chains_are_computed_one_by_one():
    tree = {k: jnp.ones(3) for k in "ab"}
    tree = px.register_parametrization(tree, at("a", "b"), Unhashable(), unsafe=True)
    assert grouped(tree) == []
    assert_trees_close(px.materialize(tree, batch=True), {k: 2 * jnp.ones(3) for k in "ab"}, "")

    entries = [
        ((jax.tree_util.DictKey(k),), px.Parametrized((jnp.ones(3),), (ArrayOption(np.ones(3)),)))
        for k in "ab"
    ]
    assert batching.batched_values(entries, [None, None], False, True) == {}


def test_a_link_that_cannot_be_vmapped_falls_back_and_errors_name_the_path():
    def positive_only(x):
        if float(jnp.min(x)) < 0:  # reads a concrete value: not traceable, not vmappable
            raise ValueError("this link needs nonnegative inputs")
        return jnp.sqrt(x)

    tree = {"a": jnp.ones(3), "b": jnp.full(3, 4.0), "c": -jnp.ones(3)}
    tree = px.register_parametrization(tree, at("a", "b"), positive_only, unsafe=True)
    out = px.materialize(tree, batch=True)  # eager: each tensor on its own, as before
    assert_trees_close(out, {"a": jnp.ones(3), "b": jnp.full(3, 2.0), "c": -jnp.ones(3)}, "")

    tree = {"a": jnp.ones(3), "b": -jnp.ones(3)}
    tree = px.register_parametrization(tree, at("a", "b"), positive_only, unsafe=True)
    with pytest.raises(ValueError, match=r"nonnegative.*\bat b\b"):
        px.materialize(tree, batch=True)


def test_a_failing_group_is_rerun_per_tensor_so_the_error_names_its_path():
    """Under jit, equal tensors fail alike: the error is the per-tensor one, naming the first."""

    def broken(x):
        raise ValueError("this link is broken")

    tree = {"a": jnp.eye(3), "b": jnp.eye(3)}
    tree = px.register_parametrization(tree, at("a", "b"), broken, unsafe=True)
    with pytest.raises(ValueError, match=r"broken \(at a\)"):
        jax.jit(lambda t: px.materialize(t, batch=True))(tree)


def test_host_callbacks_in_a_link():
    calls = []

    def logged(x):
        jax.debug.callback(lambda v: calls.append(np.shape(v)), x)
        return jnp.tanh(x)

    tree = {k: jnp.full(2, 0.5) for k in "abc"}
    tree = px.register_parametrization(tree, at("a", "b", "c"), logged, unsafe=True)
    out = jax.jit(lambda t: px.materialize(t, batch=True))(tree)
    jax.effects_barrier()
    assert_trees_close(out, {k: jnp.tanh(jnp.full(2, 0.5)) for k in "abc"}, "")
    assert len(calls) in (1, 3), calls  # per tensor or once for the stack: both fine

    def ordered(x):
        return jax.experimental.io_callback(lambda v: v, x, x, ordered=True) * 2

    tree = {k: jnp.ones(2) for k in "ab"}
    tree = px.register_parametrization(tree, at("a", "b"), ordered, unsafe=True)
    out = jax.jit(lambda t: px.materialize(t, batch=True))(tree)  # not vmappable: per tensor
    assert_trees_close(out, {k: 2 * jnp.ones(2) for k in "ab"}, "")


def test_auto_is_per_tensor_on_cpu_and_bad_values_are_refused():
    tree = px.register_parametrization(layers(3, (3, 3)), lambda p, x: True, px.WeightNorm())
    want = [f"['l{i}']['kernel']" for i in range(3)]
    assert grouped(tree, "auto") == (want if jax.default_backend() != "cpu" else [])
    assert grouped(tree, False) == []
    with pytest.raises(ValueError, match="batch"):
        px.materialize(tree, batch="yes")


def test_nodes_with_a_sharding_target_are_computed_one_by_one():
    tree = px.register_parametrization(layers(3, (3, 3)), lambda p, x: True, px.WeightNorm())
    s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = [s, None, None]
    assert grouped(tree, True, targets) == ["['l1']['kernel']", "['l2']['kernel']"]
    shardings = jax.tree.map(lambda x: x.sharding, tree)
    out = jax.jit(lambda t: px.materialize(t, shardings=shardings, batch=True))(tree)
    assert_trees_close(out, px.materialize(tree, batch=False), "with shardings")


SHARDED = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import paramx as px
from paramx._src.core import batching
from paramx._src.core.node import is_node

R = {}
keys = jax.random.split(jax.random.key(0), 4)
raw = {f"l{i}": jax.random.normal(k, (16, 32), jnp.float32) for i, k in enumerate(keys)}
tree = px.register_parametrization(raw, lambda p, x: True, px.SpectralNorm())
first_two = lambda p, x: px.path_keys(p)[0] in ("l0", "l1")
tree = px.register_parametrization(tree, first_two, px.Orthogonal(), unsafe=True)
params, state = px.split_state(tree)

def step(shardings, batch):
    @jax.jit
    def run(params, state):
        def loss_fn(params):
            plain, new = px.materialize(params, state, update_state=True, shardings=shardings,
                                        batch=batch)
            return sum(jnp.sum(jnp.sin(v) * (i + 1)) for i, v in enumerate(plain.values())), (
                new, plain)
        (loss, (new, plain)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, new, plain, grads
    return run

def err(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

ref = step(None, False)(params, state)
for mode in ("auto", "explicit"):
    axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model")))
    sp, ss = jax.tree.map(put, params), jax.tree.map(put, state)
    shardings = None
    if mode == "auto":
        shardings = jax.tree.map(lambda x: x.sharding, px.merge_state(sp, ss))
    outs = {b: step(shardings, b)(sp, ss) for b in (False, True)}
    R[f"{mode}/err_vs_one_device"] = err(outs[True], ref)
    R[f"{mode}/err_vs_per_tensor"] = err(outs[True], outs[False])
    same = [a.sharding.is_equivalent_to(b.sharding, a.ndim)
            for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False]))]
    R[f"{mode}/same_shardings"] = all(same)
    # concrete sharded arrays (eager, no `shardings=`) are never stacked
    merged = px.merge_state(sp, ss)
    flat, _ = jax.tree_util.tree_flatten_with_path(merged, is_leaf=is_node)
    R[f"{mode}/eager_groups"] = len(batching.batched_values(
        flat, [None] * len(flat), False, True))
    R[f"{mode}/unsharded_groups"] = len(batching.batched_values(
        jax.tree_util.tree_flatten_with_path(
            px.merge_state(params, state), is_leaf=is_node)[0], [None] * 4, False, True))

# Single-device arrays on different devices, or committed to one and not: never stacked
# (eagerly, stacking would move the uncommitted one and commit it to the other's device).
d0, d1 = jax.devices()[:2]
ones = jnp.ones((4, 4))
for name, b in (("other_device", jax.device_put(ones, d1)), ("committed", jax.device_put(ones, d0)),
                ("same", 2 * ones)):
    t = px.register_parametrization({"a": ones, "b": b}, lambda p, x: True, px.WeightNorm())
    a = px.materialize(t, batch=True)["a"]
    R[f"placement/{name}/device"] = [d.id for d in a.devices()]
    R[f"placement/{name}/committed"] = a.committed
    flat = jax.tree_util.tree_flatten_with_path(t, is_leaf=is_node)[0]
    R[f"placement/{name}/groups"] = len(batching.batched_values(flat, [None] * 2, False, True))
print("RESULTS " + json.dumps(R))
"""


def test_sharded_trees_give_the_per_tensor_values_and_shardings():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", flags.strip())
        mp.setenv("JAX_PLATFORMS", "cpu")
        run = run_python("-c", SHARDED, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULTS ")]
    r = json.loads(line[len("RESULTS ") :])
    for mode in ("auto", "explicit"):
        assert r[f"{mode}/err_vs_one_device"] < 1e-4, r
        assert r[f"{mode}/err_vs_per_tensor"] == 0.0, r
        assert r[f"{mode}/same_shardings"], r
        assert r[f"{mode}/eager_groups"] == 0, r
        assert r[f"{mode}/unsharded_groups"] == 4, r  # two groups of two
    for name in ("other_device", "committed", "same"):
        assert r[f"placement/{name}/device"] == [0], (name, r)
        assert r[f"placement/{name}/committed"] is False, (name, r)
    assert r["placement/other_device/groups"] == r["placement/committed/groups"] == 0, r
    assert r["placement/same/groups"] == 2, r
