"""Paged KV cache: a pool of fixed-size blocks, per-sequence block tables, reference
counts, copy-on-write and prefix caching (the vLLM design, written out small).

- The pool holds K and V for `num_blocks * block_size` token slots per layer. A sequence
  owns a *block table*: logical block i of the sequence lives in physical block
  table[i], so token position p is stored in slot table[p // bs] * bs + p % bs.
  Memory is allocated a block at a time, so waste is under one block per sequence.
- Blocks are reference counted. n samples of one prompt share the prompt's blocks
  (fork = refcount + 1); the first sample that writes into a shared, partly filled
  block gets a private copy (copy-on-write).
- Prefix caching: a full block is named by the sha256 of its parent block's name and its
  own tokens (a chain hash, so the name covers every token before it). A new sequence
  whose leading blocks have the same names reuses them instead of recomputing, after
  checking that the cached block really holds the same parent and tokens: a name is
  never trusted alone (with Python's hash(), crafted collisions let one request read
  another's KV; vLLM advisory GHSA-rm76-4mrf-v9r8). Freed blocks that carry a name stay
  cached (LRU) until the allocator needs the memory.

Decode steps on CPU attend with a native kernel that reads each sequence's blocks in
place (kernels/decode_attention_f32.c); prompt chunks, and any step the kernel does not
take, gather each sequence's blocks into a padded (B, n_kv_head, S, head_dim) batch
for SDPA. With `dtype=torch.int8` the pool holds each K/V vector as int8s and one fp32
scale (infer/kv_quant.py): the decode kernel reads them in place, gathers dequantize.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.infer import kv_quant
from qkv.kernels import decode_attention
from qkv.model.attention import math_attention


class NoFreeBlocks(RuntimeError):
    """The pool is exhausted; the scheduler preempts a sequence and retries."""


def block_content(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """What names a full block: its parent's name (none for a sequence's first block) and
    its tokens as little-endian int64s."""
    return (parent or b"") + struct.pack(f"<{len(tokens)}q", *tokens)


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The name of a full block: sha256 of its content, chained through every block before it."""
    return hashlib.sha256(block_content(parent, tokens)).digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refcount = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.content_of: list[bytes | None] = [None] * num_blocks  # checked on every hit
        self.free_ids: deque[int] = deque(range(num_blocks))  # no content worth keeping
        self.cached: dict[bytes, int] = {}  # block name -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 but cached (LRU order)
        self.prefix_hits = 0  # blocks reused from the prefix cache by admitted sequences

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
            name = self.hash_of[b]
            if name is not None:  # an evictable block is a cached one, so it has a name
                del self.cached[name]
            self.hash_of[b] = self.content_of[b] = None
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
            name = self.hash_of[b]
            if name is not None:  # content is about to change: forget its name
                del self.cached[name]
                self.hash_of[b] = self.content_of[b] = None
            return b, False
        new = self.allocate()
        self.refcount[b] -= 1
        return new, True

    # --- prefix cache ----------------------------------------------------------------
    def lookup(self, h: bytes, content: bytes) -> int | None:
        """A cached block named `h` that holds exactly `content` (see block_content), now
        owned once more by the caller. A name whose block holds other content is a miss."""
        if not self.prefix_caching:
            return None
        b = self.cached.get(h)
        if b is None or self.content_of[b] != content:
            return None
        if self.refcount[b] == 0:
            del self.evictable[b]
        self.refcount[b] += 1
        return b

    def register(self, b: int, h: bytes, content: bytes) -> None:
        """Name a full, computed block by its content so later sequences can reuse it."""
        if not self.prefix_caching or self.hash_of[b] is not None or h in self.cached:
            return
        self.cached[h] = b
        self.hash_of[b], self.content_of[b] = h, content

    def record_prefix_hits(self, n: int) -> None:
        """Count n reused blocks, once their sequence is admitted (a sequence that waits
        for memory looks its prefix up again every step)."""
        self.prefix_hits += n

    def check(self) -> None:
        """Invariants (used by the tests)."""
        assert all(r >= 0 for r in self.refcount)
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "block listed free twice"
        for b in free:
            assert self.refcount[b] == 0 and self.hash_of[b] is None and self.content_of[b] is None
        for b in self.evictable:
            assert self.refcount[b] == 0 and self.hash_of[b] is not None and b not in free
        for h, b in self.cached.items():
            assert self.hash_of[b] == h and self.content_of[b] is not None
        for b in range(self.num_blocks):
            if self.refcount[b] == 0:
                assert b in free or b in self.evictable, f"block {b} leaked"


class PagedKVCache:
    """K/V pool of shape (n_layer, num_blocks, block_size, n_kv_head, head_dim).

    Before each forward the engine calls `prepare` with the batch's block tables, how
    many tokens each row already has cached (`start`) and how many it feeds now (`lens`,
    padded to T). The cache then knows where every new token goes and what every query
    may see. `attend` (used by the model's attention when present) stores the layer's new
    K/V, gathers each row's blocks (a whole block per index, which is far cheaper than a
    token at a time) and runs fused attention. Rows are grouped into a few buckets of
    similar context length, so a short sequence is not padded to the longest one.
    `update` is the plain protocol: store, then return all rows' K/V padded to one length.
    """

    max_buckets = 4

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
        # each layer's sliding window (None: global); local layers keep full blocks and are
        # masked to their window (a ring per local layer would hold only `window` tokens)
        self.windows = [cfg.window_of(i) for i in range(cfg.n_layer)]
        self.softcap = cfg.attn_softcap
        shape = (cfg.n_layer, num_blocks, block_size, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # int8 storage: one fp32 scale per (layer, block, slot, KV head) vector
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = (
            (torch.zeros(shape[:-1], device=device), torch.zeros(shape[:-1], device=device))
            if dtype == torch.int8
            else None
        )

    # --- per step ----------------------------------------------------------------------
    def prepare(self, tables: torch.Tensor, start: torch.Tensor, lens: torch.Tensor, T: int) -> None:
        """tables: (B, nblk) physical blocks (padded with any id); start/lens: (B,)."""
        bs, dev = self.block_size, tables.device
        B, nblk = tables.shape
        t = torch.arange(T, device=dev)
        self.pos = start[:, None] + t[None, :]  # (B, T) absolute positions of the queries
        valid = t[None, :] < lens[:, None]
        blk = tables.gather(1, (self.pos // bs).clamp(max=nblk - 1))
        slots = (blk * bs + self.pos % bs).reshape(-1)
        if bool(valid.all()):
            self.write_rows, self.write_slots = None, slots
        else:
            self.write_rows = valid.reshape(-1).nonzero().squeeze(1)
            self.write_slots = slots[self.write_rows]
        self.tables, self.total = tables, start + lens  # keys each row sees after this step
        # built on first use: decode steps on CPU read blocks in place
        self.buckets: list[tuple[torch.Tensor | None, torch.Tensor, dict]] | None = None
        self.decode_index = (tables.to(torch.int32), self.total.to(torch.int32)) if T == 1 else None

    def _buckets(self) -> list:
        """Rows in a few buckets of similar block counts (longest first), each with the
        flat block ids to gather and its masks by window (built on first use)."""
        if self.buckets is not None:
            return self.buckets
        bs, dev, B = self.block_size, self.tables.device, self.tables.shape[0]
        need = (-(-self.total // bs)).tolist()
        order = sorted(range(B), key=lambda b: -need[b])
        groups: list[list[int]] = []
        for b in order:
            if groups and (need[b] * 2 > need[groups[-1][0]] or len(groups) == self.max_buckets):
                groups[-1].append(b)
            else:
                groups.append([b])
        buckets: list[tuple[torch.Tensor | None, torch.Tensor, dict]] = []
        for g in groups:
            rows = None if len(groups) == 1 else torch.tensor(g, device=dev)
            nb = need[g[0]]
            tables, pos, total = (
                (self.tables, self.pos, self.total)
                if rows is None
                else (t.index_select(0, rows) for t in (self.tables, self.pos, self.total))
            )
            masks = {w: self._mask(pos, total, nb * bs, w) for w in set(self.windows)}
            buckets.append((rows, tables[:, :nb].reshape(-1), masks))
        self.buckets = buckets
        return buckets

    def _mask(self, pos: torch.Tensor, total: torch.Tensor, S: int, window: int | None) -> torch.Tensor:
        j = torch.arange(S, device=pos.device)
        mask = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < total[:, None, None])
        if window is not None:
            mask &= j[None, None, :] > pos[:, :, None] - window
        return mask[:, None]  # (B, 1, T, S)

    def layer_mask(self, window: int | None) -> torch.Tensor:
        """The (B, 1, T, S) mask that goes with `update`'s padded K/V, for a layer of this window."""
        return self._mask(self.pos, self.total, self.tables.shape[1] * self.block_size, window)

    def full_mask(self) -> torch.Tensor:
        """The mask for `update`'s K/V when every layer has the same window (layer 0's)."""
        return self.layer_mask(self.windows[0])

    # --- per layer ---------------------------------------------------------------------
    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, T, D = k.shape
        k_new = k.transpose(1, 2).reshape(B * T, H, D)
        v_new = v.transpose(1, 2).reshape(B * T, H, D)
        if self.write_rows is not None:
            k_new, v_new = k_new.index_select(0, self.write_rows), v_new.index_select(0, self.write_rows)
        if self.scales is None:
            self.k[layer].view(-1, H, D).index_copy_(0, self.write_slots, k_new.to(self.k.dtype))
            self.v[layer].view(-1, H, D).index_copy_(0, self.write_slots, v_new.to(self.v.dtype))
            return
        for pool, scales, x in ((self.k, self.scales[0], k_new), (self.v, self.scales[1], v_new)):
            data, scale = kv_quant.quantize(x)
            pool[layer].view(-1, H, D).index_copy_(0, self.write_slots, data)
            scales[layer].view(-1, H).index_copy_(0, self.write_slots, scale)

    def _gather(self, layer: int, blocks: torch.Tensor, B: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, bs, H, D = self.k.shape
        k, v = self.k[layer].index_select(0, blocks), self.v[layer].index_select(0, blocks)
        if self.scales is None:
            k, v = k.to(dtype), v.to(dtype)
        else:
            k = kv_quant.dequantize(k, self.scales[0][layer].index_select(0, blocks), dtype)
            v = kv_quant.dequantize(v, self.scales[1][layer].index_select(0, blocks), dtype)
        return k.view(B, -1, H, D).transpose(1, 2), v.view(B, -1, H, D).transpose(1, 2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._write(layer, k, v)
        return self._gather(layer, self.tables.reshape(-1), k.shape[0], k.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self._write(layer, k, v)
        window = self.windows[layer]
        scales = None if self.scales is None else (self.scales[0][layer], self.scales[1][layer])
        if (
            self.softcap is None
            and self.decode_index is not None
            and decode_attention.applies(q, self.k[layer], self.v[layer], scales)
        ):
            k_pool, v_pool = self.k[layer], self.v[layer]
            return decode_attention.paged_decode(q, k_pool, v_pool, *self.decode_index, scale, window, scales)
        gqa = q.shape[1] != k.shape[1]
        buckets = self._buckets()
        out = torch.empty_like(q) if len(buckets) > 1 else None
        for rows, blocks, masks in buckets:
            qb = q if rows is None else q.index_select(0, rows)
            kb, vb = self._gather(layer, blocks, qb.shape[0], q.dtype)
            if self.softcap is None:
                y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=masks[window], scale=scale, enable_gqa=gqa)
            else:  # sdpa cannot soft-cap scores
                y = math_attention(qb, kb, vb, masks[window], scale, softcap=self.softcap)[0]
            if rows is None or out is None:  # one bucket holds every row
                return y
            out.index_copy_(0, rows, y)
        assert out is not None
        return out

    def copy_block(self, src: int, dst: int) -> None:
        for t in (self.k, self.v, *(self.scales or ())):
            t[:, dst] = t[:, src]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, *(self.scales or ())))
