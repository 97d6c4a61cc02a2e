"""Contiguous, preallocated KV cache for single streams (gpt-fast style).

One tensor per K and V of shape (n_layer, B, n_kv_head, max_len, head_dim) is allocated
once; each step writes its new keys/values at `pos` and attention reads the prefix
[0, pos + T). Nothing is reallocated while decoding, and rolling back (speculative
decoding) is just moving `pos` back.

KV bytes per token = 2 (K and V) * n_layer * n_kv_head * head_dim * dtype bytes, so
GQA/MQA shrink the cache by n_head / n_kv_head. `Int8KVCache` stores each vector as int8s
and a scale (infer/kv_quant.py) for about a quarter of fp32's bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.infer import kv_quant
from qkv.kernels import decode_attention
from qkv.model.attention import causal_mask, math_attention


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """2 * layers * n_kv_head * bytes per vector (head_dim * bytes per element; int8: + a scale)."""
    return 2 * cfg.n_layer * cfg.n_kv_head * kv_quant.bytes_per_vector(cfg.head_dim, dtype)


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of K/V held for `batch` sequences of `context` tokens each."""
    return kv_bytes_per_token(cfg, dtype) * context * batch


def new_kv_cache(
    cfg: ModelConfig,
    max_len: int | None = None,
    batch: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> KVCache:
    """A contiguous cache storing `dtype` (torch.int8: `Int8KVCache`)."""
    if dtype == torch.int8:
        return Int8KVCache(cfg, max_len, batch, device)
    return KVCache(cfg, max_len, batch, device, dtype)


class KVCache:
    """Preallocated cache for `batch` sequences that advance together (same length)."""

    def __init__(
        self,
        cfg: ModelConfig,
        max_len: int | None = None,
        batch: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layer, batch, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored (the next write offset)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len={self.max_len}; allocate a longer cache")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        # a cache narrower than the model (a bf16 cache under fp32 weights) is read back in its dtype
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)

    def advance(self, n: int) -> None:
        """Call after a forward of n tokens (every layer has written them)."""
        self.pos += n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (speculative rollback)."""
        self.pos = min(self.pos, n)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Int8KVCache(KVCache):
    """The contiguous cache with int8 K/V and one fp32 scale per vector (infer/kv_quant.py).

    `attend` (which the model's attention uses when a cache has it) stores the new K/V and
    attends: a decode step reads the int8 prefix in place with the native kernel; prompt
    chunks, and machines without the kernel, dequantize the prefix and run SDPA (or the
    soft-capped math path) with the causal and sliding-window masks. `update` returns the
    dequantized prefix, for the model's own path (attention maps, attn_impl="math")."""

    def __init__(
        self, cfg: ModelConfig, max_len: int | None = None, batch: int = 1, device: str | torch.device = "cpu"
    ):
        super().__init__(cfg, max_len, batch, device, torch.int8)
        self.k_scale = torch.zeros(self.k.shape[:-1], device=device)
        self.v_scale = torch.zeros(self.v.shape[:-1], device=device)
        self.windows = [cfg.window_of(i) for i in range(cfg.n_layer)]
        self.softcap = cfg.attn_softcap

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len={self.max_len}; allocate a longer cache")
        for data, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            data[layer, :, :, self.pos : end], scales[layer, :, :, self.pos : end] = kv_quant.quantize(x)
        return end

    def _prefix(self, layer: int, end: int):
        return (
            self.k[layer, :, :, :end],
            self.v[layer, :, :, :end],
            (self.k_scale[layer, :, :, :end], self.v_scale[layer, :, :, :end]),
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kq, vq, (ks, vs) = self._prefix(layer, self._store(layer, k, v))
        return kv_quant.dequantize(kq, ks, k.dtype), kv_quant.dequantize(vq, vs, v.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        end = self._store(layer, k, v)
        kq, vq, scales = self._prefix(layer, end)
        window = self.windows[layer]
        if self.softcap is None and decode_attention.applies(q, kq, vq, scales):
            return decode_attention.dense_decode(q, kq, vq, scale, scales, window)
        kd, vd = kv_quant.dequantize(kq, scales[0], q.dtype), kv_quant.dequantize(vq, scales[1], q.dtype)
        mask = causal_mask(q.shape[2], end, q.device, window)[None, None]
        if self.softcap is not None:  # sdpa cannot soft-cap scores
            return math_attention(q, kd, vd, mask, scale, softcap=self.softcap)[0]
        gqa = q.shape[1] != kd.shape[1]
        return F.scaled_dot_product_attention(q, kd, vd, attn_mask=mask, scale=scale, enable_gqa=gqa)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.k_scale.nbytes + self.v_scale.nbytes
