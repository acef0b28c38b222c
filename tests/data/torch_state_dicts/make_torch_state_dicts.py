"""Regenerate the torch state_dicts read by tests/test_torch_interop.py (torch 2.13, CPU).

Run with a Python that has ``torch==2.13.0`` and ``numpy`` (not needed at test time)::

    /tmp/torchvenv/bin/python tests/data/torch_state_dicts/make_torch_state_dicts.py

Writes ``state_dicts.npz`` and ``manifest.json`` next to this file. For every case (a tiny torch
model with parametrizations registered) it stores, in torch's layout:

* ``<case>|sd|<key>``: the model's ``state_dict()`` in eval mode;
* ``<case>|x``: a fixed input, ``<case>|y``: the model's output on it in eval mode;
* for models with spectral norm, ``<case>|y_train`` and ``<case>|sd_train|<key>``: the output of
  one training-mode forward (which first runs the power iteration) and the state_dict after it.

Originals are perturbed after registration (orthogonal: off-diagonal noise; weight norm: g
rescaled; spectral norm: u and v moved off the converged vectors), so each array matters to the
output. Each case seeds torch from the CRC32 of its name; torch runs single-threaded and the npz
is written with fixed timestamps and sorted members, so re-running gives byte-identical files
on one machine (the conv cases' outputs can differ in the last bit between torch builds; the
committed ``nnx_sequential`` case was added to the earlier files with the others unchanged).
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrizations as P

EXPECTED_TORCH = "2.13.0"
OUT = Path(__file__).resolve().parent


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Moves every parametrization's arrays off their just-registered values."""
    for module in model.modules():
        plists = getattr(module, "parametrizations", None)
        if plists is None:
            continue
        for plist in plists.values():
            for link in plist:
                if hasattr(link, "_u"):
                    for buf in (link._u, link._v):
                        buf.add_(0.5 * torch.randn_like(buf) / buf.numel() ** 0.5)
                        buf.div_(buf.norm())
            first = type(plist[0]).__name__
            if first == "_WeightNorm":
                g = plist.original0
                g.mul_(1.0 + 0.5 * torch.rand_like(g))
            elif first == "_Orthogonal":
                x = plist.original
                off = 1.0 - torch.eye(x.shape[-2], x.shape[-1])
                x.add_(0.4 * torch.randn_like(x) * off)
        if hasattr(module, "weight_g"):  # legacy weight_norm
            module.weight_g.mul_(1.0 + 0.5 * torch.rand_like(module.weight_g))


# ----- the models -----------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 5)])
        self.norm = nn.LayerNorm(5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x)


class Nested(nn.Module):
    """encoder.layers.0 plain, encoder.layers.1 spectral norm, LayerNorm, head weight norm."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(5, 2)
        P.spectral_norm(self.encoder.layers[1])
        P.weight_norm(self.head)

    def forward(self, x):
        return self.head(self.encoder(x))


class Single(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class Legacy(nn.Module):
    """Legacy torch.nn.utils.weight_norm: on a Conv1d with dim=None, on a Linear with dim=0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 2)
        self.fc = nn.Linear(4, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(self.conv, dim=None)
            nn.utils.weight_norm(self.fc)

    def forward(self, x):
        return self.fc(self.conv(x).mean(-1))


class SequentialNet(nn.Module):
    """nn.Sequential of the four kinds of Linear (spectral norm, weight norm, orthogonal, plain)
    with activations and a BatchNorm1d between them; read by an NNX twin (nnx.Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            P.spectral_norm(nn.Linear(4, 5)),
            nn.Tanh(),
            nn.BatchNorm1d(5),
            P.weight_norm(nn.Linear(5, 5)),
            nn.Tanh(),
            P.orthogonal(nn.Linear(5, 3)),
            nn.Linear(3, 2),
        )
        bn = self.net[2]
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(3)

    def forward(self, x):
        return self.net(x)


def make_cases() -> dict[str, dict]:
    """name -> {"build": () -> model, "x": input shape, "train": bool, "about": text}."""
    cases: dict[str, dict] = {}

    def add(name, build, x_shape, about, train=False):
        cases[name] = {"build": build, "x": x_shape, "train": train, "about": about}

    add("nested", Nested, (2, 4), Nested.__doc__, train=True)

    def linear_sn():
        return Single(P.spectral_norm(nn.Linear(5, 7), n_power_iterations=2))

    add("linear_spectral", linear_sn, (3, 5), "Linear(5, 7), spectral_norm k=2", train=True)

    def conv2d_sn():
        return Single(P.spectral_norm(nn.Conv2d(3, 4, (2, 3), padding=1)))

    add("conv2d_spectral", conv2d_sn, (2, 3, 5, 6), "Conv2d(3, 4, (2, 3), padding=1)", train=True)

    def conv1d_wn():
        return Single(P.weight_norm(nn.Conv1d(3, 4, 3, stride=2, padding=1)))

    add("conv1d_weight_norm", conv1d_wn, (2, 3, 7), "Conv1d(3, 4, 3, stride=2, padding=1)")
    add("legacy_weight_norm", Legacy, (2, 3, 6), Legacy.__doc__)

    def chain_wn_sn():
        m = nn.Conv2d(2, 3, 3)
        P.weight_norm(m)
        P.spectral_norm(m)
        return Single(m)

    add("chain_weight_norm_spectral", chain_wn_sn, (2, 2, 5, 4), "Conv2d(2, 3, 3): wn, sn", True)

    def chain_sn_orth():
        m = nn.Linear(4, 3)
        P.spectral_norm(m)
        P.orthogonal(m, orthogonal_map="matrix_exp", use_trivialization=False)
        P.spectral_norm(m, "bias")  # 1-D: no buffers
        return Single(m)

    add("chain_spectral_orthogonal", chain_sn_orth, (2, 4), "Linear(4, 3): sn, orth; sn bias")

    def conv_transpose_sn():
        return Single(P.spectral_norm(nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1)))

    add(
        "conv_transpose_spectral",
        conv_transpose_sn,
        (2, 3, 5),
        "ConvTranspose1d(3, 4, 3, stride=2, padding=1), spectral_norm (dim=1)",
        train=True,
    )

    add("nnx_sequential", SequentialNet, (3, 4), SequentialNet.__doc__)

    shapes = {"square": (4, 4), "tall": (3, 5), "wide": (5, 3)}  # Linear(in, out)
    for omap in ("matrix_exp", "cayley", "householder"):
        for shape_name, (n_in, n_out) in shapes.items():
            for triv in (True, False):

                def orth(omap=omap, n_in=n_in, n_out=n_out, triv=triv):
                    layer = nn.Linear(n_in, n_out)
                    P.orthogonal(layer, orthogonal_map=omap, use_trivialization=triv)
                    return Single(layer)

                tag = "triv" if triv else "notriv"
                add(
                    f"orthogonal_{omap}_{shape_name}_{tag}",
                    orth,
                    (2, n_in),
                    f"Linear({n_in}, {n_out}), orthogonal {omap}, use_trivialization={triv}",
                )
    return cases


# ----- writing ----------------------------------------------------------------------------------
def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with sorted members and fixed timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array(arrays[name], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main() -> None:
    if torch.__version__.split("+")[0] != EXPECTED_TORCH:
        raise SystemExit(f"needs torch {EXPECTED_TORCH}, found {torch.__version__}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    arrays: dict[str, np.ndarray] = {}
    manifest: dict = {"torch": EXPECTED_TORCH, "cases": {}}
    for name, spec in make_cases().items():
        torch.manual_seed(seed_of(name))
        model = spec["build"]()
        perturb(model)
        model.eval()
        x = torch.randn(spec["x"])
        with torch.no_grad():
            y = model(x)
        sd = model.state_dict()
        arrays[f"{name}|x"] = arr(x)
        arrays[f"{name}|y"] = arr(y)
        for k, v in sd.items():
            arrays[f"{name}|sd|{k}"] = arr(v)
        meta = {"about": spec["about"], "keys": list(sd), "train": spec["train"]}
        if spec["train"]:
            model.train()
            with torch.no_grad():
                y_train = model(x)
            arrays[f"{name}|y_train"] = arr(y_train)
            for k, v in model.state_dict().items():
                arrays[f"{name}|sd_train|{k}"] = arr(v)
        manifest["cases"][name] = meta
    write_npz(OUT / "state_dicts.npz", arrays)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(manifest['cases'])} cases, {len(arrays)} arrays")


if __name__ == "__main__":
    main()
