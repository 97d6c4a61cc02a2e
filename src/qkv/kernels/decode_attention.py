"""Decode attention (one query per sequence) read in place from the KV cache
(kernels/decode_attention_f32.c), for the decode steps of both caches on CPU:

- `paged_decode`: the engine's paged pool, each row through its block table, with no
  gather into a padded batch (what vLLM's paged-attention kernel does);
- `dense_decode`: the contiguous cache's (B, Hkv, S, D) views, addressed as one block
  per row (`dense_layout`, which the fused decode block uses for the same cache).

Both read fp32 caches, or int8 caches with one fp32 scale per key/value vector (pass
`scales=(k_scale, v_scale)`, shaped like the cache without its head_dim axis; see
infer/kv_quant.py). Callers check `applies` and otherwise use gather + SDPA (prefill
chunks, other dtypes or devices, head_dim not a multiple of 8, no compiler)."""

from __future__ import annotations

import ctypes

import torch

from qkv.kernels import native

_attention = native.Kernel(
    "decode_attention_f32",
    "qkv_decode_attention_f32",
    [ctypes.c_void_p] * 4
    + [ctypes.c_int64]
    + [ctypes.c_void_p] * 2
    + [ctypes.c_int64] * 8
    + [ctypes.c_float, ctypes.c_int64, ctypes.c_int],
    ctypes.c_int,
)
_attention_q8 = native.Kernel(
    "decode_attention_f32",
    "qkv_decode_attention_q8",
    [ctypes.c_void_p] * 6
    + [ctypes.c_int64]
    + [ctypes.c_void_p] * 2
    + [ctypes.c_int64] * 8
    + [ctypes.c_float, ctypes.c_int64, ctypes.c_int],
    ctypes.c_int,
)

Scales = tuple[torch.Tensor, torch.Tensor]


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: Scales | None = None) -> bool:
    """q: (B, H, 1, D) queries; k/v: fp32 CPU caches (int8 with `scales`: fp32, contiguous
    alongside) with unit stride over head_dim."""
    kv_dtype = torch.float32 if scales is None else torch.int8
    return (
        q.dim() == 4
        and q.shape[2] == 1
        and q.shape[-1] % 8 == 0
        and q.is_contiguous()
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and all(t.device.type == "cpu" and t.dtype == kv_dtype for t in (k, v))
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and (scales is None or all(_scales_fit(s, k) for s in scales))
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and (_attention if scales is None else _attention_q8).get() is not None
    )


def _scales_fit(s: torch.Tensor, k: torch.Tensor) -> bool:
    """The kernel finds a vector's scale at its element offset / head_dim: the scales must
    be laid out as the cache without its last axis."""
    return (
        s.dtype == torch.float32
        and s.shape == k.shape[:-1]
        and all(ss * k.shape[-1] == ks for ss, ks in zip(s.stride(), k.stride()[:-1], strict=True))
    )


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    total: torch.Tensor,
    scale: float,
    window: int | None = None,
    scales: Scales | None = None,
) -> torch.Tensor:
    """q: (B, H, 1, D); k_pool/v_pool: one layer's (num_blocks, block_size, Hkv, D);
    tables: (B, max_blocks) int32 block ids; total: (B,) int32 keys each row sees (its
    new token included). Returns (B, H, 1, D)."""
    _, block_size, Hkv, _ = k_pool.shape
    strides = k_pool.stride()[:3]  # block, token, head
    return _call(q, k_pool, v_pool, tables, total, Hkv, block_size, strides, scale, window, scales)


def dense_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    scales: Scales | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q: (B, H, 1, D); k/v: (B, Hkv, S, D) views (a contiguous cache's prefix): every
    row sees all S keys (the last `window` of them, if given). Returns (B, H, 1, D)."""
    tables, total, block_size, strides = dense_layout(k)
    return _call(q, k, v, tables, total, k.shape[1], block_size, strides, scale, window, scales)


def dense_layout(k: torch.Tensor) -> tuple:
    """(tables, total, block_size, (block, token, head) strides) that address a contiguous
    cache's (B, Hkv, S, D) view for the kernel: row b is one "block" of S tokens."""
    B, _, S, _ = k.shape
    tables = torch.arange(B, dtype=torch.int32)[:, None]
    total = torch.full((B,), S, dtype=torch.int32)
    return tables, total, S, (k.stride(0), k.stride(2), k.stride(1))


def _call(q, k, v, tables, total, Hkv, block_size, strides, scale, window, scales) -> torch.Tensor:
    B, H, _, D = q.shape
    out = torch.empty_like(q)
    data: tuple[int, ...]
    if scales is None:
        fn, data = _attention.get(), (q.data_ptr(), k.data_ptr(), v.data_ptr())
    else:  # a scale sits at its vector's element offset / D: the scales are the cache without head_dim
        fn = _attention_q8.get()
        data = (q.data_ptr(), k.data_ptr(), v.data_ptr(), scales[0].data_ptr(), scales[1].data_ptr())
    rc = fn(
        *data,
        tables.data_ptr(),
        tables.shape[1],
        total.data_ptr(),
        out.data_ptr(),
        B,
        H,
        Hkv,
        D,
        block_size,
        *strides,
        scale,
        window or 0,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("decode attention could not allocate its score buffer")
    return out
