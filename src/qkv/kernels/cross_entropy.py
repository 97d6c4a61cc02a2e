"""The softmax step of the fused cross-entropy for bf16 logits, one pass per row
(kernels/cross_entropy.c).

Under bf16 autocast the fused linear + cross-entropy (model/loss.py) forms a chunk of bf16
logits, then needs each row's loss and its gradient softmax - one_hot in bf16. PyTorch's ops
take four passes over the chunk for that; the kernel takes one, with the row in cache. The
training side installs `rows` into the loss (model/loss.py's `install_row_kernel`); the
model never imports it.
"""

from __future__ import annotations

import ctypes

import torch

from qkv.kernels import native

_rows = native.Kernel(
    "cross_entropy",
    "qkv_cross_entropy_bf16",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int],
    ctypes.c_int,
)


def applies(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these logits: a contiguous 2-D bf16 CPU tensor, outside
    torch.compile, where the native kernels run."""
    return (
        logits.dtype == torch.bfloat16
        and logits.device.type == "cpu"
        and logits.dim() == 2
        and logits.is_contiguous()
        and not torch.compiler.is_compiling()
        and _rows.get() is not None
    )


def rows(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(summed loss of the valid rows, fp32; the gradient softmax - one_hot in bf16, zero on
    invalid rows, written over `logits`, or None when not wanted), or None where the kernel
    does not apply. targets: (n,) indices (any value on invalid rows); valid: (n,) bool."""
    if not applies(logits):
        return None
    n, v = logits.shape
    targets = targets.to(torch.int64).contiguous()
    valid_bytes = valid.to(torch.uint8).contiguous()
    loss = torch.empty(n, dtype=torch.float32)
    with torch.no_grad():
        grad_ptr = logits.data_ptr() if want_grad else None
        status = _rows.get()(
            logits.data_ptr(),
            n,
            v,
            targets.data_ptr(),
            valid_bytes.data_ptr(),
            loss.data_ptr(),
            grad_ptr,
            torch.get_num_threads(),
        )
    if status == 1:
        raise IndexError(f"cross-entropy: a target is outside the vocabulary of {v}")
    if status:
        raise MemoryError("cross-entropy: no memory for the kernel's row buffers")
    return loss.sum(), (logits if want_grad else None)
