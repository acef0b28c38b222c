"""Which CPU a results file was measured on, precisely enough to keep one table per CPU family.

``model name`` alone does not tell hosts apart: cloud machines often report a bare "AMD EPYC"
or "Intel Xeon Processor" whatever their generation, and two such hosts differed by 30% on the
same step (``benchmarks/README.md``). The vendor, family, model and stepping numbers, and the
vector extensions XLA and OpenBLAS pick their kernels by, do: :func:`cpu_info` records them
and names the microarchitecture where the numbers are known.
"""

from __future__ import annotations

import platform
from typing import Any

# (vendor, family, first model, last model) -> microarchitecture; the models of x86 server
# and desktop parts as the vendors document them (AMD: family 17h/19h/1Ah; Intel: family 6).
_FAMILIES: list[tuple[str, int, int, int, str]] = [
    ("AuthenticAMD", 0x17, 0x00, 0x2F, "AMD Zen 1/Zen+"),
    ("AuthenticAMD", 0x17, 0x30, 0xFF, "AMD Zen 2"),
    ("AuthenticAMD", 0x19, 0x00, 0x0F, "AMD Zen 3"),
    ("AuthenticAMD", 0x19, 0x10, 0x1F, "AMD Zen 4"),
    ("AuthenticAMD", 0x19, 0x20, 0x5F, "AMD Zen 3"),
    ("AuthenticAMD", 0x19, 0x60, 0x7F, "AMD Zen 4"),
    ("AuthenticAMD", 0x19, 0xA0, 0xAF, "AMD Zen 4"),
    ("AuthenticAMD", 0x1A, 0x00, 0xFF, "AMD Zen 5"),
    ("GenuineIntel", 6, 0x55, 0x55, "Intel Skylake/Cascade Lake-SP"),
    ("GenuineIntel", 6, 0x6A, 0x6C, "Intel Ice Lake-SP"),
    ("GenuineIntel", 6, 0x8F, 0x8F, "Intel Sapphire Rapids"),
    ("GenuineIntel", 6, 0xCF, 0xCF, "Intel Emerald Rapids"),
    ("GenuineIntel", 6, 0xAD, 0xAE, "Intel Granite Rapids"),
    ("GenuineIntel", 6, 0x4F, 0x4F, "Intel Broadwell"),
    ("GenuineIntel", 6, 0x3F, 0x3F, "Intel Haswell"),
]

# The extensions that change which matrix-product and LAPACK kernels run.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_class(vendor: str, family: int | None, model: int | None) -> str:
    """The microarchitecture for a vendor/family/model, or ``"<vendor> family F model M"``.

    Example:
        >>> cpu_class("AuthenticAMD", 25, 17)
        'AMD Zen 4'
        >>> cpu_class("GenuineIntel", 6, 143)
        'Intel Sapphire Rapids'
    """
    for v, fam, first, last, name in _FAMILIES:
        if v == vendor and fam == family and model is not None and first <= model <= last:
            return name
    if family is None:
        return platform.processor() or platform.machine()
    return f"{vendor} family {family} model {model}"


def cpu_info() -> dict[str, Any]:
    """``cpu`` (the model name), ``cpu_class`` (the microarchitecture: one table per value in
    ``benchmarks/README.md``), vendor, family, model and stepping numbers, and which of the
    vector extensions in ``_FLAGS`` the CPU has."""
    info = _cpuinfo()

    def number(key: str) -> int | None:
        try:
            return int(info[key])
        except (KeyError, ValueError):
            return None

    vendor = info.get("vendor_id", "")
    family, model = number("cpu family"), number("model")
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_class": cpu_class(vendor, family, model),
        "cpu_vendor": vendor or None,
        "cpu_family": family,
        "cpu_model": model,
        "cpu_stepping": number("stepping"),
        "cpu_flags": [f for f in _FLAGS if f in flags],
    }
