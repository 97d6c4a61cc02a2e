"""`linear(x, w, b)` and `linears(x, ws, bs)`: F.linear, with a native path for the
few-row fp32 products of decode.

On CPU a decode step is a few rows times every weight matrix. PyTorch sends those to
MKL's GEMV/small-M GEMM, which on this project's AMD test machine reads weights at about
half the memory bandwidth and gets slower from 2 rows on (benchmarks/bench_kernels.py).
kernels/linear_f32.c streams each weight row once per tile of up to 4 x rows: close to
the bandwidth for 1 row, and more FLOP/s than MKL up to 64 rows. It has an AVX2 path and an
AVX-512 one (wider tiles), chosen from what the CPU reports; `simd_path()` says which.
`linears` runs several matrices that read the same x (q/k/v, gate/up) in one call without
concatenating them.
Larger products (prefill, training) stay with PyTorch, as does anything that needs
autograd, another dtype or device, or runs under torch.compile.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from qkv.kernels import native

MAX_ROWS = 64  # above this MKL's blocked GEMM wins (bench_kernels.py)
MAX_MATS = 8  # the C side's limit per call

_linear = native.Kernel(
    "linear_f32",
    "qkv_linear_f32",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int],
)

_isa = native.Kernel("linear_f32", "qkv_linear_f32_isa", [], ctypes.c_int)
_set_isa = native.Kernel("linear_f32", "qkv_linear_f32_set_isa", [ctypes.c_int])
_ISA_NAMES = {1: "avx2", 2: "avx512"}
_ISA_CODES = {name: code for code, name in _ISA_NAMES.items()}


def simd_path() -> str | None:
    """The path the native kernel takes on this CPU, "avx512" or "avx2"; None without it."""
    fn = _isa.get()
    return None if fn is None else _ISA_NAMES[fn()]


@contextlib.contextmanager
def pinned_simd_path(name: str) -> Iterator[None]:
    """Run the native kernel's `name` path inside this block ("avx2" runs on any CPU that has
    the kernel; "avx512" only where the CPU has it), so tests and benchmarks can compare them."""
    before = simd_path()
    if before is None:
        raise RuntimeError("the native fp32 kernel is not available here")
    _set_isa.get()(_ISA_CODES[name])
    try:
        if simd_path() != name:
            raise RuntimeError(f"this CPU cannot run the {name} path")
        yield
    finally:
        _set_isa.get()(_ISA_CODES[before])


def native_applies(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] = ()
) -> bool:
    """Whether the native path takes x times these (out, in) weights (and biases)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or _linear.get() is None:
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0 or len(weights) > MAX_MATS:
        return False
    n_in = x.shape[-1]
    if x.numel() > MAX_ROWS * n_in:
        return False
    for w in weights:
        if (
            w.dtype != torch.float32
            or w.dim() != 2
            or w.shape[1] != n_in
            or not w.is_contiguous()
            or w.device.type != "cpu"
        ):
            return False
    for b in biases:
        if b is not None and (b.dtype != torch.float32 or not b.is_contiguous() or b.device.type != "cpu"):
            return False
    return True


# pointer arrays for the C call, per group of weights (a model has a few dozen groups);
# keyed by address and shape, which is all the arrays hold
_plans: dict[tuple, tuple] = {}


def _plan(weights, biases) -> tuple:
    key = tuple(
        (w.data_ptr(), w.shape[0], w.shape[1], 0 if b is None else b.data_ptr()) for w, b in zip(weights, biases)
    )
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 4096:
            _plans.clear()
        n = len(weights)
        plan = _plans[key] = (
            (ctypes.c_void_p * n)(*[w.data_ptr() for w in weights]),
            (ctypes.c_void_p * n)(*[None if b is None else b.data_ptr() for b in biases]),
            (ctypes.c_int64 * n)(*[w.shape[0] for w in weights]),
        )
    return plan


def linears(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """[F.linear(x, w, b) for each w, b], in one native call where it applies."""
    if biases is None:
        biases = [None] * len(weights)
    if not native_applies(x, weights, biases):
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    x = x.contiguous()
    lead, n_in = x.shape[:-1], x.shape[-1]
    w_ptrs, b_ptrs, n_out = _plan(weights, biases)
    ys = [torch.empty(*lead, w.shape[0]) for w in weights]
    y_ptrs = (ctypes.c_void_p * len(ys))(*[y.data_ptr() for y in ys])
    _linear.get()(
        x.data_ptr(), x.numel() // n_in, n_in, len(ys), w_ptrs, b_ptrs, y_ptrs, n_out, torch.get_num_threads()
    )
    return ys


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like F.linear."""
    return linears(x, [weight], [bias])[0]
