"""GGUF block formats (llama.cpp's ggml-quants.c layouts): quantize and dequantize in torch.

A quantized row of n weights is n / block_size blocks of type_size bytes, stored back to
back exactly as in a GGUF file, so a (rows, row_bytes) uint8 tensor *is* the file's data.
fp16 fields are little-endian IEEE half; `q` are the stored unsigned integers.

    format  weights/block  bytes/block  block layout (bytes)                         value
    q8_0    32             34           d:f16, q:int8[32]                            d*q
    q4_0    32             18           d:f16, qs[16]                                d*(q-8)
    q4_1    32             20           d:f16, m:f16, qs[16]                         d*q + m
    q5_0    32             22           d:f16, qh[4], qs[16]                         d*(q-16)
    q5_1    32             24           d:f16, m:f16, qh[4], qs[16]                  d*q + m
    q4_k    256            144          d:f16, dmin:f16, scales[12], qs[128]         d*sc_j*q - dmin*m_j
    q5_k    256            176          d:f16, dmin:f16, scales[12], qh[32], qs[128] d*sc_j*q - dmin*m_j
    q6_k    256            210          ql[128], qh[64], scales:int8[16], d:f16      d*sc_j*(q-32)
    f16/bf16/f32  1        2/2/4        the number itself

- 32-weight formats: weight j < 16 is the low nibble of qs[j], weight j + 16 its high nibble;
  the 5th bit of weight j is bit j of qh read as a little-endian uint32.
- q4_k / q5_k: 8 sub-blocks of 32 with a 6-bit scale sc_j and min m_j packed in 12 bytes
  (`_unpack_scale_min`, llama.cpp's get_scale_min_k4). qs is 4 chunks of 32 bytes; chunk c
  holds sub-block 2c in its low nibbles and 2c+1 in its high ones. q5_k's 5th bit of weight
  l of sub-block j is bit j of qh[l].
- q6_k: 16 sub-blocks of 16 with int8 scales. Each 128-weight half h uses ql[64h:64h+64] and
  qh[32h:32h+32]: its weights 32g + l (g = 0..3) take the low (g < 2) or high nibble of
  ql[64h + 32(g % 2) + l] and bits 2g, 2g+1 of qh[32h + l].

Quantizing q8_0, q4_0, q4_1, q5_0, q5_1, bf16 and f16 gives the same bytes as the `gguf`
package (llama.cpp's reference rounding). The K-quants are quantized here with a plain
min-max rule, not llama.cpp's error-minimising search (make_qkx2_quants): sub-block scales
are rounded *up* to the 6-bit grid, so every weight stays inside its sub-block's range and
the error has a bound (`quantize` documents it per format). Any such bytes are valid GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockFormat:
    name: str  # lower-case, as in llama.cpp file names ("q4_k")
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one quantized row of n_cols weights (a ValueError if blocks do not tile it)."""
        if n_cols % self.block_size:
            raise ValueError(
                f"{self.name}: a row of {n_cols} weights is not a whole number of {self.block_size}-weight "
                f"blocks; use a width divisible by {self.block_size} or another format"
            )
        return n_cols // self.block_size * self.type_size


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("f32", 0, 1, 4),
        BlockFormat("f16", 1, 1, 2),
        BlockFormat("bf16", 30, 1, 2),
        BlockFormat("q8_0", 8, 32, 34),
        BlockFormat("q4_0", 2, 32, 18),
        BlockFormat("q4_1", 3, 32, 20),
        BlockFormat("q5_0", 6, 32, 22),
        BlockFormat("q5_1", 7, 32, 24),
        BlockFormat("q4_k", 12, 256, 144),
        BlockFormat("q5_k", 13, 256, 176),
        BlockFormat("q6_k", 14, 256, 210),
    )
}
_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def block_format(qtype: str | int) -> BlockFormat:
    """The format named `qtype` ("Q4_K", "q4_k") or with that GGML type id."""
    if isinstance(qtype, str):
        f = FORMATS.get(qtype.lower())
    else:
        f = _BY_TYPE.get(int(qtype))
    if f is None:
        raise ValueError(f"unknown quantized format {qtype!r}; qkv handles {', '.join(FORMATS)}")
    return f


# --- byte helpers ------------------------------------------------------------------------
class _Fp16Overflow(ArithmeticError):
    pass


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) fp32 or fp16 -> (n, 2) uint8 (round to nearest even, as numpy and ggml)."""
    h = x.half()
    if not bool(torch.isfinite(h).all()):
        raise _Fp16Overflow
    return h.contiguous().view(torch.uint8)


def _f16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= x (x >= 0, fp32): a stored scale that never shrinks the range."""
    h = x.half()
    return (h.view(torch.int16) + (h.float() < x).to(torch.int16)).view(torch.float16)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), written as the gguf package does so results match bit for bit."""
    a = x.abs()
    fl = a.floor()
    return x.sign() * (fl + (2 * (a - fl)).floor())


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles`: (n, 2k) values < 16 -> (n, k) bytes."""
    k = q.shape[-1] // 2
    return q[:, :k] | (q[:, k:] << 4)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes read as a little-endian uint32 -> (n, 32) bits, bit j at position j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], 32)


def _pack_bits32(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of `_bits32`: (n, 32) values in {0, 1} -> (n, 4) bytes."""
    weights = (1 << torch.arange(8, device=bits.device)).to(torch.int32)
    return (bits.reshape(-1, 4, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _unpack_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k / q5_k: 12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    lo_s, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo_s & 63, (hi & 0x0F) | ((lo_s >> 6) << 4)], dim=-1)
    mn = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    return sc, mn


def _pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of `_unpack_scale_min`: (n, 8) and (n, 8) values < 64 -> (n, 12) bytes."""
    return torch.cat(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        dim=-1,
    )


# --- dequantize: (n_blocks, type_size) uint8 -> (n_blocks, block_size) fp32 ----------------
# Each step is one pass over the data (fp16 fields read through a view, products in place):
# this is the fallback on every forward where no native kernel applies. Products keep the
# gguf package's order (d * q, then + m), so results match it bit for bit.
def _f16_at(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each (contiguous, even-sized) block -> (n, 1) fp32."""
    return b.view(torch.float16)[:, offset // 2 : offset // 2 + 1].float()


def _nibbles_f32(qs: torch.Tensor) -> torch.Tensor:
    """`_nibbles` straight into fp32."""
    n, k = qs.shape
    out = torch.empty(n, 2 * k, device=qs.device)
    out[:, :k] = qs & 0x0F
    out[:, k:] = qs >> 4
    return out


def _deq_q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(_f16_at(b, 0))


def _deq_q4_0(b):
    return _nibbles_f32(b[:, 2:]).sub_(8).mul_(_f16_at(b, 0))


def _deq_q4_1(b):
    return _nibbles_f32(b[:, 4:]).mul_(_f16_at(b, 0)).add_(_f16_at(b, 2))


def _deq_q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16_at(b, 0))


def _deq_q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return q.float().mul_(_f16_at(b, 0)).add_(_f16_at(b, 2))


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): chunk c's low nibbles are sub-block 2c, high ones 2c+1."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _deq_q4_k(b):
    n = b.shape[0]
    sc, mn = _unpack_scale_min(b[:, 4:16])
    d = (_f16_at(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16_at(b, 2) * mn.float()).reshape(n, 8, 1)
    return _k_low_nibbles(b[:, 16:]).float().mul_(d).sub_(dm).reshape(n, 256)


def _deq_q5_k(b):
    n = b.shape[0]
    sc, mn = _unpack_scale_min(b[:, 4:16])
    d = (_f16_at(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16_at(b, 2) * mn.float()).reshape(n, 8, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1
    q = _k_low_nibbles(b[:, 48:]) | (qh << 4)
    return q.float().mul_(d).sub_(dm).reshape(n, 256)


def _deq_q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q = (ql | (qh << 4)).float().sub_(32).reshape(n, 16, 16)
    d = (_f16_at(b, 208) * b[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    return q.mul_(d).reshape(n, 256)


def _deq_f16(b):
    return b.contiguous().view(torch.float16).float()


def _deq_bf16(b):
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _deq_f32(b):
    return b.contiguous().view(torch.float32).clone()


_DEQUANTIZE = {
    "q8_0": _deq_q8_0,
    "q4_0": _deq_q4_0,
    "q4_1": _deq_q4_1,
    "q5_0": _deq_q5_0,
    "q5_1": _deq_q5_1,
    "q4_k": _deq_q4_k,
    "q5_k": _deq_q5_k,
    "q6_k": _deq_q6_k,
    "f16": _deq_f16,
    "bf16": _deq_bf16,
    "f32": _deq_f32,
}


# --- quantize: (n_blocks, block_size) fp32 -> (n_blocks, type_size) uint8 ------------------
def _q_q8_0(x):
    d = x.abs().amax(-1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=-1)


def _signed_absmax(x):
    """The weight of largest magnitude, with its sign (first one on ties, like numpy argmax)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _q_q4_0(x):
    d = _signed_absmax(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=-1)


def _q_q4_1(x):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=-1)


def _q_q5_0(x):
    d = _signed_absmax(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_bits32(q >> 4), _pack_nibbles(q & 0x0F)], dim=-1)


def _q_q5_1(x):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_bits32(q >> 4), _pack_nibbles(q & 0x0F)], dim=-1)


def _k_scales(x: torch.Tensor, levels: int):
    """q4_k / q5_k: per 32-weight sub-block, a min-max affine grid of `levels` + 1 values whose
    6-bit scale is rounded up (the grid still spans the sub-block) and 6-bit min to nearest.
    Returns the fp16 d and dmin, the 6-bit sc and m, and the stored integers q."""
    n = x.shape[0]
    x = x.reshape(n, 8, 32)
    lo = x.amin(-1).clamp(max=0)  # the format subtracts a non-negative min
    scale, offset = (x.amax(-1) - lo) / levels, -lo
    d = _f16_up(scale.amax(-1, keepdim=True) / 63)
    dmin = _f16_up(offset.amax(-1, keepdim=True) / 63)
    sc = torch.ceil(scale * _inverse(d.float())).clamp(0, 63)
    m = torch.round(offset * _inverse(dmin.float())).clamp(0, 63)
    step = (d.float() * sc).unsqueeze(-1)  # the dequantizer's d * sc and dmin * m, in fp32
    shift = (dmin.float() * m).unsqueeze(-1)
    q = torch.round((x + shift) * _inverse(step)).clamp(0, levels).to(torch.uint8)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q


def _pack_k_low_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Inverse of `_k_low_nibbles`: (n, 8, 32) values < 16 -> (n, 128) bytes."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q_q4_k(x):
    d, dmin, sc, m, q = _k_scales(x, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, m), _pack_k_low_nibbles(q)], dim=-1)


def _q_q5_k(x):
    d, dmin, sc, m, q = _k_scales(x, 31)
    weights = (1 << torch.arange(8, device=x.device)).to(torch.int32).reshape(1, 8, 1)
    qh = ((q >> 4).to(torch.int32) * weights).sum(1).to(torch.uint8)  # bit j of qh[l]: sub-block j
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, m), qh, _pack_k_low_nibbles(q & 0x0F)]
    return torch.cat(parts, dim=-1)


def _q_q6_k(x):
    """Symmetric: per 16-weight sub-block a grid step >= max|x| / 31, so no weight is clipped."""
    n = x.shape[0]
    x = x.reshape(n, 16, 16)
    scale = x.abs().amax(-1) / 31
    d = _f16_up(scale.amax(-1, keepdim=True) / 127)
    sc = torch.ceil(scale * _inverse(d.float())).clamp(0, 127)
    step = (d.float() * sc).unsqueeze(-1)
    q = (torch.round(x * _inverse(step)).clamp(-32, 31) + 32).to(torch.uint8).reshape(n, 2, 4, 32)
    lo, hi = q & 0x0F, q >> 4
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(n, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=-1)


def _q_bf16(x):
    """Round to nearest even, NaNs kept quiet (ggml_compute_fp32_to_bf16)."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int32).to(torch.int16).view(torch.uint8)


def _q_f16(x):
    return _f16_bytes(x)


def _q_f32(x):
    return x.contiguous().view(torch.uint8).clone()


_QUANTIZE = {
    "q8_0": _q_q8_0,
    "q4_0": _q_q4_0,
    "q4_1": _q_q4_1,
    "q5_0": _q_q5_0,
    "q5_1": _q_q5_1,
    "q4_k": _q_q4_k,
    "q5_k": _q_q5_k,
    "q6_k": _q_q6_k,
    "f16": _q_f16,
    "bf16": _q_bf16,
    "f32": _q_f32,
}


def quantize(w: torch.Tensor, qtype: str | int) -> torch.Tensor:
    """(..., n_cols) float weights -> (..., row_bytes) uint8 GGUF blocks.

    Error bounds of the K-quants (per weight; d and dmin are the block's stored fp16 scales,
    each at most 2**-10 above the value shown):
      q4_k  |w - ŵ| <= r/30 + d/2 + dmin/2,  r = max - min(min, 0) of its 32-weight sub-block,
            d = max_sub(r / 15) / 63, dmin = max_sub(-min(min, 0)) / 63 over the 256-weight block
      q5_k  |w - ŵ| <= r/62 + d/2 + dmin/2,  d = max_sub(r / 31) / 63, dmin as q4_k
      q6_k  |w - ŵ| <= a/62 + d/2,  a = max|w| of its 16-weight sub-block, d = max_sub(a / 31) / 127
    """
    f = block_format(qtype)
    *lead, n_cols = w.shape
    f.row_bytes(n_cols)  # the width check
    x = w.detach().to(torch.float32).reshape(-1, f.block_size)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{f.name}: the weights contain NaN or inf; quantize finite weights only")
    try:
        out = _QUANTIZE[f.name](x)
    except _Fp16Overflow:
        msg = f"{f.name}: a weight or block scale overflows fp16 (|weight| too large); use bf16 or f32"
        raise ValueError(msg) from None
    return out.reshape(*lead, -1)


def dequantize(blocks: torch.Tensor, qtype: str | int, n_cols: int) -> torch.Tensor:
    """(..., row_bytes) uint8 GGUF blocks -> (..., n_cols) fp32 weights."""
    f = block_format(qtype)
    expected = f.row_bytes(n_cols)
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != expected:
        raise ValueError(
            f"{f.name}: expected uint8 rows of {expected} bytes for {n_cols} weights, "
            f"got {blocks.dtype} rows of {blocks.shape[-1]} bytes"
        )
    lead = blocks.shape[:-1]
    out = _DEQUANTIZE[f.name](blocks.contiguous().reshape(-1, f.type_size))
    return out.reshape(*lead, n_cols)
