"""Causal self-attention for training, forward and backward in one native kernel each
(kernels/causal_attention.c), for fp32 and bf16 q/k/v, all arithmetic in fp32.

torch's CPU flash-attention kernel, which scaled_dot_product_attention picks for a causal
training step, runs its backward on small blocks at a fraction of the machine's rate; this
kernel keeps a head's K/V in cache and register-tiles every product. The training side
installs `attention` into the model (model/attention.py's `install_causal_kernel`); the model
never imports it. Where it does not apply (a mask, dropout, a head size that is not a multiple
of 8, torch.compile, no native kernels) it returns None and the model uses SDPA.
"""

from __future__ import annotations

import ctypes

import torch

from qkv.kernels import native

_i64p = ctypes.POINTER(ctypes.c_int64)
_fwd = native.Kernel(
    "causal_attention",
    "qkv_causal_attention_fwd",
    [ctypes.c_void_p] * 3
    + [ctypes.c_int]
    + [ctypes.c_int64] * 6
    + [_i64p] * 3
    + [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
    ctypes.c_int,
)
_bwd = native.Kernel(
    "causal_attention",
    "qkv_causal_attention_bwd",
    [ctypes.c_void_p] * 4
    + [ctypes.c_int]
    + [ctypes.c_int64] * 6
    + [_i64p] * 4
    + [ctypes.c_void_p, ctypes.c_float]
    + [ctypes.c_void_p] * 3
    + [ctypes.c_int],
    ctypes.c_int,
)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """q (B, H, T, D), k/v (B, Hkv, S, D) of one dtype (fp32 or bf16) on the CPU, last axis
    contiguous, H a multiple of Hkv, S >= T, D a multiple of 8; outside torch.compile."""
    if torch.compiler.is_compiling() or q.dtype not in _DTYPES or _fwd.get() is None:
        return False
    if any(t.dtype != q.dtype or t.device.type != "cpu" or t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return False
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    return k.shape == v.shape and k.shape[0] == B and k.shape[3] == D and H % Hkv == 0 and S >= T > 0 and D % 8 == 0


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        o = torch.empty(B, T, H, D, dtype=q.dtype)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        status = _fwd.get()(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), _DTYPES[q.dtype], B, H, Hkv, T, S, D,
            _strides(q), _strides(k), _strides(v), scale, o.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError("causal attention: no memory for the kernel's buffers")
        ctx.save_for_backward(q, k, v, lse)
        ctx.scale = scale
        return o.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        grad_out = grad_out.to(q.dtype)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq = torch.empty(B, T, H, D, dtype=q.dtype)
        dk = torch.empty(B, S, Hkv, D, dtype=q.dtype)
        dv = torch.empty(B, S, Hkv, D, dtype=q.dtype)
        status = _bwd.get()(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), _DTYPES[q.dtype],
            B, H, Hkv, T, S, D, _strides(q), _strides(k), _strides(v), _strides(grad_out), lse.data_ptr(),
            ctx.scale, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError("causal attention: no memory for the kernel's buffers")
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(scale q kᵀ + causal mask) v as (B, H, T, D), differentiable in q, k and v; None
    where the kernel does not apply."""
    if not applies(q, k, v):
        return None
    return _CausalAttention.apply(q, k, v, scale)
