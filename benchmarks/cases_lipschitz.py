"""Lipschitz / orthogonal convolution cases of the benchmark suite (issue 14).

One training step (forward + backward + an optax Adam update, jitted, buffers donated) of a
small 1-Lipschitz CNN, per method, against

* ``lipschitz/<method>``: the same CNN with plain (unconstrained) convolutions, measured in
  the same process (:func:`_timing.measure`: alternating blocks after warm-up, medians); the
  ratio is what the constraint costs per step;
* ``lipschitz/<method>/<peer>``: the PyTorch implementation of the same method, where one
  installs from the registry (orthogonium, deel-torchlip), the same network in eager torch
  (``zero_grad``, forward inside ``parametrize.cached()``, cross-entropy, ``backward()``,
  ``torch.optim.Adam.step()``);
* ``lipschitz/plain/torch``: the two plain CNNs against each other (no goal), the framework
  baseline that every peer ratio carries.

The network (NHWC in JAX, NCHW in torch), the same for every method and both sides:
the 3 input channels zero-padded to 32 (an isometry), two 3x3 conv layers 32 -> 32 at 32x32,
a 2x2 average pool times 2 (1-Lipschitz in l2), zero-padding to 64 channels, two 3x3 conv
layers 64 -> 64 at 16x16, a global average pool times sqrt(16 * 16) (1-Lipschitz), a Dense
64 -> 10 (plain on every side: its cost is negligible). Every conv has a bias, ``CIRCULAR``
padding (the geometry of the orthogonal constructions, and of Cayley-FFT) except where a
method says otherwise (SLL blocks: zero padding, as orthogonium's), and is followed by MaxMin
(the pairwise sort of channel halves, 1-Lipschitz and gradient-norm preserving). SLL rows
replace each conv + MaxMin by an SLL residual block of the same width (inner width = width),
``x - 2 K^T (t * relu(K x + b))``, on both sides. Batch 16, 10 classes, softmax
cross-entropy on fixed random labels, Adam lr 1e-4. ``--smoke``: 8x8 inputs, widths 4 and 8,
batch 2, only the power, AOL and SLL methods (each variant costs a compilation).
``--quick``: the full sizes, fewer repetitions and no CPU-time figures.

Methods (paramx side: each conv kernel registered with the method's tree function and a
``ConvGeometry`` of that layer (input size, padding); ``px.split_state`` and
``px.materialize(..., update_state=True)`` inside the step):

* ``conv_spectral_norm_power``: power iteration on the convolution operator and its
  transpose (one iteration per step, u as state); peer deel-torchlip ``SpectralConv2d`` with
  ``eps_bjorck=None``: power iteration (to a tolerance) on the reshaped kernel times a
  constant correction factor. Not the same operator norm: the peer normalizes the reshaped
  kernel (the cost is comparable; the guarantee is not).
* ``conv_spectral_norm_fft``: the exact norm of the circular conv (singular values at every
  DFT frequency, Sedghi et al.), no state; no peer.
* ``conv_spectral_norm_gram``: Gram iteration, a certified bound on the operator norm
  (no state); no peer.
* ``aol``: AOL rescaling; peer orthogonium ``AOLConv2D`` (niter 1).
* ``sll``: SLL residual blocks; peer orthogonium ``SDPBasedLipschitzResBlock``
  (inner_dim_factor 1).
* ``soc``: skew-orthogonal convolution (truncated exponential series, the parametrization's
  default number of terms); peer orthogonium ``AdaptiveSOCConv2d`` (an explicit-kernel
  variant of SOC: a different construction of the same family, no goal).
* ``soc_series``: the same SOC operator applied term by term (``paramx.linen.SOCConv``: 5
  convs with the raw 3x3 kernel per layer instead of one with the merged 11x11 kernel); peer
  orthogonium ``AdaptiveSOCConv2d``.
* ``cayley_fft``: the Cayley transform in the Fourier domain (circular padding, the input
  size known); no CPU peer (orthogonium's ``legacy`` Cayley, SOC and BCOP layers allocate on
  CUDA).
* ``bcop`` (when paramx has it): block-convolution orthogonal; peers orthogonium
  ``AdaptiveOrthoConv2d`` (AOC: BCOP-style block convolution with Björck orthogonalization, 12
  iterations) and deel-torchlip ``SpectralConv2d`` (reshaped-kernel Björck, default options).

Methods whose paramx function is not there yet (the parametrizations are added by other
work) are skipped with a note; peers that are not installed are skipped with a note
(``pip install orthogonium deel-torchlip``).

Threads, as ``cases_torch.py`` and ``cases_geotorch.py``: torch runs with
``torch.set_num_threads(n)``, n = ``PARAMX_BENCH_TORCH_THREADS`` or else the CPUs of the
process (``--smoke``: 1); XLA's CPU pool is the process's CPUs unless
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``. The
figures to trust on a busy machine are one thread on both sides::

    PARAMX_BENCH_TORCH_THREADS=1 \\
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python benchmarks/cases_lipschitz.py --json benchmarks/results/lipschitz.json

(``python benchmarks/cases_lipschitz.py`` takes ``run.py``'s options and runs only these
cases.) Extra fields: ``method``, ``peer``, ``padding``, ``loss_diff`` (plain rows: the
first-step losses of the two CNNs agree to rounding when both start from the same weights),
``paramx_cpu_s``/``baseline_cpu_s``/``cpu_ratio`` (full mode: the same steps in CPU seconds of
the process, alternating, medians), ``torch_1thread_s`` etc. as in ``cases_torch.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

from _timing import measure, row

_LR = 1e-4
_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The network's sizes."""

    image: int = 32
    widths: tuple[int, int] = (32, 64)
    batch: int = 16


_FULL = Sizes()
_SMOKE = Sizes(image=8, widths=(4, 8), batch=2)
_SMOKE_METHODS = ("aol",)  # run.py --smoke is part of the test suite: keep it short


@dataclasses.dataclass(frozen=True)
class Peer:
    """A torch implementation of a method: ``make(c, padding)`` builds one layer of width c."""

    name: str
    dist: str  # the distribution whose version goes into the row
    make: Callable[[int, str], Any]
    detail: str
    goal: float | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A paramx method: where its tree function lives, its options, its peers."""

    name: str
    module: str  # a paramx module path; candidates are tried in order
    function: tuple[str, ...]  # candidate names of the tree function
    kwargs: tuple[tuple[str, Any], ...] = ()
    layer: str = "conv"  # "conv": 3x3 conv; "soc": the SOC kernel size; "fft": a full n x n
    # kernel applied by FFT; "sll": an SLL residual block; "soc_series": SOCConv (no
    # registration, like "sll"); "plain": no registration
    padding: str = "CIRCULAR"
    goal: float | None = None  # against the plain CNN
    peers: tuple[Peer, ...] = ()
    detail: str = ""


# ----------------------------------------------------------------------------------------------
# torch peers (imported only when torch is there).


def _orthogonium_aol(c: int, padding: str) -> Any:
    from orthogonium.layers.conv.AOL.aol import AOLConv2D

    return AOLConv2D(c, c, 3, padding=1, padding_mode=_torch_padding(padding))


def _orthogonium_sll(c: int, padding: str) -> Any:
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock

    return SDPBasedLipschitzResBlock(c, inner_dim_factor=1, kernel_size=3)


def _orthogonium_aoc(c: int, padding: str) -> Any:
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d

    return AdaptiveOrthoConv2d(c, c, 3, padding="same", padding_mode=_torch_padding(padding))


def _orthogonium_soc(c: int, padding: str) -> Any:
    from orthogonium.layers.conv.adaptiveSOC.ortho_conv import AdaptiveSOCConv2d

    return AdaptiveSOCConv2d(c, c, 3, padding="same", padding_mode=_torch_padding(padding))


def _torchlip_spectral(c: int, padding: str) -> Any:
    from deel.torchlip import SpectralConv2d

    return SpectralConv2d(c, c, 3, padding=1, padding_mode=_torch_padding(padding), eps_bjorck=None)


def _torchlip_bjorck(c: int, padding: str) -> Any:
    from deel.torchlip import SpectralConv2d

    return SpectralConv2d(c, c, 3, padding=1, padding_mode=_torch_padding(padding))


def _torch_padding(padding: str) -> str:
    return "circular" if padding == "CIRCULAR" else "zeros"


_ORTHOGONIUM_AOL = Peer(
    "orthogonium", "orthogonium", _orthogonium_aol, "orthogonium AOLConv2D (niter 1)", goal=1.0
)
_ORTHOGONIUM_SLL = Peer(
    "orthogonium",
    "orthogonium",
    _orthogonium_sll,
    "orthogonium SDPBasedLipschitzResBlock (inner_dim_factor 1)",
    goal=1.0,
)
_ORTHOGONIUM_AOC = Peer(
    "orthogonium",
    "orthogonium",
    _orthogonium_aoc,
    "orthogonium AdaptiveOrthoConv2d (AOC, Björck 12 iterations)",
    goal=1.0,
)
_ORTHOGONIUM_SOC = Peer(
    "orthogonium",
    "orthogonium",
    _orthogonium_soc,
    "orthogonium AdaptiveSOCConv2d (explicit-kernel SOC variant; a different construction)",
)
_TORCHLIP_SPECTRAL = Peer(
    "torchlip",
    "deel-torchlip",
    _torchlip_spectral,
    "deel-torchlip SpectralConv2d, eps_bjorck=None (reshaped-kernel spectral norm x a conv factor)",
    goal=1.0,
)
_TORCHLIP_BJORCK = Peer(
    "torchlip",
    "deel-torchlip",
    _torchlip_bjorck,
    "deel-torchlip SpectralConv2d (reshaped-kernel Björck x a conv factor)",
)

_LIP = "paramx._src.parametrizations"
METHODS = (
    Method(
        "conv_spectral_norm_power",
        f"{_LIP}.conv_spectral_norm",
        ("conv_spectral_norm",),
        (("method", "power"),),
        peers=(_TORCHLIP_SPECTRAL,),
        detail="power iteration on the conv operator, 1 step per training step",
    ),
    Method(
        "conv_spectral_norm_gram",
        f"{_LIP}.conv_spectral_norm",
        ("conv_spectral_norm",),
        (("method", "gram"),),
        detail="Gram iteration (certified bound)",
    ),
    Method("aol", f"{_LIP}.lipschitz_rescaling", ("aol",), peers=(_ORTHOGONIUM_AOL,)),
    Method(
        "sll",
        "paramx._src.integrations.lipschitz_layers",
        ("SLLConv",),
        layer="sll",
        padding="SAME",
        peers=(_ORTHOGONIUM_SLL,),
    ),
    Method(
        "cayley_fft",
        f"{_LIP}.conv_orthogonal",
        ("cayley_conv",),
        layer="fft",
        detail="full n x n kernel, applied by FFT (the same operator as a circular nn.Conv)",
    ),
    Method(
        "bcop",
        f"{_LIP}.conv_orthogonal",
        ("bcop", "conv_bcop", "block_orthogonal_conv"),
        peers=(_ORTHOGONIUM_AOC, _TORCHLIP_BJORCK),
    ),
    Method(
        "soc",
        f"{_LIP}.conv_orthogonal",
        ("soc",),
        (("terms", 6),),
        layer="soc",
        peers=(_ORTHOGONIUM_SOC,),
        detail="6 terms: the layer applies the merged 11x11 kernel",
    ),
    Method(
        "soc_series",
        "paramx._src.integrations.lipschitz_layers",
        ("SOCConv",),
        layer="soc_series",
        peers=(_ORTHOGONIUM_SOC,),
        detail="6 terms applied term by term: 5 convs with the raw 3x3 kernel (SOCConv)",
    ),
    Method(
        "conv_spectral_norm_fft",
        f"{_LIP}.conv_spectral_norm",
        ("conv_spectral_norm",),
        (("method", "fft"),),
        detail="exact norm of the circular conv (FFT + SVD per frequency)",
    ),
)


# ----------------------------------------------------------------------------------------------
# The JAX network.


def _maxmin(x: Any) -> Any:
    import jax.numpy as jnp

    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)


def _pad_channels(x: Any, c: int) -> Any:
    import jax.numpy as jnp

    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c - x.shape[-1])])


def _fft_conv_class() -> Any:
    """A circular conv applied in the Fourier domain, with a full ``n x n`` kernel: what the
    Cayley-FFT layers compute (Trockman and Kolter apply them this way), parameters named as
    ``nn.Conv``'s (``kernel`` ``(n, n, in, out)``, ``bias``), so the same registration applies.
    The same operator as ``nn.Conv(out, (n, n), padding="CIRCULAR")`` on ``n x n`` inputs."""
    import flax.linen as nn
    import jax.numpy as jnp

    from paramx._src.parametrizations.convops import frequency_response

    class FFTConv(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            size = x.shape[1:3]
            shape = (*size, x.shape[-1], self.features)
            kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            m = frequency_response(kernel, size)  # (n, n, out, in)
            xf = jnp.fft.fft2(x, axes=(1, 2))
            yf = jnp.einsum("hwoi,bhwi->bhwo", m, xf)
            return jnp.fft.ifft2(yf, axes=(1, 2)).real.astype(x.dtype) + bias

    return FFTConv


def _jax_model(sizes: Sizes, method: Method | None) -> Any:
    """The CNN as a linen module, with the layers ``method`` needs (None: plain 3x3 convs)."""
    import flax.linen as nn
    import jax.numpy as jnp

    w1, w2 = sizes.widths
    padding = "CIRCULAR" if method is None else method.padding
    layer = "conv" if method is None else method.layer
    if layer == "sll":
        from paramx._src.integrations.lipschitz_layers import SLLConv
    if layer == "soc_series":
        from paramx._src.integrations.lipschitz_layers import SOCConv
    if layer == "fft":
        fft_conv = _fft_conv_class()
    ksize = (3, 3)
    if layer == "soc":
        from paramx._src.parametrizations.conv_orthogonal import soc_kernel_size

        ksize = tuple(soc_kernel_size(3, dict(method.kwargs).get("terms", 6)))

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            for i in range(4):
                if i in (0, 2):
                    if i == 2:  # 2 x average pool: 1-Lipschitz
                        x = 2.0 * nn.avg_pool(x, (2, 2), strides=(2, 2))
                    x = _pad_channels(x, w1 if i == 0 else w2)
                c = w1 if i < 2 else w2
                name = f"conv{i}"
                if layer == "sll":
                    x = SLLConv(c, (3, 3), padding=padding, name=name)(x)
                elif layer == "fft":
                    x = _maxmin(fft_conv(c, name=name)(x))
                elif layer == "soc_series":
                    x = _maxmin(SOCConv(c, (3, 3), padding=padding, name=name)(x))
                else:
                    x = _maxmin(nn.Conv(c, ksize, padding=padding, name=name)(x))
            x = jnp.mean(x, axis=(1, 2)) * math.sqrt(x.shape[1] * x.shape[2])
            return nn.Dense(_CLASSES, name="head")(x)

    return CNN()


def _data(sizes: Sizes, seed: int = 0) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sizes.batch, sizes.image, sizes.image, 3)).astype(np.float32)
    y = rng.integers(0, _CLASSES, sizes.batch)
    return x, y


def _resolve(method: Method) -> Callable[..., Any]:
    """The method's paramx function (a tree function, or an SLL linen block class)."""
    try:
        module = importlib.import_module(method.module)
    except ImportError as e:
        raise LookupError(f"{method.module} is not there yet ({e})") from None
    for name in method.function:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    raise LookupError(f"{method.module} has none of {', '.join(method.function)}")


def _geometry(sizes: Sizes, layer: int, padding: str) -> Any:
    from paramx._src.parametrizations.convops import ConvGeometry

    size = sizes.image if layer < 2 else sizes.image // 2
    return ConvGeometry(input_size=(size, size), padding=padding)


def _jax_step(method: Method | None, sizes: Sizes) -> tuple[Callable[[], object], Any]:
    """A zero-argument callable running one jitted Adam step, and the initial plain params."""
    import jax
    import jax.numpy as jnp
    import optax

    import paramx as px

    padding = method.padding if method is not None else "CIRCULAR"
    model = _jax_model(sizes, method)
    x_np, y_np = _data(sizes)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    tree = jax.jit(model.init)(jax.random.key(0), x)
    if method is not None and method.layer not in ("sll", "soc_series", "plain"):
        fn = _resolve(method)
        for i in range(4):
            tree = fn(
                tree,
                f"params/conv{i}/kernel",
                geometry=_geometry(sizes, i, padding),
                **dict(method.kwargs),
            )
    params, state = px.split_state(tree)
    tx = optax.adam(_LR)
    opt_state = tx.init(params)

    def loss_fn(params: Any, state: Any) -> tuple[Any, Any]:
        plain, new_state = px.materialize(params, state, update_state=True)
        logits = model.apply(plain, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_state

    def step(params: Any, state: Any, opt_state: Any) -> tuple:
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    carry = [params, state, opt_state]
    first = jax.tree_util.tree_map(lambda a: a.copy(), px.materialize(params, state))

    def call() -> object:
        params, state, opt_state, loss = step(*carry)
        carry[:] = [params, state, opt_state]
        return jax.block_until_ready(loss)

    return call, first


# ----------------------------------------------------------------------------------------------
# The torch network.


def _torch_model(sizes: Sizes, make: Callable[[int], Any] | None, residual: bool) -> Any:
    """The same CNN in torch; ``make(c)`` builds one constrained layer (None: plain conv)."""
    import torch
    import torch.nn.functional as F

    w1, w2 = sizes.widths

    class MaxMin(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            a, b = x.split(x.shape[1] // 2, 1)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    class CNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers = []
            for i in range(4):
                c = w1 if i < 2 else w2
                if make is None:
                    layers.append(torch.nn.Conv2d(c, c, 3, padding=1, padding_mode="circular"))
                else:
                    layers.append(make(c))
            self.layers = torch.nn.ModuleList(layers)
            self.act = MaxMin()
            self.head = torch.nn.Linear(w2, _CLASSES)

        def forward(self, x: Any) -> Any:
            for i, layer in enumerate(self.layers):
                if i in (0, 2):
                    if i == 2:
                        x = 2.0 * F.avg_pool2d(x, 2)
                    c = w1 if i == 0 else w2
                    x = F.pad(x, (0, 0, 0, 0, 0, c - x.shape[1]))
                x = layer(x) if residual else self.act(layer(x))
            x = x.mean(dim=(2, 3)) * math.sqrt(x.shape[2] * x.shape[3])
            return self.head(x)

    return CNN()


def _torch_step(model: Any, sizes: Sizes) -> Callable[[], object]:
    import torch
    from torch.nn.utils import parametrize

    x_np, y_np = _data(sizes)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(y_np).long()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=_LR)

    def call() -> object:
        opt.zero_grad(set_to_none=True)
        with parametrize.cached():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return call


def _load_plain_weights(model: Any, plain: Any) -> None:
    """Copies the JAX plain CNN's weights into the torch plain CNN (same start, same loss)."""
    import numpy as np
    import torch

    p = plain["params"]
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            k = np.asarray(p[f"conv{i}"]["kernel"])  # (3, 3, in, out) -> (out, in, 3, 3)
            layer.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(p[f"conv{i}"]["bias"]).copy()))
        model.head.weight.copy_(torch.from_numpy(np.asarray(p["head"]["kernel"]).T.copy()))
        model.head.bias.copy_(torch.from_numpy(np.asarray(p["head"]["bias"]).copy()))


# ----------------------------------------------------------------------------------------------
# Rows.


def _cpu_extra(
    fn_a: Callable[[], object], fn_b: Callable[[], object], cfg: SimpleNamespace
) -> dict[str, Any]:
    if cfg.quick or cfg.smoke:
        return {}
    from cases_geotorch import _cpu_times

    a, b = _cpu_times(fn_a, fn_b, cfg.reps)
    return {"paramx_cpu_s": a, "baseline_cpu_s": b, "cpu_ratio": a / b if b else None}


def _timed(
    fn_a: Callable[[], object], fn_b: Callable[[], object], cfg: SimpleNamespace, torch_side: bool
) -> tuple[float, float, dict[str, Any]]:
    """Seconds per call of each side (alternating blocks of at least 0.2 s, medians); for a
    torch side also its one-thread figure, as ``cases_torch._measure`` records it. Smoke runs
    take short blocks (they check that the cases run, not their timings)."""
    if cfg.smoke:
        a, b = measure(fn_a, fn_b, reps=cfg.reps, warmup=1, min_block_s=0.005)
        return a, b, {}
    a, b = measure(fn_a, fn_b, reps=cfg.reps, min_block_s=0.2)
    if not torch_side:
        return a, b, {}
    from cases_torch import _one_thread_s

    one = _one_thread_s(fn_b)
    return (
        a,
        b,
        {
            "torch_1thread_s": one,
            "ratio_vs_torch_1thread": None if one is None else a / one,
            "torch_pool_stalled": None if one is None else bool(b > 2 * one),
        },
    )


def _torch_common(cfg: SimpleNamespace) -> dict[str, Any] | None:
    if getattr(cfg, "no_torch", False):
        return None
    try:
        import torch
    except ImportError:
        print(
            "note: torch is not installed; the lipschitz torch peers are skipped "
            '(pip install -e ".[bench]" orthogonium deel-torchlip)',
            file=sys.stderr,
        )
        return None
    from cases_torch import _cpus, _xla_threads

    default = 1 if cfg.smoke else _cpus()
    threads = int(os.environ.get("PARAMX_BENCH_TORCH_THREADS", "0")) or default
    torch.set_num_threads(threads)
    return {
        "torch_version": torch.__version__.split("+")[0],
        "torch_threads": threads,
        "xla_threads": _xla_threads(),
    }


def _wanted(case: str, cfg: SimpleNamespace) -> bool:
    from fnmatch import fnmatch

    return cfg.only is None or fnmatch(case, cfg.only)


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def rows(cfg: SimpleNamespace) -> Iterator[dict]:
    """Yields the lipschitz rows as each is measured."""
    sizes = _SMOKE if cfg.smoke else _FULL
    shape = f"batch {sizes.batch}, {sizes.image}x{sizes.image}, widths {sizes.widths}"
    common: dict[str, Any] = {"side": "lipschitz", "network": shape}
    cases = ["lipschitz/plain/torch"]
    for m in METHODS:
        cases += [f"lipschitz/{m.name}"] + [f"lipschitz/{m.name}/{p.name}" for p in m.peers]
    if not any(_wanted(c, cfg) for c in cases):
        return  # nothing asked for: not even torch is imported
    plain_fn = None
    plain_first = None
    torch_common = _torch_common(cfg)

    def plain() -> Callable[[], object]:
        nonlocal plain_fn, plain_first
        if plain_fn is None:
            plain_fn, plain_first = _jax_step(None, sizes)
        return plain_fn

    if torch_common is not None and _wanted("lipschitz/plain/torch", cfg):
        jax_fn = plain()
        model = _torch_model(sizes, None, residual=False)
        _load_plain_weights(model, plain_first)
        torch_fn = _torch_step(model, sizes)
        # fresh steps from the same weights: the first losses agree
        jax_fresh, _ = _jax_step(None, sizes)
        loss_diff = abs(float(jax_fresh()) - float(torch_fn().item()))
        paramx_s, torch_s, ref = _timed(jax_fn, torch_fn, cfg, torch_side=True)
        yield row(
            "lipschitz/plain/torch",
            paramx_s,
            f"torch {torch_common['torch_version']} plain Conv2d CNN, eager",
            torch_s,
            None,
            method="plain",
            peer="torch",
            padding="CIRCULAR",
            loss_diff=loss_diff,
            **_cpu_extra(jax_fn, torch_fn, cfg),
            **ref,
            **torch_common,
            **common,
        )

    for method in METHODS:
        case = f"lipschitz/{method.name}"
        if cfg.smoke and method.name not in _SMOKE_METHODS:
            continue  # smoke runs check that the machinery runs: a few methods keep them short
        peers = [p for p in method.peers if _wanted(f"{case}/{p.name}", cfg)]
        if not _wanted(case, cfg) and not peers:
            continue
        try:
            _resolve(method)
        except LookupError as e:
            print(f"note: {case} skipped: {e}", file=sys.stderr)
            continue
        try:
            fn, _ = _jax_step(method, sizes)
        except Exception as e:  # one method's setup must not stop the others
            print(f"note: {case} skipped: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        extra = {"method": method.name, "padding": method.padding, **common}
        if _wanted(case, cfg):
            # The plain CNN with the method's padding (SLL: zero padding).
            base = (
                plain()
                if method.padding == "CIRCULAR"
                else _jax_step(dataclasses.replace(method, layer="plain"), sizes)[0]
            )
            paramx_s, plain_s, _ = _timed(fn, base, cfg, torch_side=False)
            yield row(
                case,
                paramx_s,
                "the same CNN with plain convolutions (jitted JAX)",
                plain_s,
                method.goal,
                peer=None,
                detail=method.detail,
                **_cpu_extra(fn, base, cfg),
                **extra,
            )
        if torch_common is None:
            continue

        for peer in peers:
            pcase = f"{case}/{peer.name}"
            try:
                make = lambda c, p=peer, pad=method.padding: p.make(c, pad)
                model = _torch_model(sizes, make, method.layer == "sll")
                torch_fn = _torch_step(model, sizes)
                torch_fn()
            except ImportError:
                print(
                    f"note: {pcase} skipped: {peer.dist} is not installed "
                    f"(pip install {peer.dist})",
                    file=sys.stderr,
                )
                continue
            except Exception as e:
                print(f"note: {pcase} skipped: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            paramx_s, torch_s, ref = _timed(fn, torch_fn, cfg, torch_side=True)
            yield row(
                pcase,
                paramx_s,
                f"{peer.dist} {_version(peer.dist)}",
                torch_s,
                peer.goal,
                peer=peer.name,
                baseline_detail=f"{peer.detail}, eager torch {torch_common['torch_version']}, "
                f"{torch_common['torch_threads']} threads",
                **_cpu_extra(fn, torch_fn, cfg),
                **ref,
                **torch_common,
                **extra,
            )


def main(argv: list[str] | None = None) -> int:
    """``run.py``'s command line, running only these cases."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    import run

    run.case_modules = lambda args: [sys.modules[__name__]]  # type: ignore[assignment]
    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
