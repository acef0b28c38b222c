"""The true operator norm of a conv after each spectral normalization (issue 14).

torch's ``spectral_norm`` (``px.spectral_norm``) divides a conv kernel by the largest singular
value of the kernel reshaped to a matrix. That is not the norm of the convolution, which can
be up to ``sqrt(kh * kw)`` times larger (pytorch#99149). This script takes the same kernels
through

* ``reshaped``: ``px.spectral_norm`` (15 power iterations at registration, then 30 training
  updates: converged on the reshaped matrix),
* ``power``: ``conv_spectral_norm(method="power")``, power iteration on the conv and its
  adjoint, after registration (15 warm-up iterations) and one training update, and after 100
  training updates of an unchanged kernel,
* ``fft``: ``conv_spectral_norm(method="fft")``, the exact circular spectrum (circular
  padding only),
* ``gram``: ``conv_spectral_norm(method="gram")``, a certified upper bound by Gram iteration,

and measures the TRUE operator norm of each normalized conv: exactly by FFT for circular
padding (strides that divide the input size are exact too), else by 3000 power iterations on
the actual conv (a lower bound that converges to it; the certified Gram bound of the same
kernel is printed next to it, so the true norm lies between them). Every method returns a
multiple ``c * k`` of the raw kernel, so the truth is measured once per kernel (``raw``) and
each normalized conv's norm is ``c * raw``.

Kernels: 3x3, 16 -> 16 and 16 -> 32 channels, inputs 32x32, SAME and CIRCULAR padding,
strides 1 and 2. ``random``: Flax's default conv init (LeCun normal); ``smooth``: a
trained-looking, low-frequency kernel (a random 3x3 kernel plus the same channel matrix at
every tap, three times larger), the case where the reshaped sigma is furthest from the conv's
norm.

Run: ``python benchmarks/conv_norm_table.py`` (about a minute on a laptop CPU); prints a
markdown table and writes ``benchmarks/results/conv_norms.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import cpu_info  # noqa: E402

import paramx as px  # noqa: E402
from paramx._src.parametrizations.conv_spectral_norm import (  # noqa: E402
    conv_spectral_norm,
    operator_norm,
)
from paramx._src.parametrizations.convops import ConvGeometry  # noqa: E402


def kernels(key: jax.Array, cin: int, cout: int) -> dict[str, jax.Array]:
    ka, kb, kc = jax.random.split(key, 3)
    init = jax.nn.initializers.lecun_normal()
    random = init(ka, (3, 3, cin, cout), jnp.float32)
    base = init(kb, (1, 1, cin, cout), jnp.float32)
    smooth = init(kc, (3, 3, cin, cout), jnp.float32) + 3 * jnp.broadcast_to(base, random.shape)
    return {"random": random, "smooth": smooth}


def true_norm(w: jax.Array, g: ConvGeometry, iterations: int) -> tuple[float, float | None]:
    """(true norm, certified upper bound or None when the first is exact)."""
    if g.is_circular():
        return float(_fft(w, g)), None
    return float(_power(w, g, iterations)), float(_gram(w, g))


_fft = jax.jit(lambda w, g: operator_norm(w, g, method="fft"), static_argnums=1)
_gram = jax.jit(lambda w, g: operator_norm(w, g, method="gram"), static_argnums=1)
_power = jax.jit(
    lambda w, g, n: operator_norm(w, g, method="power", iterations=n), static_argnums=(1, 2)
)


def normalized(k: jax.Array, g: ConvGeometry) -> dict[str, jax.Array]:
    tree = {"conv": {"kernel": k}}
    out = {}
    # (a) torch-style spectral_norm on the reshaped kernel, converged
    params, state = px.split_state(px.spectral_norm(tree, "conv/kernel"))
    for _ in range(30):
        plain, state = _train(params, state)
    out["reshaped"] = plain["conv"]["kernel"]
    # (b) power iteration on the conv: after 1 update, and after 100
    params, state = px.split_state(conv_spectral_norm(tree, "conv/kernel", geometry=g))
    plain, state = _train(params, state)
    out["power@1"] = plain["conv"]["kernel"]
    for _ in range(99):
        plain, state = _train(params, state)
    out["power@100"] = plain["conv"]["kernel"]
    # (c) exact circular spectrum, (d) Gram bound
    if g.is_circular():
        t = conv_spectral_norm(tree, "conv/kernel", geometry=g, method="fft")
        out["fft"] = _eval(t)["conv"]["kernel"]
    t = conv_spectral_norm(tree, "conv/kernel", geometry=g, method="gram")
    out["gram"] = _eval(t)["conv"]["kernel"]
    return out


_train = jax.jit(lambda p, s: px.materialize(p, s, update_state=True))
_eval = jax.jit(px.materialize)

METHODS = ("reshaped", "power@1", "power@100", "fft", "gram")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/conv_norms.json"))
    parser.add_argument("--iterations", type=int, default=3000, help="power iterations (truth)")
    parser.add_argument("--size", type=int, default=32, help="input size")
    args = parser.parse_args()
    n = args.size
    rows = []
    start = time.perf_counter()
    for cin, cout in ((16, 16), (16, 32)):
        ks = kernels(jax.random.key(cin * 100 + cout), cin, cout)
        for kind, k in ks.items():
            for padding in ("SAME", "CIRCULAR"):
                for stride in (1, 2):
                    g = ConvGeometry(input_size=(n, n), strides=stride, padding=padding)
                    raw, raw_bound = true_norm(k, g, args.iterations)
                    row = {
                        "kernel": kind,
                        "channels": f"{cin}->{cout}",
                        "padding": padding,
                        "stride": stride,
                        "input": f"{n}x{n}",
                        "raw_true_norm": raw,
                        "reshaped_sigma": float(operator_norm(k, g, method="reshaped")),
                        "truth": "fft (exact)" if g.is_circular() else "power (lower bound)",
                    }
                    # Every method returns c * k: the normalized conv's norm is c * raw.
                    for method, w in normalized(k, g).items():
                        c = float(jnp.vdot(w, k) / jnp.vdot(k, k))
                        row[method] = c * raw
                        if raw_bound is not None:
                            row[method + "_certified_upper"] = c * raw_bound
                    rows.append(row)
    elapsed = time.perf_counter() - start

    head = (
        "| kernel | channels | padding | stride | raw norm | reshaped "
        "(px.spectral_norm) | power, 1 step | power, 100 steps | fft | gram |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = []
        for m in METHODS:
            if m not in r:
                cells.append("refused")
                continue
            s = f"{r[m]:.4f}"
            if m + "_certified_upper" in r:
                s += f" (<= {r[m + '_certified_upper']:.4f})"
            cells.append(s)
        print(
            f"| {r['kernel']} | {r['channels']} | {r['padding']} | {r['stride']} | "
            f"{r['raw_true_norm']:.3f} | " + " | ".join(cells) + " |"
        )
    print(
        f"\nTrue operator norm of the normalized conv ({n}x{n} inputs): exact (FFT) for "
        f"CIRCULAR; for SAME a {args.iterations}-step power iteration (a lower bound) with the "
        f"certified Gram bound in parentheses. {elapsed:.0f} s."
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        **cpu_info(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out.write_text(json.dumps({"rows": rows, "machine": machine}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
