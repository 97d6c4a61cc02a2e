"""GELU with the tanh approximation, forward and backward in native kernels
(kernels/gelu.c), for fp32 and bf16 tensors, arithmetic in fp32.

PyTorch's CPU kernel for the tanh form runs at a quarter of its erf form's speed; GPT-2 and
Gemma use the tanh form in every MLP. The training side installs `gelu_tanh` into the model
(model/layers.py's `install_gelu_tanh_kernel`); the model never imports it. Where it does not
apply it returns None and the model calls F.gelu.
"""

from __future__ import annotations

import ctypes

import torch

from qkv.kernels import native

_fwd = native.Kernel("gelu", "qkv_gelu_tanh_fwd", [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int])
_bwd = native.Kernel("gelu", "qkv_gelu_tanh_bwd", [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int])
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def applies(x: torch.Tensor) -> bool:
    """A contiguous fp32 or bf16 CPU tensor, outside torch.compile, where the kernels build."""
    return (
        x.dtype in _DTYPES
        and x.device.type == "cpu"
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
        and _fwd.get() is not None
    )


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        _fwd.get()(x.data_ptr(), y.data_ptr(), x.numel(), _DTYPES[x.dtype], torch.get_num_threads())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = grad.to(x.dtype).contiguous()
        dx = torch.empty_like(x)
        _bwd.get()(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), _DTYPES[x.dtype], torch.get_num_threads())
        return dx


def gelu_tanh(x: torch.Tensor) -> torch.Tensor | None:
    """F.gelu(x, approximate="tanh"), differentiable; None where the kernel does not apply."""
    if not applies(x):
        return None
    return _GeluTanh.apply(x)
