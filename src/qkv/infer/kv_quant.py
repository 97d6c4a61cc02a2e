"""Int8 K/V storage: each key or value vector (one token, one KV head: head_dim numbers)
is kept as head_dim int8s and one fp32 scale, vector = scale * int8s, with
scale = max|x| / 127 (symmetric, round to nearest).

Why per vector: keys and values of different tokens and heads differ in size by orders of
magnitude, so one scale per vector keeps each one's relative error near 1/254 of its
largest element, and it is what a decode kernel can apply cheaply (one multiply per
score, one per value row). The cache then holds head_dim + 4 bytes per vector instead of
4 * head_dim: 3.8x smaller than fp32 at head_dim 64, 1.9x smaller than bf16. llama.cpp's
q8_0 cache type stores the same kind of block (32 values and an fp16 scale).

Both caches (infer/kv_cache.py, infer/paged.py) store int8 this way when asked for
`dtype=torch.int8`; the decode kernel reads it in place (kernels/decode_attention.py),
other steps dequantize what they gather.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def kv_dtype(name: str | None, weights_dtype: torch.dtype) -> torch.dtype:
    """The cache dtype a --kv-dtype value names ('auto' or None: the weights' float dtype,
    fp32 for quantized weights)."""
    if name in (None, "auto"):
        return weights_dtype if weights_dtype.is_floating_point else torch.float32
    if name not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; choose one of auto, {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


def bytes_per_vector(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one key or value vector takes in a cache of this dtype (int8: + its fp32 scale)."""
    if dtype == torch.int8:
        return head_dim + 4
    return head_dim * torch.tensor([], dtype=dtype).element_size()


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> (int8 (..., D), fp32 scale (...)) with x ~= scale * int8."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize` (up to its rounding), in `dtype`."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)
