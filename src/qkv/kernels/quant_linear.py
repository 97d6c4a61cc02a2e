"""`linear(x, blocks, qtype, bias)`: x W^T + b with W kept in GGUF's quantized blocks, for
the few rows of a decode step on the CPU (kernels/quant_linear.c).

Decode reads every weight once per step, so its speed is the bytes read: per weight Q8_0
reads 8.5 bits (3.8x fewer than fp32, 1.9x fewer than bf16), Q6_K 6.56, Q4_0 and Q4_K
4.5 (7.1x fewer than fp32). The kernel rounds each row of x to int8
(per block, as llama.cpp does) and multiplies it with the blocks as they lie on disk.
Where it does not apply (autograd, torch.compile, more than 64 rows, not fp32 CPU x,
kernels off or unbuilt) `linear` returns None and the caller dequantizes instead.

`dequantize(blocks, qtype, n_in, rows)`: rows of blocks as fp32, bit for bit what
gguf.quants.dequantize gives, in native code. `tiled_linear` dequantizes a tile of weight rows
at a time with it and multiplies the tile with torch.mm (fp32 x, no int8 rounding): the tied
output head over many rows, and the forward of training through frozen quantized weights.
"""

from __future__ import annotations

import ctypes

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qkv.kernels import native

MAX_ROWS = 64  # the C side's limit: its per-row accumulators are sized for it
# weight rows dequantized at a time by `tiled_linear`: 256 to 2048 ran alike on one core
# (bench_quant_prefill.py; a tile stays in L2), the whole 49152-row head at half the speed;
# the fewer tiles, the fewer thread hand-offs, which a loaded machine makes costly
TILE_ROWS = 1024
_NAMES = ("Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "F16", "BF16")
FORMATS = tuple(GGMLQuantizationType[name] for name in _NAMES)
ISAS = ("portable", "avx2", "avx512", "avx512vnni")  # as the C side numbers its paths

_args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
_args += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_linear = native.Kernel("quant_linear", "qkv_quant_linear", _args, ctypes.c_int)
_linear_isa = native.Kernel("quant_linear", "qkv_quant_linear_isa", _args + [ctypes.c_int], ctypes.c_int)
_best_isa = native.Kernel("quant_linear", "qkv_quant_isa", [], ctypes.c_int)
_path = native.Kernel("quant_linear", "qkv_quant_path", [ctypes.c_int], ctypes.c_int)
_deq_args = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
_dequantize = native.Kernel("quant_linear", "qkv_quant_dequantize", _deq_args, ctypes.c_int)
_dequantize_isa = native.Kernel("quant_linear", "qkv_quant_dequantize_isa", _deq_args + [ctypes.c_int], ctypes.c_int)
_shape = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]  # type, n_rows, n_in
_repack = native.Kernel("quant_linear", "qkv_quant_repack", [ctypes.c_void_p, *_shape, ctypes.c_int, ctypes.c_int])
_rows_args = [ctypes.c_void_p, *_shape, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
_rows = native.Kernel("quant_linear", "qkv_quant_rows", _rows_args, ctypes.c_int)
DEQUANTIZE_FORMATS = (*FORMATS, GGMLQuantizationType.F32)
# a gguf type code plus this flag: Q8_0 / Q4_0 / Q5_0 rows repacked sixteen at a time (qkv.quant.repack,
# kernels/quant_linear_x16.c); `linear`, `tiled_linear` and `dequantize` take these codes too
REPACKED = 0x100
INTERLEAVE = 16  # weight rows per repacked group
REPACKED_FORMATS = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0)
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


def kernel_type(qtype: str | int | GGMLQuantizationType, repacked: bool = False) -> int:
    """The type code the C kernels take for rows of this format: the gguf id, or with
    `repacked` (Q8_0 / Q4_0 / Q5_0 only) the id of the sixteen-row layout."""
    qt = qtype_of(qtype)
    if not repacked:
        return int(qt)
    if qt not in REPACKED_FORMATS:
        raise ValueError(f"{qt.name} has no repacked layout: only Q8_0, Q4_0 and Q5_0 do")
    return REPACKED | int(qt)


def _code_info(qtype, formats) -> tuple[int, GGMLQuantizationType, int, int] | None:
    """(kernel code, gguf format, block size, block bytes) of a caller's qtype (a name, a gguf
    type, or a kernel code with the REPACKED flag), or None for a format not in `formats`."""
    if isinstance(qtype, int) and not isinstance(qtype, GGMLQuantizationType) and qtype & REPACKED:
        qt = GGMLQuantizationType(qtype & ~REPACKED)
        return (qtype, qt, *GGML_QUANT_SIZES[qt]) if qt in REPACKED_FORMATS else None
    qt = qtype_of(qtype)
    return (int(qt), qt, *GGML_QUANT_SIZES[qt]) if qt in formats else None


def supported(qtype: str | int | GGMLQuantizationType) -> bool:
    """Whether the kernel multiplies this format directly (independent of this machine)."""
    try:
        return qtype_of(qtype) in FORMATS
    except ValueError:
        return False


def isa(qtype: str | int | GGMLQuantizationType | None = None) -> str:
    """The newest path this CPU runs ('avx512vnni', 'avx512', 'avx2'), or with a format (or a
    kernel_type code) the path `linear` takes for it (the 32-weight formats in the file's layout
    stay on AVX2 code: it is faster there; VNNI code exists for repacked rows, which take the
    newest); 'off' where
    the kernels are disabled, unbuilt or the CPU lacks AVX2."""
    best, path = _best_isa.get(), _path.get()
    if best is None or path is None:
        return "off"
    if qtype is None:
        return ISAS[best()]
    repacked = isinstance(qtype, int) and not isinstance(qtype, GGMLQuantizationType) and qtype & REPACKED
    return ISAS[path(qtype if repacked else int(qtype_of(qtype)))]


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


_formats: dict = {}  # the caller's qtype (str, int or enum) -> _code_info's tuple, or None


def _format(qtype) -> tuple[int, GGMLQuantizationType, int, int] | None:
    """Decode calls this for every matrix of every step: look the type up once."""
    info = _formats.get(qtype, False)
    if info is False:
        info = _formats[qtype] = _code_info(qtype, FORMATS)
    return info


def _run(x, blocks, qtype, bias, isa: str | None) -> torch.Tensor | None:
    """`linear` through one path ('portable', 'avx2', 'avx512', 'avx512vnni'; None: the best here)."""
    info = _format(qtype)
    kernel = _linear if isa is None else _linear_isa
    if info is None or not _applies(x, blocks, bias) or kernel.get() is None:
        return None
    code, qt, block, size = info
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
    args = [x.data_ptr(), x.numel() // n_in, n_in, blocks.data_ptr(), code, n_out]
    args += [None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads()]
    status = kernel.get()(*args) if isa is None else kernel.get()(*args, ISAS.index(isa))
    if status:
        raise RuntimeError(f"qkv_quant_linear failed: {_ERRORS.get(status, status)}")
    return y


def dequantize(
    blocks: torch.Tensor,
    qtype: str | int | GGMLQuantizationType,
    n_in: int,
    rows: slice | range | None = None,
    out: torch.Tensor | None = None,
    isa: str | None = None,
) -> torch.Tensor | None:
    """Weight rows `rows` (a step-1 slice or range; None: all) of `blocks`, uint8 (n_out,
    row_bytes), as fp32 (len(rows), n_in), bit for bit gguf.quants.dequantize's values,
    written into `out` when given (a contiguous fp32 tensor of at least that many elements;
    the result is a view of it). `isa` picks a path ('portable', 'avx2'; None: the best here).
    None where the native kernels are off or the format is one they do not read."""
    info, fn = _deq_format(qtype), (_dequantize if isa is None else _dequantize_isa).get()
    if fn is None or info is None:
        return None
    code = info[0]
    _check_blocks(blocks, info, n_in)
    if isinstance(rows, range):
        start, stop, step = rows.start, rows.stop, rows.step
    else:
        start, stop, step = (rows or slice(None)).indices(blocks.shape[0])
    if step != 1 or not 0 <= start <= stop <= blocks.shape[0]:
        raise ValueError(f"rows {rows} are not a step-1 range inside 0..{blocks.shape[0]}: pass slice(start, stop)")
    _check_groups(code, start, stop, blocks.shape[0])
    n = stop - start
    if out is None:
        out = torch.empty(n * n_in)
    elif out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < n * n_in:
        raise ValueError(f"out must be a contiguous fp32 CPU tensor of at least {n * n_in} elements")
    result = out.view(-1)[: n * n_in].view(n, n_in)
    _dequantize_rows(fn, blocks, code, n_in, start, result, None if isa is None else ISAS.index(isa))
    return result


_deq_formats: dict = {}  # the caller's qtype -> _code_info's tuple, or None: what dequantize reads


def _deq_format(qtype) -> tuple[int, GGMLQuantizationType, int, int] | None:
    """A prefill calls this for every matrix: look the type up once."""
    info = _deq_formats.get(qtype, False)
    if info is False:
        info = _deq_formats[qtype] = _code_info(qtype, DEQUANTIZE_FORMATS)
    return info


def repack_rows(blocks: torch.Tensor, qtype: str | int | GGMLQuantizationType, pack: bool) -> bool:
    """Q8_0 / Q4_0 / Q5_0 rows (contiguous uint8 CPU (n_rows, row_bytes)) between the file's
    layout and the sixteen-row one in place natively (pack: to it); False where the kernels
    are off (qkv.quant.repack does it in torch then)."""
    fn, qt = _repack.get(), qtype_of(qtype)
    if fn is None or blocks.device.type != "cpu" or qt not in REPACKED_FORMATS:
        return False
    n_in = blocks.shape[1] // GGML_QUANT_SIZES[qt][1] * 32
    status = fn(blocks.data_ptr(), int(qt), blocks.shape[0], n_in, int(pack), torch.get_num_threads())
    if status:
        raise RuntimeError(f"qkv_quant_repack failed: {_ERRORS.get(status, status)}")
    return True


def rows(blocks: torch.Tensor, code: int, n_in: int, idx: torch.Tensor) -> torch.Tensor | None:
    """Rows idx (int indices, any shape, negative from the end) of blocks laid out as kernel type
    `code`, in the file's layout: (*idx.shape, row_bytes) uint8. None where the kernels are off."""
    fn = _rows.get()
    if fn is None or blocks.device.type != "cpu":
        return None
    flat = idx.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), blocks.shape[1], dtype=torch.uint8)
    status = fn(blocks.data_ptr(), code, blocks.shape[0], n_in, flat.data_ptr(), flat.numel(), out.data_ptr())
    if status == 2:
        raise IndexError(f"row index out of range for {blocks.shape[0]} rows")
    if status:
        raise RuntimeError(f"qkv_quant_rows failed: {_ERRORS.get(status, status)}")
    return out.view(*idx.shape, blocks.shape[1])


def _check_groups(code: int, start: int, stop: int, n_rows: int) -> None:
    """Repacked rows are read a group at a time: a range must start on a group and end on one
    or at the last row (the tail after the last group is in the file's layout)."""
    if code & REPACKED and (start % INTERLEAVE or (stop % INTERLEAVE and stop != n_rows)):
        raise ValueError(
            f"rows {start}..{stop} of repacked blocks cut a sixteen-row group: start and stop on multiples of 16 "
            "(or stop at the last row), or unpack the rows with qkv.quant.repack.rows"
        )


def _check_blocks(blocks: torch.Tensor, info: tuple[int, GGMLQuantizationType, int, int], n_in: int) -> None:
    if blocks.dtype != torch.uint8 or blocks.device.type != "cpu" or blocks.dim() != 2 or not blocks.is_contiguous():
        got = f"{blocks.dtype} {tuple(blocks.shape)} on {blocks.device}"
        raise ValueError(f"blocks must be a contiguous uint8 CPU tensor (n_out, row_bytes), got {got}")
    _, qt, block, size = info
    if n_in % block or blocks.shape[1] != n_in // block * size:
        raise ValueError(
            f"weight rows of {blocks.shape[1]} bytes do not hold {n_in} {qt.name} weights "
            f"({n_in / block * size:g} bytes): pass blocks shaped (n_out, row_bytes)"
        )


def _dequantize_rows(fn, blocks, code: int, n_in: int, start: int, out: torch.Tensor, isa: int | None):
    """Rows start..start + len(out) of checked blocks into out (n, n_in) through the C function fn."""
    if not out.shape[0]:
        return
    at = blocks.data_ptr() + start * blocks.shape[1]  # contiguous uint8: a row is shape[1] bytes
    args = [at, code, out.shape[0], n_in, out.data_ptr(), torch.get_num_threads()]
    status = fn(*args) if isa is None else fn(*args, isa)
    if status:
        raise RuntimeError(f"qkv_quant_dequantize failed: {_ERRORS.get(status, status)}")


def tiled_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: str | int | GGMLQuantizationType,
    bias: torch.Tensor | None = None,
    tile_rows: int = TILE_ROWS,
) -> torch.Tensor | None:
    """x @ W.T + bias for many rows of x: `tile_rows` weight rows at a time are
    dequantized natively into one scratch tile and multiplied by torch.mm straight into their
    columns of the output, so memory stays at the blocks plus one fp32 tile. Unlike `linear`
    x is not rounded to int8: the result is F.linear(x, dequantized W, bias) up to the GEMM's
    float rounding. None where it does not apply (autograd through x or the bias,
    torch.compile, not fp32 CPU x, kernels off or unbuilt, a format they do not read)."""
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    info, fn = _deq_format(qtype), _dequantize.get()
    if fn is None or info is None:
        return None
    if tile_rows < 1:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    code, n_in, n_out = info[0], x.shape[-1], blocks.shape[0]
    _check_blocks(blocks, info, n_in)
    if code & REPACKED:
        tile_rows = max(INTERLEAVE, tile_rows // INTERLEAVE * INTERLEAVE)  # whole groups
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {n_out} outputs")
    rows = x.reshape(-1, n_in)
    y = torch.empty(rows.shape[0], n_out)
    if y.numel():
        scratch = torch.empty(min(tile_rows, n_out) * n_in)
        for start in range(0, n_out, tile_rows):
            stop = min(start + tile_rows, n_out)
            w = scratch[: (stop - start) * n_in].view(stop - start, n_in)
            _dequantize_rows(fn, blocks, code, n_in, start, w, None)
            if bias is None:
                torch.mm(rows, w.t(), out=y[:, start:stop])
            else:
                torch.addmm(bias[start:stop], rows, w.t(), out=y[:, start:stop])
    return y.reshape(*x.shape[:-1], n_out)
