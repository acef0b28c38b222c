"""The benchmark suite runs end to end at tiny sizes and writes its JSON schema.

Benchmarks are not tests: nothing here checks a timing, only that ``benchmarks/run.py
--smoke`` runs, and that its JSON has the documented fields and every JAX case family.
"""

import json
import math

from conftest import run_python

FAMILIES = (
    "overhead",
    "expm",
    "cayley",
    "householder",
    "flax",
    "rnn",
    "compile",
    "memory",
    "lipschitz",
)
ROW_FIELDS = {"case", "paramx_s", "baseline", "baseline_s", "ratio", "goal", "met"}
MACHINE_FIELDS = {"cpu", "cores", "python", "jax", "jaxlib", "flax", "optax", "torch", "date"}
CPU_FIELDS = {"cpu", "cpu_class", "cpu_vendor", "cpu_family", "cpu_model", "cpu_stepping"}


def test_smoke_run_writes_the_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "ratios.png"
    proc = run_python("benchmarks/run.py", "--smoke", "--json", str(out), "--plot", str(plot))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"rows", "machine"}
    assert MACHINE_FIELDS | CPU_FIELDS <= set(data["machine"])
    assert isinstance(data["machine"]["cores"], int)
    rows = data["rows"]
    assert rows
    for r in rows:
        assert ROW_FIELDS <= set(r), r
        assert isinstance(r["case"], str) and isinstance(r["baseline"], str)
        assert r["paramx_s"] > 0 and r["baseline_s"] > 0
        assert math.isclose(r["ratio"], r["paramx_s"] / r["baseline_s"], rel_tol=1e-9)
        if r["goal"] is None:
            assert r["met"] is None
        else:
            assert r["met"] is (r["ratio"] <= r["goal"])
    jax_cases = [r["case"] for r in rows if r.get("side") in ("jax", "lipschitz")]
    for family in FAMILIES:
        assert any(c.split("/")[0] == family for c in jax_cases), family
    rnn = [r for r in rows if r["case"].startswith("rnn/") and r.get("side") == "jax"]
    assert rnn[0]["evaluations_per_step"] == 1
    # The table is printed progressively, one line per row.
    for r in rows:
        assert r["case"] in proc.stdout


def test_cpu_class_names_the_microarchitecture(monkeypatch):
    # Both hosts of the suite's runs reported the model name "AMD EPYC"; the family and model
    # numbers tell them apart, and the results tables are kept per class.
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    sys.modules.pop("_machine", None)
    import _machine

    assert _machine.cpu_class("AuthenticAMD", 25, 17) == "AMD Zen 4"
    assert _machine.cpu_class("AuthenticAMD", 25, 1) == "AMD Zen 3"
    assert _machine.cpu_class("AuthenticAMD", 23, 49) == "AMD Zen 2"
    assert _machine.cpu_class("GenuineIntel", 6, 143) == "Intel Sapphire Rapids"
    assert _machine.cpu_class("GenuineIntel", 6, 1) == "GenuineIntel family 6 model 1"
    info = _machine.cpu_info()
    assert set(info) == CPU_FIELDS | {"cpu_flags"}
    assert isinstance(info["cpu"], str) and info["cpu"]


def test_table_cells_say_seconds_bytes_and_counts_in_their_units(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    sys.modules.pop("run", None)
    import run

    cell = lambda v, unit="seconds": run.fmt_value({"x": v, "unit": unit}, "x")
    assert (cell(2.5), cell(0.0125), cell(2.5e-5)) == ("2.50 s", "12.50 ms", "25.0 us")
    assert cell(3 * 2**20, "bytes (peak)") == "3.0 MiB"
    # A count (control-flow equations, products) is not a time.
    assert cell(15.0, "count (dot_general, forward)") == "15"
    assert cell(1.0, "count + 1 (while/cond equations, forward+backward)") == "1"
    assert cell(float("nan")) == "-"
