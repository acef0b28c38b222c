"""Suite-wide settings: float64 available, strict dtype promotion, no implicit rank promotion."""

import gc
import os
import subprocess
import sys
from pathlib import Path

# Compile fast. The suite's programs are small and run once or twice, so XLA's backend
# optimizations (LLVM's passes) cost far more than they save: without them the suite takes
# about a third less time. XLA:CPU's MLIR fusion emitters and its parallel code generation
# cost more per program than the elemental emitter and one code unit: eager operations (each
# a tiny program: registration, doctests, notebooks) compiled in 33 ms each with them and 20 ms
# without (360 of them: 12.6 s against 7.3 s; the suite's summed test time: 1,390 s against
# 867 s). Set in the environment before jax is imported, so the scripts, notebooks and README
# blocks the suite runs in fresh interpreters compile the same way. XLA's graph (HLO) passes
# still run and fast-math stays off, so the tolerances hold either way; the benchmark smoke
# test checks only the form of its results, never a timing.
# XLA aborts on a flag it does not know, and the emitter flags are newer than the oldest jaxlib
# paramx supports: the process that starts the run checks them once in a fresh interpreter
# (about a second) and drops them if that fails; xdist workers and scripts inherit the result.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
_CPU_EMITTERS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _add_xla_flags(*flags: str) -> None:
    for flag in flags:
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _xla_accepts(*flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_add_xla_flags(_FAST_COMPILE)
if not os.environ.get("PYTEST_XDIST_WORKER") and "xla_cpu_use_fusion_emitters" not in (
    os.environ.get("XLA_FLAGS", "")
):
    if _xla_accepts(*_CPU_EMITTERS):
        _add_xla_flags(*_CPU_EMITTERS)

# One CPU per xdist worker. XLA sizes its thread pools by the CPUs a process may use, and so do
# OpenBLAS and Eigen; two workers on two cores each running two-thread pools spend CPU time
# waiting on each other (spinning pools, context switches). Pinned, each worker and the scripts
# it starts (they inherit the mask) run on their own CPU. Tests that need several threads widen
# the mask in their own subprocess (tests/test_lapack_threads.py).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    _count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if 1 < _count <= len(_cpus):
        _mine = _cpus[int(_WORKER[2:]) % _count :: _count]
        os.sched_setaffinity(0, _mine)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(len(_mine)))

# Share compiled programs across the whole run. Tests build fresh closures, so JAX's in-memory
# caches (keyed by function identity) recompile programs that another test, test file, xdist
# worker or script already compiled; JAX's persistent cache is keyed by the program itself. One
# fresh directory per run (made by the first process, inherited by xdist workers and by the
# scripts the suite starts; removed at the end), and every program cached however fast it
# compiled. No size limit: with one, JAX locks the directory and rescans it on every write,
# which serialized the workers (11,000 entries per run). Writes are made atomic below instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="paramx-tests-jax-cache-")
    os.environ["PARAMX_TESTS_OWN_JAX_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402  (after XLA_FLAGS)

ROOT = Path(__file__).resolve().parents[1]


def _atomic_cache_writes() -> None:
    """JAX's cache without a size limit writes an entry in place, so a process reading it at
    that moment (another xdist worker, a script) could read half of it: write a temporary file
    and rename it instead (atomic on one filesystem). The scripts the suite starts do not load
    this file and still write in place; a half entry read from one fails to decompress, which
    JAX reports as a warning and answers by compiling (its cache read is guarded)."""
    try:
        from jax._src import lru_cache
    except ImportError:  # a JAX without this module: leave its cache as it is
        return
    put = getattr(lru_cache.LRUCache, "put", None)
    suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
    if put is None or suffix is None:
        return

    def atomic_put(self, key: str, value: bytes) -> None:
        if getattr(self, "eviction_enabled", True):
            return put(self, key, value)
        path = Path(str(self.path)) / f"{key}{suffix}"
        if path.exists():
            return None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(value)
        os.replace(tmp, path)
        return None

    lru_cache.LRUCache.put = atomic_put


_atomic_cache_writes()

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Per-dtype tolerances (atol, rtol), in one table.
TOLERANCES = {
    jnp.dtype(jnp.float64): (1e-12, 1e-12),
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.complex64): (1e-5, 1e-5),
    jnp.dtype(jnp.complex128): (1e-12, 1e-12),
}


def assert_close(actual, desired, dtype=None, scale=1.0):
    """Dtype-aware allclose; ``scale`` loosens both tolerances for ill-conditioned maps."""
    dtype = jnp.dtype(dtype or jnp.result_type(desired))
    atol, rtol = TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64 if dtype != jnp.complex128 else np.complex128),
        np.asarray(desired, dtype=np.float64 if dtype != jnp.complex128 else np.complex128),
        atol=atol * scale,
        rtol=rtol * scale,
    )


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test file. A worker that kept every program of
    the suite reached Linux's limit of 65,530 memory maps (XLA's CPU code is mapped per program,
    about 60 maps a second) and crashed compiling (a segfault, twice per full run); files share
    programs within themselves, not across."""
    yield
    jax.clear_caches()
    gc.collect()


_MAPS = Path("/proc/self/maps")


@pytest.fixture(autouse=True)
def _stay_below_the_map_limit():
    """Within one long file too (xdist runs a file's groups back to back on a worker): past
    40,000 maps, drop the compiled programs before the next test."""
    yield
    if _MAPS.exists():
        with _MAPS.open("rb") as f:
            count = sum(1 for _ in f)
        if count > 40_000:
            jax.clear_caches()
            gc.collect()


def exported_parametrizations() -> list[type]:
    """Every parametrization class that ``paramx`` exports, found by looking, not listed.

    A class in ``paramx.__all__``, ``paramx.constraints.__all__`` or ``paramx.lipschitz.__all__``
    counts when it defines a
    ``forward`` method and builds with no arguments (its default options). The conformance and
    full-precision tests run on each, so a new built-in exported from ``paramx`` is covered
    without editing them.
    """
    import paramx as px

    found = []
    exported = [getattr(px, n) for n in px.__all__]
    exported += [getattr(px.constraints, n) for n in px.constraints.__all__]
    exported += [getattr(px.lipschitz, n) for n in px.lipschitz.__all__]
    for obj in exported:
        if not isinstance(obj, type) or not callable(getattr(obj, "forward", None)):
            continue
        try:
            obj()
        except TypeError:  # needs arguments: not a ready-made parametrization
            continue
        found.append(obj)
    return found


def suitable_shape(p, shapes=((5, 3), (4, 4), (3, 3, 4, 4))):
    """The first of ``shapes`` (a tall matrix, a square one, a 3x3 conv kernel 4 -> 4) that ``p``
    registers on.

    Checked abstractly (``jax.eval_shape``: nothing is compiled); a parametrization refuses an
    unsuitable shape with a ValueError at registration.
    """
    import paramx as px

    for shape in shapes:
        try:
            jax.eval_shape(
                lambda x: px.register_parametrization({"w": x}, "w", p),
                jax.ShapeDtypeStruct(shape, jnp.float32),
            )
        except ValueError:
            continue
        return shape
    raise ValueError(f"{p!r} registers on none of the shapes {shapes}; add one it accepts.")


def run_python(*args, timeout=900):
    """Runs ``python *args`` in a fresh interpreter at the repository root.

    paramx is importable from this checkout whether or not it is installed, and none of this
    file's settings (float64, strict promotion) leak in.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# ----- spreading the suite over xdist workers (`-n auto --dist loadgroup`) ------------------------
# A test file is one group (its tests share compiled programs, which live in one process), except
# where a module sets ``XDIST_SPLIT``: "each" (its tests are independent subprocess runs) or the
# name of a parameter (one group per value, e.g. one per conformance case). Groups are queued
# slowest first, so that no long file starts last; the order below is from `--durations=0`.
SLOWEST_FIRST = (
    "test_notebooks.py",
    "test_examples.py",
    "test_conformance.py",
    "test_builtins.py",
    "test_parity.py",
    "test_builtins_validation.py",
    "test_readme.py",
    "test_benchmarks.py",
    "test_sharding.py",
    "test_docs.py",
)


def _group(item) -> str:
    group = item.nodeid.split("::")[0]
    split = getattr(item.module, "XDIST_SPLIT", None)
    if split == "each":
        return item.nodeid
    indices = getattr(getattr(item, "callspec", None), "indices", {})
    if split in indices:
        return f"{group}::{split}{indices[split]}"
    return group


def pytest_unconfigure(config):
    own = os.environ.get("PARAMX_TESTS_OWN_JAX_CACHE")
    if own and not hasattr(config, "workerinput"):  # the process that made it removes it
        import shutil

        shutil.rmtree(own, ignore_errors=True)


def pytest_configure(config):
    # Keep the order below: xdist would otherwise queue groups by their number of tests.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
