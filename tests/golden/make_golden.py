"""Regenerate the PyTorch golden files used by paramx's parity tests.

Run with a Python that has ``torch==2.13.0`` and ``numpy`` (NOT needed at test time)::

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python tests/golden/make_golden.py

Writes ``orthogonal.npz``, ``spectral_norm.npz``, ``weight_norm.npz`` and ``manifest.json`` next
to this file. Everything is in torch's layout (Linear weight ``(out, in)``, conv weight
``(out, in, *k)``, ConvTranspose weight ``(in, out, *k)``). Every case draws its inputs from its
own generator, seeded from a CRC32 of its id, in float64 (complex128) and then casts them to the
case's dtype, so adding or removing a case leaves the others unchanged. The ``.npz`` files are
written with fixed zip timestamps, so two runs give byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

EXPECTED_TORCH = "2.13.0"
OUT_DIR = Path(__file__).resolve().parent

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
TOLERANCES = {"float32": 1e-5, "complex64": 1e-5, "float64": 1e-10, "complex128": 1e-10}

# --------------------------------------------------------------------------------------------
# helpers


def case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode()) & 0x7FFFFFFF


def generator(case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(case_seed(case_id))


def high(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def randn(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal drawn in float64 (complex: (re + i im)/sqrt(2)), then cast to ``dtype``."""
    if dtype.is_complex:
        re = torch.randn(shape, dtype=torch.float64, generator=gen)
        im = torch.randn(shape, dtype=torch.float64, generator=gen)
        x = torch.complex(re, im) / math.sqrt(2.0)
    else:
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
    return x.to(dtype)


def random_unit(gen: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A random unit vector, normalized in float64 then cast."""
    x = randn(gen, (n,), high(dtype))
    return (x / torch.linalg.vector_norm(x)).to(dtype)


def random_orthogonal(gen: torch.Generator, batch, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random orthogonal/unitary ``(*batch, n, n)``: QR in float64 with diag(R) made positive."""
    a = randn(gen, (*batch, n, n), high(dtype))
    q, r = torch.linalg.qr(a)
    q = q * r.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)
    return q.to(dtype)


def random_signs(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    return torch.where(x >= 0, 1.0, -1.0).to(dtype)


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().resolve_conj().numpy().copy()


def tall(x: torch.Tensor) -> torch.Tensor:
    return x.mT if x.size(-2) < x.size(-1) else x


def max_orth_error(q: torch.Tensor) -> float:
    q = tall(q).to(high(q.dtype))
    eye = torch.eye(q.size(-1), dtype=q.dtype)
    return float((q.mH @ q - eye).abs().max())


class Holder(nn.Module):
    """A bare module with one parameter ``weight`` of any shape."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())


class Family:
    """Collects the cases (metadata) and arrays of one ``<family>.npz``."""

    def __init__(self, name: str, array_descriptions: dict[str, str]) -> None:
        self.name = name
        self.file = f"{name}.npz"
        self.array_descriptions = array_descriptions
        self.cases: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, meta: dict, arrays: dict[str, torch.Tensor]) -> None:
        case_id = meta["id"]
        assert all(c["id"] != case_id for c in self.cases), case_id
        for name, value in arrays.items():
            assert name in self.array_descriptions, name
            assert name not in meta, name
            self.arrays[f"{case_id}.{name}"] = to_np(value)
        meta = {"id": case_id, "family": self.name, **{k: v for k, v in meta.items() if k != "id"}}
        meta["seed"] = case_seed(case_id)
        meta["arrays"] = list(arrays)
        self.cases.append(meta)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-deterministic (fixed timestamps, sorted keys)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


# --------------------------------------------------------------------------------------------
# orthogonal

ORTH_SHAPES = {
    "square": (4, 4),
    "tall": (5, 3),
    "wide": (3, 5),
    "batched_square": (2, 3, 4, 4),
    "batched_tall": (2, 5, 3),
}
ORTH_MAPS = ("matrix_exp", "cayley", "householder")
ORTH_DTYPES = ("float32", "float64", "complex64")


def orth_meta(case_id, kind, omap, shape, dtype, triv) -> dict:
    n, k = shape[-2], shape[-1]
    return {
        "id": case_id,
        "kind": kind,
        "orthogonal_map": omap,
        "shape": list(shape),
        "dtype": dtype,
        "use_trivialization": triv,
        "transposed": n < k,
        "base_shape": [*shape[:-2], max(n, k), max(n, k)] if triv else None,
    }


def orth_forward_case(fam: Family, omap, shape_name, shape, dtype_name, triv, trunc=False):
    """Set ``original`` (and ``base``) directly on the parametrization, then read the weight."""
    tag = "triv" if triv else "notriv"
    case_id = f"orthogonal.forward.{omap}.{shape_name}.{dtype_name}.{tag}"
    if trunc:
        case_id = f"orthogonal.forward_int_diag.{omap}.{shape_name}.{dtype_name}.{tag}"
    dtype = DTYPES[dtype_name]
    gen = generator(case_id)
    batch, n, k = shape[:-2], shape[-2], shape[-1]
    original = randn(gen, shape, dtype)
    if omap == "householder":
        diag = original.diagonal(dim1=-2, dim2=-1)
        if trunc:
            # Non-(+-1) diagonal: torch casts it with .int() (truncation toward zero).
            vals = torch.tensor([0.5, -1.7, 2.3, -0.25, 1.0], dtype=dtype)[: min(n, k)]
            diag.copy_(vals.expand_as(diag))
        else:
            diag.copy_(random_signs(gen, diag.shape, dtype))
    base = random_orthogonal(gen, batch, max(n, k), dtype) if triv else None

    torch.manual_seed(case_seed(case_id))
    module = Holder(original)
    parametrizations.orthogonal(module, "weight", orthogonal_map=omap, use_trivialization=triv)
    plist = module.parametrizations.weight
    with torch.no_grad():
        plist.original.copy_(original)
        if triv:
            plist[0].base = base.clone()
    weight = module.weight.detach().clone()
    assert weight.shape == original.shape and weight.dtype == dtype
    if not trunc:
        tol = 1e-4 if dtype in (torch.float32, torch.complex64) else 1e-12
        assert max_orth_error(weight) < tol, (case_id, max_orth_error(weight))

    meta = orth_meta(case_id, "forward", omap, shape, dtype_name, triv)
    if trunc:
        meta["kind"] = "forward_int_diag"
        meta["note"] = (
            "householder diagonal not +-1: torch multiplies column j by int(original[j, j]) "
            "(truncation toward zero), so the weight is not orthogonal"
        )
    arrays = {"original": original, "weight": weight}
    if triv:
        arrays["base"] = base
    fam.add(meta, arrays)


def orth_registration_case(fam: Family, omap, shape_name, shape, dtype_name, triv):
    """Register ``orthogonal`` on a random weight W and record original, weight (and base)."""
    tag = "triv" if triv else "notriv"
    case_id = f"orthogonal.registration.{omap}.{shape_name}.{dtype_name}.{tag}"
    dtype = DTYPES[dtype_name]
    gen = generator(case_id)
    n, k = shape[-2], shape[-1]
    W = randn(gen, shape, dtype)

    torch.manual_seed(case_seed(case_id))  # right_inverse draws the completion columns of base
    module = Holder(W)
    parametrizations.orthogonal(module, "weight", orthogonal_map=omap, use_trivialization=triv)
    plist = module.parametrizations.weight
    original = plist.original.detach().clone()
    weight = module.weight.detach().clone()

    raised = None
    if not triv and omap in ("matrix_exp", "cayley"):
        try:
            plist[0].right_inverse(W)
        except NotImplementedError:
            raised = "NotImplementedError"
        assert raised is not None
        assert torch.equal(original, W), case_id  # registration swallowed it: original = W
    if triv:
        neg_id = torch.zeros_like(W)
        neg_id.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
        assert torch.equal(original, neg_id), case_id

    meta = orth_meta(case_id, "registration", omap, shape, dtype_name, triv)
    meta["right_inverse_raised"] = raised
    if triv:
        # base is (..., N, N), N = max(n, k), multiplying the tall orientation. Its first min(n, k)
        # columns are Q(qr(tall(W))) with diag(R) >= 0; for non-square W the remaining columns come
        # from torch.randn (torch's RNG) and are not reproducible outside torch.
        meta["base_deterministic_columns"] = min(n, k)
        meta["base_fully_deterministic"] = n == k
    arrays = {"W": W, "original": original, "weight": weight}
    if triv:
        arrays["base"] = plist[0].base.detach().clone()
    fam.add(meta, arrays)


def orth_default_maps() -> list[dict]:
    table = []
    shapes = [(4, 4), (5, 3), (3, 5), (2, 3, 4, 4), (2, 5, 3), (2, 3, 5)]
    for shape in shapes:
        for dtype_name in ("float32", "float64", "complex64", "complex128"):
            torch.manual_seed(0)
            module = Holder(torch.randn(shape, dtype=torch.float64).to(DTYPES[dtype_name]))
            parametrizations.orthogonal(module, "weight")
            omap = module.parametrizations.weight[0].orthogonal_map.name
            table.append({"shape": list(shape), "dtype": dtype_name, "default_map": omap})
    return table


def build_orthogonal() -> Family:
    fam = Family(
        "orthogonal",
        {
            "W": "weight before registration (torch layout, weight's shape)",
            "original": "parametrizations.weight.original (weight's shape): given input for "
            "'forward*' cases, result of registration for 'registration' cases",
            "base": "parametrizations.weight[0].base (..., N, N), N = max(n, k), "
            "orthogonal/unitary, multiplies the TALL orientation: weight = (base @ map(tall))",
            "weight": "module.weight as read from torch (weight's shape)",
        },
    )
    for omap in ORTH_MAPS:
        for shape_name, shape in ORTH_SHAPES.items():
            for dtype_name in ORTH_DTYPES:
                if omap == "householder" and dtype_name.startswith("complex"):
                    continue  # torch: "The householder parametrization does not support complex"
                for triv in (True, False):
                    orth_forward_case(fam, omap, shape_name, shape, dtype_name, triv)
                    orth_registration_case(fam, omap, shape_name, shape, dtype_name, triv)
    for shape_name in ("square", "wide"):
        for dtype_name in ("float32", "float64"):
            shape = ORTH_SHAPES[shape_name]
            orth_forward_case(fam, "householder", shape_name, shape, dtype_name, False, trunc=True)
    return fam


# --------------------------------------------------------------------------------------------
# spectral_norm

# name -> (constructor(dtype) of a module whose weight has the given torch shape, dim argument)
SN_MODULES = {
    "linear_7x5": (lambda dt: nn.Linear(5, 7, dtype=dt), (7, 5), None),
    "linear_5x7": (lambda dt: nn.Linear(7, 5, dtype=dt), (5, 7), None),
    "conv2d_dim0": (lambda dt: nn.Conv2d(3, 4, (5, 6), dtype=dt), (4, 3, 5, 6), None),
    "conv2d_dim-1": (lambda dt: nn.Conv2d(3, 4, (5, 6), dtype=dt), (4, 3, 5, 6), -1),
    "convtranspose2d_dim1": (
        lambda dt: nn.ConvTranspose2d(3, 4, (5, 6), dtype=dt),
        (3, 4, 5, 6),
        None,  # torch picks dim=1 for ConvTranspose{1,2,3}d
    ),
}
SN_ITERS = (1, 3, 15)
SN_EPS = 1e-12


def sn_setup(case_id, module_name, dtype, shape, n_iter, dim_arg, complex_holder=False):
    gen = generator(case_id)
    W = randn(gen, shape, dtype)
    torch.manual_seed(case_seed(case_id))
    if complex_holder:
        module = Holder(W)
    else:
        module = SN_MODULES[module_name][0](dtype)
        with torch.no_grad():
            module.weight.copy_(W)
    return gen, W, module


def sn_power_case(fam: Family, module_name, dtype_name, n_iter, complex_holder=False):
    """Given W, u0, v0: n_iter power iterations (train-mode read), then an eval-mode read."""
    case_id = f"spectral_norm.power.{module_name}.{dtype_name}.k{n_iter}"
    dtype = DTYPES[dtype_name]
    _, shape, dim_arg = SN_MODULES[module_name]
    gen, W, module = sn_setup(case_id, module_name, dtype, shape, n_iter, dim_arg, complex_holder)
    module.eval()  # registration: 15 iterations from torch's random u, v (overwritten below)
    parametrizations.spectral_norm(module, "weight", n_power_iterations=n_iter, dim=dim_arg)
    sn = module.parametrizations.weight[0]
    W_mat = sn._reshape_weight_to_matrix(W)
    h, w = W_mat.shape
    u0 = random_unit(gen, h, dtype)
    v0 = random_unit(gen, w, dtype)
    with torch.no_grad():
        sn._u.copy_(u0)
        sn._v.copy_(v0)

    module.train()
    weight_train = module.weight.detach().clone()  # runs n_iter power iterations
    u = sn._u.detach().clone()
    v = sn._v.detach().clone()
    module.eval()
    weight = module.weight.detach().clone()  # no iteration in eval mode
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v), case_id
    assert torch.equal(weight, weight_train), case_id
    sigma = torch.vdot(u, torch.mv(W_mat, v))
    assert torch.equal(weight, W / sigma), case_id

    # Independent check of the iteration order (u first, then v) in float64.
    uu, vv, Wm = u0.to(high(dtype)), v0.to(high(dtype)), W_mat.to(high(dtype))
    for _ in range(n_iter):
        uu = F.normalize(Wm @ vv, dim=0, eps=SN_EPS)
        vv = F.normalize(Wm.mH @ uu, dim=0, eps=SN_EPS)
    tol = 1e-3 if dtype in (torch.float32, torch.complex64) else 1e-9
    assert float((uu - u.to(uu.dtype)).abs().max()) < tol, case_id
    assert float((vv - v.to(vv.dtype)).abs().max()) < tol, case_id

    module_label = "Holder" if complex_holder else None
    meta = sn_meta(case_id, "power", module, shape, dtype_name, dim_arg, sn, h, w, n_iter)
    if module_label:
        meta["module"] = module_label
    arrays = {"W": W, "u0": u0, "v0": v0, "u": u, "v": v, "sigma": sigma, "weight": weight}
    fam.add(meta, arrays)


def sn_meta(case_id, kind, module, shape, dtype_name, dim_arg, sn, h, w, n_iter) -> dict:
    """The manifest entry shared by the spectral-norm case kinds."""
    return {
        "id": case_id,
        "kind": kind,
        "module": type(module).__name__.replace("Parametrized", ""),
        "shape": list(shape),
        "dtype": dtype_name,
        "dim_arg": dim_arg,
        "dim": sn.dim,
        "matrix_shape": [h, w],
        "n_power_iterations": n_iter,
        "eps": SN_EPS,
    }


def sn_registration_case(fam: Family, module_name, dtype_name, n_iter, training):
    """Registration from torch's own random u, v: 15 iterations, + n_iter in training mode."""
    mode = "train" if training else "eval"
    case_id = f"spectral_norm.registration.{module_name}.{dtype_name}.k{n_iter}.{mode}"
    dtype = DTYPES[dtype_name]
    _, shape, dim_arg = SN_MODULES[module_name]
    _, W, module = sn_setup(case_id, module_name, dtype, shape, n_iter, dim_arg)
    module.train(training)
    # Reproduce the draws of _SpectralNorm.__init__: u then v, new_empty(..).normal_(0, 1).
    eff_dim = dim_arg if dim_arg is not None else int(isinstance(module, nn.ConvTranspose2d))
    h = W.shape[eff_dim]
    w = W.numel() // h
    torch.manual_seed(case_seed(case_id))
    u_init = F.normalize(W.new_empty(h).normal_(0, 1), dim=0, eps=SN_EPS)
    v_init = F.normalize(W.new_empty(w).normal_(0, 1), dim=0, eps=SN_EPS)

    torch.manual_seed(case_seed(case_id))
    parametrizations.spectral_norm(module, "weight", n_power_iterations=n_iter, dim=dim_arg)
    sn = module.parametrizations.weight[0]
    u = sn._u.detach().clone()
    v = sn._v.detach().clone()
    total = 15 + (n_iter if training else 0)

    # Check: replaying `total` iterations from (u_init, v_init) gives torch's u, v bitwise.
    sn._u.copy_(u_init)
    sn._v.copy_(v_init)
    sn._power_method(sn._reshape_weight_to_matrix(W), total)
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v), case_id
    sn._u.copy_(u)
    sn._v.copy_(v)
    module.eval()
    weight = module.weight.detach().clone()
    W_mat = sn._reshape_weight_to_matrix(W)
    sigma = torch.vdot(u, torch.mv(W_mat, v))

    meta = sn_meta(case_id, "registration", module, shape, dtype_name, dim_arg, sn, h, w, n_iter)
    meta.update(training=training, total_iterations=total)
    arrays = {
        "W": W,
        "u0": u_init,
        "v0": v_init,
        "u": u,
        "v": v,
        "sigma": sigma,
        "weight": weight,
    }
    fam.add(meta, arrays)


def sn_vector_case(fam: Family, dtype_name, zero=False):
    case_id = f"spectral_norm.vector.{'zero' if zero else 'random'}.{dtype_name}"
    dtype = DTYPES[dtype_name]
    gen = generator(case_id)
    W = torch.zeros(6, dtype=dtype) if zero else randn(gen, (6,), dtype)
    module = Holder(W)
    parametrizations.spectral_norm(module, "weight")
    sn = module.parametrizations.weight[0]
    assert not hasattr(sn, "_u") and not hasattr(sn, "n_power_iterations")
    module.train()
    weight = module.weight.detach().clone()
    module.eval()
    assert torch.equal(module.weight, weight)
    assert torch.equal(weight, F.normalize(W, dim=0, eps=SN_EPS))
    meta = {
        "id": case_id,
        "kind": "vector",
        "module": "Holder",
        "shape": [6],
        "dtype": dtype_name,
        "dim_arg": None,
        "dim": sn.dim,
        "eps": SN_EPS,
        "note": "1-D weight: weight / max(||weight||_2, eps), no u/v buffers",
    }
    fam.add(meta, {"W": W, "weight": weight})


def build_spectral_norm() -> Family:
    fam = Family(
        "spectral_norm",
        {
            "W": "raw weight (parametrizations.weight.original), torch layout",
            "u0": "_u before the iterations (h,), unit norm; for 'registration' cases the "
            "normalized normal_(0,1) draw made inside _SpectralNorm.__init__",
            "v0": "_v before the iterations (w,), unit norm",
            "u": "_u after the iterations (h,)",
            "v": "_v after the iterations (w,)",
            "sigma": "0-d, torch.vdot(u, W_mat @ v) (vdot conjugates u); W_mat = W with dim "
            "moved to the front, flattened to (h, w)",
            "weight": "module.weight read in eval mode with the final u, v: W / sigma "
            "(1-D: F.normalize(W, dim=0, eps))",
        },
    )
    for module_name in SN_MODULES:
        for dtype_name in ("float32", "float64"):
            for n_iter in SN_ITERS:
                sn_power_case(fam, module_name, dtype_name, n_iter)
    for n_iter in SN_ITERS:
        sn_power_case(fam, "linear_7x5", "complex64", n_iter, complex_holder=True)
    for dtype_name in ("float32", "float64"):
        for n_iter in (1, 3):
            for training in (True, False):
                sn_registration_case(fam, "linear_7x5", dtype_name, n_iter, training)
        sn_registration_case(fam, "convtranspose2d_dim1", dtype_name, 1, True)
    for dtype_name in ("float32", "float64"):
        sn_vector_case(fam, dtype_name)
        sn_vector_case(fam, dtype_name, zero=True)
    return fam


# --------------------------------------------------------------------------------------------
# weight_norm

WN_MODULES = {
    "linear": (lambda dt: nn.Linear(4, 5, dtype=dt), (5, 4), (0, 1, -2, None, -1)),
    "conv1d": (lambda dt: nn.Conv1d(3, 6, 5, dtype=dt), (6, 3, 5), (0, 1, 2, -2, None, -1)),
}


def dim_tag(dim) -> str:
    return "None" if dim is None else str(dim)


def wn_case(fam: Family, module_name, dtype_name, dim_arg, zero_row=False):
    case_id = f"weight_norm.{module_name}.dim{dim_tag(dim_arg)}.{dtype_name}"
    if zero_row:
        case_id = f"weight_norm.zero_row.{module_name}.dim{dim_tag(dim_arg)}.{dtype_name}"
    dtype = DTYPES[dtype_name]
    ctor, shape, _ = WN_MODULES[module_name]
    gen = generator(case_id)
    W = randn(gen, shape, dtype)
    torch.manual_seed(case_seed(case_id))
    module = ctor(dtype)
    with torch.no_grad():
        module.weight.copy_(W)
    parametrizations.weight_norm(module, "weight", dim=dim_arg)
    plist = module.parametrizations.weight
    g = plist.original0.detach().clone()
    v = plist.original1.detach().clone()
    weight = module.weight.detach().clone()
    assert torch.equal(v, W)

    g_in = randn(gen, g.shape, dtype)
    v_in = randn(gen, shape, dtype)
    if zero_row:
        v_in[1].zero_()
    out = plist[0](g_in, v_in).detach().clone()
    if zero_row:
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()

    meta = {
        "id": case_id,
        "kind": "zero_row" if zero_row else "weight_norm",
        "module": type(module).__name__.replace("Parametrized", ""),
        "shape": list(shape),
        "dtype": dtype_name,
        "dim_arg": dim_arg,
        "dim": plist[0].dim,
        "whole_tensor": plist[0].dim == -1,
        "g_shape": list(g.shape),
        "contains_nan": zero_row,
    }
    arrays = {"W": W, "g": g, "v": v, "weight": weight, "g_in": g_in, "v_in": v_in, "out": out}
    fam.add(meta, arrays)


def build_weight_norm() -> Family:
    fam = Family(
        "weight_norm",
        {
            "W": "weight before registration, torch layout",
            "g": "parametrizations.weight.original0 after registration = "
            "norm_except_dim(W, 2, dim) (keepdim shape; 0-d for dim None/-1)",
            "v": "parametrizations.weight.original1 after registration (= W)",
            "weight": "module.weight right after registration (= forward(g, v), ~W)",
            "g_in": "a given random g (same shape as g)",
            "v_in": "a given random v (weight's shape)",
            "out": "forward(g_in, v_in) = torch._weight_norm(v_in, g_in, dim) = "
            "v_in * g_in / norm_except_dim(v_in, 2, dim)",
        },
    )
    for module_name, (_, _, dims) in WN_MODULES.items():
        for dim_arg in dims:
            for dtype_name in ("float32", "float64"):
                wn_case(fam, module_name, dtype_name, dim_arg)
    for dtype_name in ("float32", "float64"):
        wn_case(fam, "linear", dtype_name, 0, zero_row=True)
    return fam


# --------------------------------------------------------------------------------------------
# main


def write_manifest(path: Path, manifest: dict) -> None:
    """JSON with one case per line (compact but diff-friendly)."""
    lines = ["{"]
    top = [k for k in manifest if k != "families"]
    for key in top:
        lines.append(f"  {json.dumps(key)}: {json.dumps(manifest[key])},")
    lines.append('  "families": {')
    fams = list(manifest["families"].items())
    for i, (name, fam) in enumerate(fams):
        lines.append(f"    {json.dumps(name)}: {{")
        lines.append(f'      "file": {json.dumps(fam["file"])},')
        lines.append(f'      "array_descriptions": {json.dumps(fam["array_descriptions"])},')
        lines.append('      "cases": [')
        cases = fam["cases"]
        for j, case in enumerate(cases):
            lines.append("        " + json.dumps(case) + ("," if j < len(cases) - 1 else ""))
        lines.append("      ]")
        lines.append("    }" + ("," if i < len(fams) - 1 else ""))
    lines.append("  }")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == manifest
    path.write_text(text)


def main() -> int:
    if not torch.__version__.startswith(EXPECTED_TORCH):
        print(f"warning: expected torch {EXPECTED_TORCH}, got {torch.__version__}", file=sys.stderr)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    families = [build_orthogonal(), build_spectral_norm(), build_weight_norm()]
    manifest = {
        "generator": "tests/golden/make_golden.py",
        "torch_version": torch.__version__,
        "layout": "torch: Linear (out, in); Conv (out, in, *k); ConvTranspose (in, out, *k); "
        "orthogonal: (..., n, k) batches of matrices",
        "tolerances": TOLERANCES,
        "orthogonal_default_map": orth_default_maps(),
        "families": {},
    }
    for fam in families:
        write_npz(OUT_DIR / fam.file, fam.arrays)
        manifest["families"][fam.name] = {
            "file": fam.file,
            "array_descriptions": fam.array_descriptions,
            "cases": fam.cases,
        }
        print(f"{fam.file}: {len(fam.cases)} cases, {len(fam.arrays)} arrays")
    write_manifest(OUT_DIR / "manifest.json", manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
