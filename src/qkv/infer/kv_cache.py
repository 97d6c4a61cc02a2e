"""Contiguous, preallocated KV cache for single streams (gpt-fast style).

One tensor per K and V of shape (n_layer, B, n_kv_head, max_len, head_dim) is allocated
once; each step writes its new keys/values at `pos` and attention reads the prefix
[0, pos + T). Nothing is reallocated while decoding, and rolling back (speculative
decoding) is just moving `pos` back.

KV bytes per token = 2 (K and V) * n_layer * n_kv_head * head_dim * dtype bytes, so
GQA/MQA shrink the cache by n_head / n_kv_head.
"""

from __future__ import annotations

import torch

from qkv.config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """2 * layers * n_kv_head * head_dim * bytes per element."""
    return cfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of K/V held for `batch` sequences of `context` tokens each."""
    return kv_bytes_per_token(cfg, dtype) * context * batch


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
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Call after a forward of n tokens (every layer has written them)."""
        self.pos += n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (speculative rollback)."""
        self.pos = min(self.pos, n)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
