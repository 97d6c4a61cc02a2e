"""Paged KV cache: a pool of fixed-size blocks, per-sequence block tables, reference
counts, copy-on-write and prefix caching (the vLLM design, written out small).

- The pool holds K and V for `num_blocks * block_size` token slots per layer. A sequence
  owns a *block table*: logical block i of the sequence lives in physical block
  table[i], so token position p is stored in slot table[p // bs] * bs + p % bs.
  Memory is allocated a block at a time, so waste is under one block per sequence.
- Blocks are reference counted. n samples of one prompt share the prompt's blocks
  (fork = refcount + 1); the first sample that writes into a shared, partly filled
  block gets a private copy (copy-on-write).
- Prefix caching: a full block is named by a hash of its tokens and of every token
  before it (a chain hash). A new sequence whose leading blocks hash the same reuses
  them instead of recomputing. Freed blocks that carry a hash stay cached (LRU) until
  the allocator needs the memory.

Attention reads the cache by gathering each sequence's slots into a padded
(B, n_kv_head, S, head_dim) batch; a fused paged-attention kernel could read the
blocks in place instead (the `slots`/`gather` index tensors are what it would take).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional, Sequence

import torch

from qkv.config import ModelConfig


class NoFreeBlocks(RuntimeError):
    """The pool is exhausted; the scheduler preempts a sequence and retries."""


def block_hash(parent: Optional[int], tokens: Sequence[int]) -> int:
    """Content hash of a full block, chained through every block before it."""
    return hash((parent, tuple(tokens)))


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refcount = [0] * num_blocks
        self.hash_of: list[Optional[int]] = [None] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))  # no content worth keeping
        self.cached: dict[int, int] = {}  # content hash -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 but cached (LRU order)
        self.prefix_hits = 0  # blocks reused from the prefix cache

    # --- counts --------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never used, freed, or evictable cache)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # --- allocate / free -------------------------------------------------------------
    def allocate(self) -> int:
        if self.free_ids:
            b = self.free_ids.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)  # least recently used cached block
            del self.cached[self.hash_of[b]]
            self.hash_of[b] = None
        else:
            raise NoFreeBlocks("KV block pool exhausted")
        assert self.refcount[b] == 0
        self.refcount[b] = 1
        return b

    def fork(self, b: int) -> None:
        """One more owner for block b (n samples sharing a prompt)."""
        assert self.refcount[b] > 0
        self.refcount[b] += 1

    def free(self, b: int) -> None:
        if self.refcount[b] <= 0:
            raise AssertionError(f"double free of block {b}")
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            if self.hash_of[b] is not None:
                self.evictable[b] = None  # keep the content for a later prefix hit
            else:
                self.free_ids.append(b)

    def free_all(self, table: list[int]) -> None:
        for b in reversed(table):  # tail blocks first: they are the least likely to be reused
            self.free(b)
        table.clear()

    def writable(self, b: int) -> tuple[int, bool]:
        """Copy-on-write: a block shared with another sequence is replaced by a private
        copy before it is written. Returns (block to write, whether data must be copied)."""
        if self.refcount[b] == 1:
            if self.hash_of[b] is not None:  # content is about to change: forget its name
                del self.cached[self.hash_of[b]]
                self.hash_of[b] = None
            return b, False
        new = self.allocate()
        self.refcount[b] -= 1
        return new, True

    # --- prefix cache ----------------------------------------------------------------
    def lookup(self, h: int) -> Optional[int]:
        """A cached block with this content hash, now owned once more by the caller."""
        if not self.prefix_caching:
            return None
        b = self.cached.get(h)
        if b is None:
            return None
        if self.refcount[b] == 0:
            del self.evictable[b]
        self.refcount[b] += 1
        self.prefix_hits += 1
        return b

    def register(self, b: int, h: int) -> None:
        """Name a full, computed block by its content so later sequences can reuse it."""
        if not self.prefix_caching or self.hash_of[b] is not None or h in self.cached:
            return
        self.cached[h] = b
        self.hash_of[b] = h

    def check(self) -> None:
        """Invariants (used by the tests)."""
        assert all(r >= 0 for r in self.refcount)
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "block listed free twice"
        for b in free:
            assert self.refcount[b] == 0 and self.hash_of[b] is None
        for b in self.evictable:
            assert self.refcount[b] == 0 and self.hash_of[b] is not None and b not in free
        for h, b in self.cached.items():
            assert self.hash_of[b] == h
        for b in range(self.num_blocks):
            if self.refcount[b] == 0:
                assert b in free or b in self.evictable, f"block {b} leaked"


class PagedKVCache:
    """K/V pool of shape (n_layer, num_blocks * block_size, n_kv_head, head_dim).

    Before each forward the engine calls `prepare` with, for the batch (B, T):
    - `write_slots`: the pool slot of every real (non-padding) new token, and
      `write_rows`: where those tokens sit in the flattened (B*T) batch (None = all);
    - `gather`: (B, S) slots each sequence reads (padding points at any slot; the
      attention mask hides it).
    `update` then stores the layer's new K/V and returns the gathered K/V.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (cfg.n_layer, num_blocks * block_size, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.write_slots: Optional[torch.Tensor] = None
        self.write_rows: Optional[torch.Tensor] = None
        self.gather: Optional[torch.Tensor] = None

    def prepare(self, write_slots: torch.Tensor, write_rows: Optional[torch.Tensor], gather: torch.Tensor) -> None:
        self.write_slots, self.write_rows, self.gather = write_slots, write_rows, gather

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        k_new = k.transpose(1, 2).reshape(B * T, H, D)
        v_new = v.transpose(1, 2).reshape(B * T, H, D)
        if self.write_rows is not None:
            k_new, v_new = k_new.index_select(0, self.write_rows), v_new.index_select(0, self.write_rows)
        self.k[layer].index_copy_(0, self.write_slots, k_new.to(self.k.dtype))
        self.v[layer].index_copy_(0, self.write_slots, v_new.to(self.v.dtype))
        S = self.gather.shape[1]
        idx = self.gather.reshape(-1)
        k_all = self.k[layer].index_select(0, idx).view(B, S, H, D).transpose(1, 2)
        v_all = self.v[layer].index_select(0, idx).view(B, S, H, D).transpose(1, 2)
        return k_all.to(k.dtype), v_all.to(v.dtype)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
        self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
