"""`linear(x, blocks, qtype, bias)`: x W^T + b with W kept in GGUF's quantized blocks, for
the few rows of a decode step on the CPU (kernels/quant_linear.c).

Decode reads every weight once per step, so its speed is the bytes read: per weight Q8_0
reads 8.5 bits (3.8x fewer than fp32, 1.9x fewer than bf16), Q6_K 6.56, Q4_0 and Q4_K
4.5 (7.1x fewer than fp32). The kernel rounds each row of x to int8
(per block, as llama.cpp does) and multiplies it with the blocks as they lie on disk.
Where it does not apply (autograd, torch.compile, more than 64 rows, not fp32 CPU x,
kernels off or unbuilt) `linear` returns None and the caller dequantizes instead.
"""

from __future__ import annotations

import ctypes

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qkv.kernels import native

MAX_ROWS = 64  # the C side's limit: its per-row accumulators are sized for it
_NAMES = ("Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "F16", "BF16")
FORMATS = tuple(GGMLQuantizationType[name] for name in _NAMES)
ISAS = ("portable", "avx2", "avx512")  # as the C side numbers its paths

_args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
_args += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_linear = native.Kernel("quant_linear", "qkv_quant_linear", _args, ctypes.c_int)
_linear_isa = native.Kernel("quant_linear", "qkv_quant_linear_isa", _args + [ctypes.c_int], ctypes.c_int)
_best_isa = native.Kernel("quant_linear", "qkv_quant_isa", [], ctypes.c_int)
_path = native.Kernel("quant_linear", "qkv_quant_path", [ctypes.c_int], ctypes.c_int)
_ERRORS = {
    1: "unsupported quantization type",
    2: "bad shape: n_in must be a multiple of the block size and rows at most 64",
    3: "this CPU lacks the instructions of the requested path",
    4: "out of memory for the rounded activations",
}


def qtype_of(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """The gguf enum for 'q4_0', 'Q4_K', 2 or GGMLQuantizationType.Q4_0."""
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown quantization type {qtype!r}: use a gguf type name such as 'q4_0'") from None
    return GGMLQuantizationType(int(qtype))


def supported(qtype: str | int | GGMLQuantizationType) -> bool:
    """Whether the kernel multiplies this format directly (independent of this machine)."""
    try:
        return qtype_of(qtype) in FORMATS
    except ValueError:
        return False


def isa(qtype: str | int | GGMLQuantizationType | None = None) -> str:
    """The newest path this CPU runs ('avx512', 'avx2'), or with a format the path `linear`
    takes for it (the 32-weight formats stay on AVX2 code: it is faster there); 'off' where
    the kernels are disabled, unbuilt or the CPU lacks AVX2."""
    best, path = _best_isa.get(), _path.get()
    if best is None or path is None:
        return "off"
    return ISAS[best() if qtype is None else path(int(qtype_of(qtype)))]


def row_bytes(n_in: int, qtype: str | int | GGMLQuantizationType) -> int:
    """Bytes of one weight row of n_in weights in this format."""
    block, size = GGML_QUANT_SIZES[qtype_of(qtype)]
    if n_in % block:
        raise ValueError(f"{n_in} inputs are not a whole number of {block}-weight blocks of {qtype_of(qtype).name}")
    return n_in // block * size


def linear(
    x: torch.Tensor, blocks: torch.Tensor, qtype: str | int | GGMLQuantizationType, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x @ W.T + bias with W given as `blocks`: uint8 (n_out, row_bytes), the tensor's bytes
    as in the GGUF file. None where the kernel does not apply."""
    return _run(x, blocks, qtype, bias, None)


def _applies(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0 or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if blocks.dtype != torch.uint8 or blocks.device.type != "cpu" or blocks.dim() != 2 or not blocks.is_contiguous():
        return False
    return bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.is_contiguous())


_formats: dict = {}  # the caller's qtype (str, int or enum) -> (enum, block size, block bytes), or None


def _format(qtype) -> tuple[GGMLQuantizationType, int, int] | None:
    """Decode calls this for every matrix of every step: look the type up once."""
    info = _formats.get(qtype, False)
    if info is False:
        qt = qtype_of(qtype)
        info = _formats[qtype] = (qt, *GGML_QUANT_SIZES[qt]) if qt in FORMATS else None
    return info


def _run(x, blocks, qtype, bias, isa: str | None) -> torch.Tensor | None:
    """`linear` through one path ('portable', 'avx2', 'avx512'; None: the best here)."""
    info = _format(qtype)
    kernel = _linear if isa is None else _linear_isa
    if info is None or not _applies(x, blocks, bias) or kernel.get() is None:
        return None
    qt, block, size = info
    n_in, n_out = x.shape[-1], blocks.shape[0]
    if n_in % block or blocks.shape[1] != n_in // block * size:
        raise ValueError(
            f"weight rows of {blocks.shape[1]} bytes do not hold {n_in} {qt.name} weights "
            f"({n_in / block * size:g} bytes): pass blocks shaped (n_out, row_bytes)"
        )
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {n_out} outputs")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n_out)
    args = [x.data_ptr(), x.numel() // n_in, n_in, blocks.data_ptr(), int(qt), n_out]
    args += [None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads()]
    status = kernel.get()(*args) if isa is None else kernel.get()(*args, ISAS.index(isa))
    if status:
        raise RuntimeError(f"qkv_quant_linear failed: {_ERRORS.get(status, status)}")
    return y
