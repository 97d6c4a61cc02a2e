"""`linear(x, w, b)` and `linears(x, ws, bs)`: F.linear, with a native path for the
few-row fp32 products of decode.

On CPU a decode step is a few rows times every weight matrix. PyTorch sends those to
MKL's GEMV/small-M GEMM, which on this project's AMD test machine reads weights at about
half the memory bandwidth and gets slower from 2 rows on (benchmarks/bench_kernels.py).
kernels/linear_f32.c streams each weight row once per tile of up to 4 x rows: close to
the bandwidth for 1 row, and more FLOP/s than MKL up to 64 rows. `linears` runs several
matrices that read the same x (q/k/v, gate/up) in one call without concatenating them.
Larger products (prefill, training) stay with PyTorch, as does anything that needs
autograd, another dtype or device, or runs under torch.compile.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from qkv.kernels import native

MAX_ROWS = 64  # above this MKL's blocked GEMM wins (bench_kernels.py)
MAX_MATS = 8  # the C side's limit per call

_fn = None


def _kernel():
    """The C function, or False when it cannot be built here."""
    global _fn
    if _fn is None:
        lib = native.load("linear_f32")
        if lib is None:
            _fn = False
        else:
            _fn = lib.qkv_linear_f32
            _fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
            _fn.restype = None
    return _fn


def native_applies(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the native path takes x times these (out, in) weights (and biases)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0 or len(weights) > MAX_MATS:
        return False
    for w in weights:
        if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] != x.shape[-1] or not w.is_contiguous() or w.device.type != "cpu":
            return False
    for b in biases:
        if b is not None and (b.dtype != torch.float32 or not b.is_contiguous() or b.device.type != "cpu"):
            return False
    return x.numel() // x.shape[-1] <= MAX_ROWS and bool(_kernel())


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """[F.linear(x, w, b) for each w, b], in one native call where it applies."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    if not native_applies(x, weights, biases):
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    ys = [torch.empty(x2.shape[0], w.shape[0]) for w in weights]
    n_out = (ctypes.c_int64 * len(weights))(*[w.shape[0] for w in weights])
    _fn(x2.data_ptr(), x2.shape[0], x2.shape[1], len(weights), _pointers(weights), _pointers(biases), _pointers(ys),
        n_out, torch.get_num_threads())
    return [y.view(*x.shape[:-1], y.shape[1]) for y in ys]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias, like F.linear."""
    return linears(x, [weight], [bias])[0]
