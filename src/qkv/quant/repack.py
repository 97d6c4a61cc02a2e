"""Q8_0 / Q4_0 / Q5_0 weight rows interleaved sixteen at a time for the native decode kernel.

The layout is kernels/quant_linear_x16.c's (its comment is the definition): the first
n_out // 16 * 16 rows in groups of sixteen, each group in the bytes its rows took, block b of
the sixteen rows as their sixteen fp16 scales, (Q5_0) their sixteen 4-byte qh words, then the
qs bytes in 64-byte chunks, chunk c holding bytes 4c..4c+3 of each row's qs; the last
n_out % 16 rows stay as in the file. It is a
byte permutation of the file's bytes, so repacking happens in place (no memory grows) and
unpacking gives the file's bytes back exactly. The native kernels do it where they run; the
torch indexing here defines it too and serves any device and the kernels off.
"""

from __future__ import annotations

import functools
import os

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qkv.kernels import quant_linear

INTERLEAVE = 16  # weight rows per group
FORMATS = ("Q8_0", "Q4_0", "Q5_0")  # what the sixteen-row kernel reads
GROUPS_PER_STEP = 1024  # groups permuted at a time: bounds the scratch copy (the Gemma 3 head: 11 MB)


def enabled() -> bool:
    """Whether modules repack on prepare_for_inference: QKV_REPACK=0 keeps the file's layout
    (an A/B switch for benchmarks)."""
    return os.environ.get("QKV_REPACK", "1") != "0"


def repackable(qtype: str, n_rows: int) -> bool:
    """Whether rows of this format can be repacked and at least one group fills."""
    return qtype.upper() in FORMATS and n_rows >= INTERLEAVE


@functools.cache
def _lane_positions(qtype: str, row_bytes: int) -> torch.Tensor:
    """(16, row_bytes) int64: where byte k of row i of a group lies in the group's repacked bytes."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]]
    assert block == 32 and row_bytes % size == 0
    nb, qs_at = row_bytes // size, 6 if qtype.upper() == "Q5_0" else 2  # Q5_0: d, qh[4], qs[16]
    qs_in_group = 32 + 16 * (qs_at - 2)  # after the scales (and Q5_0's qh words)
    i = torch.arange(INTERLEAVE).view(INTERLEAVE, 1, 1)
    b = torch.arange(nb).view(1, nb, 1)
    k = torch.arange(size).view(1, 1, size)
    j = (k - qs_at).clamp(min=0)  # the qs byte index where k >= qs_at
    within = torch.where(k < qs_at, 2 * i + k, qs_in_group + 64 * (j // 4) + 4 * i + j % 4)
    within = torch.where(k < 2, 2 * i + k, within)
    within = torch.where((k >= 2) & (k < qs_at), 32 + 4 * i + k - 2, within)  # Q5_0's qh
    assert int(within.max()) < INTERLEAVE * size and (size - qs_at) % 4 == 0
    return (b * INTERLEAVE * size + within).reshape(INTERLEAVE, row_bytes)


@functools.cache
def _permutations(qtype: str, row_bytes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_packed, to_rows): packed = rows[to_packed] and rows = packed[to_rows] over one
    group's flat bytes."""
    to_rows = _lane_positions(qtype, row_bytes).reshape(-1)
    to_packed = torch.empty_like(to_rows)
    to_packed[to_rows] = torch.arange(to_rows.numel())
    return to_packed.to(device), to_rows.to(device)


def _permute_groups_(blocks: torch.Tensor, qtype: str, pack: bool) -> None:
    n_groups, row_bytes = blocks.shape[0] // INTERLEAVE, blocks.shape[1]
    if not n_groups:
        return
    index = _permutations(qtype.upper(), row_bytes, blocks.device)[0 if pack else 1]
    groups = blocks[: n_groups * INTERLEAVE].view(n_groups, INTERLEAVE * row_bytes)
    for g in range(0, n_groups, GROUPS_PER_STEP):
        part = groups[g : g + GROUPS_PER_STEP]
        part.copy_(part.index_select(1, index))


def repack_(blocks: torch.Tensor, qtype: str, native: bool = True) -> torch.Tensor:
    """Rows in the file's layout -> the sixteen-row layout, in place (natively where the
    kernels run, else in torch); returns blocks."""
    _check(blocks, qtype)
    if not (native and quant_linear.repack_rows(blocks, qtype, pack=True)):
        _permute_groups_(blocks, qtype, pack=True)
    return blocks


def unpack_(blocks: torch.Tensor, qtype: str, native: bool = True) -> torch.Tensor:
    """The sixteen-row layout -> the file's, in place; returns blocks."""
    _check(blocks, qtype)
    if not (native and quant_linear.repack_rows(blocks, qtype, pack=False)):
        _permute_groups_(blocks, qtype, pack=False)
    return blocks


def unpacked(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """A copy of repacked blocks in the file's layout."""
    return unpack_(blocks.clone(), qtype)


def rows(blocks: torch.Tensor, qtype: str, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx (any shape of int indices) of repacked blocks in the file's layout:
    (*idx.shape, row_bytes) uint8, without unpacking the rest (natively where the kernels run:
    an embedding lookup per decode step)."""
    _check(blocks, qtype)
    n_rows, row_bytes = blocks.shape
    n_in = row_bytes // GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]][1] * 32
    got = quant_linear.rows(blocks, quant_linear.kernel_type(qtype, repacked=True), n_in, idx)
    if got is not None:
        return got
    return _rows_torch(blocks, qtype, idx)


def _rows_torch(blocks: torch.Tensor, qtype: str, idx: torch.Tensor) -> torch.Tensor:
    n_rows, row_bytes = blocks.shape
    idx = idx.to(blocks.device, torch.int64)
    idx = torch.where(idx < 0, idx + n_rows, idx)
    if bool(((idx < 0) | (idx >= n_rows)).any()):
        raise IndexError(f"row index out of range for {n_rows} rows")
    lanes = _lane_positions(qtype.upper(), row_bytes).to(blocks.device)
    group = idx // INTERLEAVE
    in_group = idx < blocks.shape[0] // INTERLEAVE * INTERLEAVE
    at = torch.where(
        in_group.unsqueeze(-1),
        group.unsqueeze(-1) * INTERLEAVE * row_bytes + lanes[idx % INTERLEAVE],
        idx.unsqueeze(-1) * row_bytes + torch.arange(row_bytes, device=blocks.device),
    )
    return blocks.reshape(-1)[at]


def _check(blocks: torch.Tensor, qtype: str) -> None:
    if qtype.upper() not in FORMATS:
        raise ValueError(f"{qtype} rows cannot be repacked: only {', '.join(FORMATS)} have a sixteen-row layout")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        got = f"{blocks.dtype} {tuple(blocks.shape)}"
        raise ValueError(f"blocks must be contiguous uint8 (n_rows, row_bytes), got {got}")
