"""paramx.nnx's contracts: user code runs once per call, torch-named functions come from what a
parametrization declares, no hidden module-level state, torch's signatures."""

import ast
import dataclasses
import inspect
import threading
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax import nnx

import paramx as px
import paramx.nnx as pnx
from paramx._src.integrations.nnx import cache as pnx_cache
from paramx._src.integrations.nnx import classes as pnx_classes
from paramx._src.integrations.nnx import run as pnx_run
from paramx._src.integrations.nnx import torch_function, torch_functions
from paramx._src.parametrizations import BUILTINS

F32 = jnp.float32
PACKAGE = Path(pnx_run.__file__).parent


class Counted:
    """A user parametrization (symmetric matrices) counting the runs of its functions."""

    def __init__(self, concrete=False, traceable=None):
        self.calls = {"forward": 0, "right_inverse": 0}
        self.concrete = concrete
        if traceable is not None:
            self.traceable = traceable

    def forward(self, x):
        self.calls["forward"] += 1
        return jnp.triu(x) + jnp.triu(x, 1).T

    def right_inverse(self, x):
        self.calls["right_inverse"] += 1
        if self.concrete:  # numpy: needs concrete values, cannot be traced
            return jnp.asarray(np.triu(np.asarray(x)))
        return jnp.triu(x)

    def reset(self):
        self.calls = dict.fromkeys(self.calls, 0)


# ----- (c) user code runs at most once per registration, read and assignment ----------------
@pytest.mark.parametrize("concrete", [False, True], ids=["jnp", "numpy"])
def test_a_user_parametrization_runs_once_per_call(concrete):
    p = Counted(concrete=concrete)
    layer = pnx.register_parametrization(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", p)
    assert p.calls == {"forward": 1, "right_inverse": 1}  # forward: the shape check
    assert layer.parametrizations.kernel.eager  # not declared traceable: run as written
    for i in range(3):
        p.reset()
        value = (i + 1.0) * jnp.eye(3, dtype=F32)
        layer.kernel = value
        assert p.calls == {"forward": 0, "right_inverse": 1}
        p.reset()
        assert_close(layer.kernel, value)
        assert p.calls == {"forward": 1, "right_inverse": 0}
    p.reset()
    pnx.remove_parametrizations(layer, "kernel")
    assert p.calls == {"forward": 1, "right_inverse": 0}


def test_a_traceable_user_parametrization_is_compiled_and_traced_at_most_once():
    p = Counted(traceable=True)
    layer = pnx.register_parametrization(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", p)
    assert not layer.parametrizations.kernel.eager
    assert p.calls["right_inverse"] == 1
    p.reset()
    first = layer.kernel
    again = [layer.kernel for _ in range(3)]
    assert p.calls["forward"] <= 1  # traced once, then the compiled program runs
    for k in again:
        assert_close(k, first)


def test_a_wrongly_declared_traceable_link_falls_back_once_and_is_remembered():
    p = Counted(concrete=True, traceable=True)  # declares traceable, but needs numpy
    layer = pnx.register_parametrization(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", p)
    plist = layer.parametrizations.kernel
    assert plist.eager  # the registration's failed trace is recorded on the tensor
    p.reset()
    layer.kernel = 2.0 * jnp.eye(3, dtype=F32)
    assert p.calls["right_inverse"] == 1  # no second compile attempt


def test_builtins_declare_traceable_and_compile():
    for cls in BUILTINS:
        assert cls.traceable is True
    layer = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    assert layer.parametrizations.kernel.eager is False
    pnx.register_parametrization(layer, "kernel", jnp.tanh)  # a plain function: eager
    assert layer.parametrizations.kernel.eager is True


# ----- (a) torch-named functions from declarations -------------------------------------------
OLD_SIGNATURES = {
    "orthogonal": "(module: 'nnx.Module', name: 'str' = 'kernel', orthogonal_map: 'str | None' = "
    "None, *, use_trivialization: 'bool' = True, expm_plan: 'str | None' = None, batch_axes: "
    "'int' = 0) -> 'nnx.Module'",  # expm_plan: a keyword added by issue 15 (device plans)
    "spectral_norm": "(module: 'nnx.Module', name: 'str' = 'kernel', n_power_iterations: 'int' = "
    "1, eps: 'float' = 1e-12, dim: 'int | None' = None, *, axis_name: 'Any' = None, key: "
    "'jax.Array | None' = None, batch_axes: 'int' = 0) -> 'nnx.Module'",
    "weight_norm": "(module: 'nnx.Module', name: 'str' = 'kernel', dim: 'int | None' = -1, *, "
    "batch_axes: 'int' = 0) -> 'nnx.Module'",
}


@pytest.mark.parametrize("name", list(OLD_SIGNATURES))
def test_torch_named_functions_keep_their_signatures_and_docstrings(name):
    fn = getattr(pnx, name)
    assert str(inspect.signature(fn)) == OLD_SIGNATURES[name]
    assert fn.__name__ == name and fn.__module__ == "paramx.nnx"
    doc = inspect.getdoc(fn)
    assert f"torch's\n``{name}``" in doc or f"torch's ``{name}``" in doc
    assert ">>> import paramx.nnx as pnx" in doc
    assert name in pnx.__all__


def test_every_builtin_that_declares_a_torch_function_is_offered():
    declared = {cls.torch_function for cls in BUILTINS if hasattr(cls, "torch_function")}
    assert declared >= set(OLD_SIGNATURES)  # and any built-in added since (symmetric)
    assert declared <= set(pnx.__all__)
    exported = {
        getattr(px, cls.__name__, None)
        or getattr(px.constraints, cls.__name__, None)
        or getattr(px.lipschitz, cls.__name__)
        for cls in BUILTINS
    }
    # the classes paramx (or paramx.constraints, paramx.lipschitz) exports
    assert exported == set(BUILTINS)


def test_positional_options_follow_torchs_order():
    layer = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "kernel", 3, 1e-6, 0)
    assert layer.parametrizations.kernel[0] == px.SpectralNorm(3, 1e-6, 0)
    layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", "cayley")
    assert layer.parametrizations.kernel[0] == px.Orthogonal("cayley")
    with pytest.raises(TypeError):
        pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "kernel", "cayley", False)


@dataclasses.dataclass(frozen=True)
class Scaled:
    """A new parametrization declaring its torch-named function: nothing else is needed."""

    factor: float = 2.0
    traceable = True
    torch_function = "scaled"
    torch_function_positional = ("factor",)
    torch_function_keyword = ()
    torch_function_takes_key = False
    nnx_doc = """Scales ``module.<name>``."""

    def forward(self, x):
        return self.factor * x

    def right_inverse(self, y):
        return y / self.factor


def test_a_declared_parametrization_gets_a_function_without_integration_code():
    scaled = torch_functions([Scaled, px.Parametrization])["scaled"]
    assert str(inspect.signature(scaled)).startswith("(module: 'nnx.Module', name: 'str' = ")
    assert scaled.__doc__ == "Scales ``module.<name>``."
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    scaled(layer, "kernel", 3.0)
    assert_close(layer.kernel, kernel)
    assert_close(layer.parametrizations.kernel.original[...], kernel / 3.0)


def test_a_bad_declaration_is_named():
    @dataclasses.dataclass(frozen=True)
    class Bad(Scaled):
        torch_function_positional = ("nope",)

    with pytest.raises(TypeError, match="nope"):
        torch_function(Bad)


# ----- (b) no hidden module-level state ----------------------------------------------------------
def _module_level_mutables(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                name = ast.unparse(d)
                if "cache" in name and "contextmanager" not in name:
                    found.append(f"{path.name}: @{name} on {node.name}")
        if "threading.local" in ast.unparse(node) if isinstance(node, ast.Attribute) else False:
            found.append(f"{path.name}: threading.local")
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            v = node.value
            call = ast.unparse(v.func) if isinstance(v, ast.Call) else ""
            if isinstance(v, (ast.Dict, ast.Set, ast.List)) or call in ("dict", "set", "list"):
                found.append(f"{path.name}: {ast.unparse(node)[:60]}")
    return found


def test_the_package_keeps_no_mutable_module_level_containers():
    found = [f for path in sorted(PACKAGE.glob("*.py")) for f in _module_level_mutables(path)]
    assert not found, found
    for name in ("_CACHE", "_EAGER", "_compiled", "_CLASSES"):
        assert not any(hasattr(m, name) for m in (pnx_run, pnx_cache, pnx_classes))


def test_the_compiled_programs_are_module_level_jits():
    for name in ("_REGISTER", "_ASSIGN", "_REMOVE", "_MATERIALIZE"):
        assert callable(getattr(pnx_run, name)) and hasattr(getattr(pnx_run, name), "lower")


def test_cached_is_scoped_to_the_with_block_and_nests_like_torch():
    layer = pnx.orthogonal(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    assert pnx_cache._SCOPE.get() is None
    with pnx.cached():
        a = layer.kernel
        with pnx.cached():
            assert layer.kernel is a  # nested blocks share one cache
        assert layer.kernel is a  # the inner block's exit keeps it
    assert pnx_cache._SCOPE.get() is None  # dropped at the outermost exit
    assert layer.kernel is not a


def test_cached_is_per_thread():
    layer = pnx.orthogonal(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    seen = []
    with pnx.cached():
        a = layer.kernel
        thread = threading.Thread(target=lambda: seen.append(pnx_cache._SCOPE.get()))
        thread.start()
        thread.join()
        assert layer.kernel is a
    assert seen == [None]


def test_cached_never_hands_a_read_after_a_loop_the_loops_tracer():
    # A value computed inside a scan body (or a jax.jit) is a tracer of that trace: the cache
    # gave it to the next read after the loop (UnexpectedTracerError), while a value computed
    # before the loop still serves the reads in its body (no second state update there).
    x = jnp.ones((1, 3), F32)
    layer = pnx.orthogonal(nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    k, b = layer.kernel, layer.bias[...][None]
    want = jnp.tanh(jnp.tanh(x @ k + b) @ k + b) @ k + b

    @nnx.jit
    def loop_first(m, x):
        with pnx.cached():
            h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(m(h)), None), x, None, length=2)
            return m(h)

    assert_close(loop_first(layer, x), want)
    with pnx.cached():
        jax.jit(lambda x: layer(x))(x)
        assert_close(layer.kernel, layer.parametrizations["kernel"]())

    @nnx.jit
    def read_first(m, x):  # training mode: the state is updated once, outside the loop
        with pnx.cached():
            h = m(x)
            h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(m(h)), None), h, None, length=2)
            return m(h)

    sn = pnx.spectral_norm(nnx.Linear(3, 3, rngs=nnx.Rngs(1)))
    assert read_first(sn, x).shape == (1, 3)


def test_one_generated_class_per_class_held_weakly():
    class Local(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.eye(2, dtype=F32))

    a, b = pnx.orthogonal(Local()), pnx.orthogonal(Local())
    assert type(a) is type(b) and pnx.type_before_parametrizations(a) is Local
    assert pnx_classes._GENERATED[Local] is type(a)
    # paramx holds the generated classes weakly. (JAX's and NNX's pytree registries keep every
    # NNX class alive anyway, which is why the class is made once per class, never per call.)
    assert isinstance(pnx_classes._GENERATED, weakref.WeakValueDictionary)


def test_a_class_attribute_of_the_same_name_is_refused():
    class WithProperty(nnx.Module):
        def __init__(self):
            self.weight = nnx.Param(jnp.eye(2, dtype=F32))

    WithProperty.kernel = property(lambda self: self.weight)
    m = WithProperty()
    m.__dict__["kernel"] = nnx.Param(jnp.eye(2, dtype=F32))
    with pytest.raises(ValueError, match="class level"):
        pnx.orthogonal(m)


# ----- (d) torch's signatures ----------------------------------------------------------------
def test_remove_takes_leave_parametrized_positionally_and_is_parametrized_any():
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    assert not pnx.is_parametrized(layer)
    pnx.register_parametrization(layer, "bias", jnp.tanh)
    assert pnx.is_parametrized(layer) and pnx.is_parametrized(layer, None)
    assert not pnx.is_parametrized(layer, "kernel")
    original = layer.parametrizations.bias.original
    pnx.remove_parametrizations(layer, "bias", False)
    assert layer.bias is original
    assert not pnx.is_parametrized(layer)
    params = inspect.signature(pnx.remove_parametrizations).parameters
    assert params["leave_parametrized"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert inspect.signature(pnx.is_parametrized).parameters["name"].default is None


def test_inside_jit_the_core_runs_inline():
    layer = pnx.spectral_norm(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    pnx.register_parametrization(layer, "bias", jnp.tanh)
    layer.eval()

    @nnx.jit
    def read(m):
        return m.kernel, m.bias

    kernel, bias = read(layer)
    assert_close(kernel, layer.kernel)
    assert_close(bias, layer.bias)
