"""`rms_norm` and `rope` for the few rows of a decode step (kernels/decode_ops_f32.c).

Callers check `applies` (fp32 CPU tensors, no autograd, no torch.compile, at most
MAX_ROWS rows). The inference backend's NativeRMSNorm (infer/backend.py) calls `rms_norm`;
the fused decode block #includes the same C for both, and tests hold each kernel here to
the model's PyTorch code."""

from __future__ import annotations

import ctypes

import torch

from qkv.kernels import native

MAX_ROWS = 64  # tokens; beyond a decode batch PyTorch's vectorised ops are as good

_rms_norm = native.Kernel(
    "decode_ops_f32", "qkv_rms_norm_f32", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
)
_rope = native.Kernel("decode_ops_f32", "qkv_rope_f32", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4)


def applies(*tensors: torch.Tensor, rows: int) -> bool:
    """Whether the native ops take these (contiguous fp32 CPU) tensors of `rows` tokens."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or rows > MAX_ROWS:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    return _rms_norm.get() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight."""
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _rms_norm.get()(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, D); cos/sin: (B or 1, T, 1, D) angles gathered at the positions."""
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    _rope.get()(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B * T, H, D, cos.shape[0] * cos.shape[1])
    return y
