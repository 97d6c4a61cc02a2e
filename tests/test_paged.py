"""Block pool: refcounts, copy-on-write, prefix cache, and the paged K/V store."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.config import preset
from qkv.infer.paged import BlockAllocator, NoFreeBlocks, PagedKVCache, block_content, block_hash


def test_allocate_free_and_exhaustion():
    a = BlockAllocator(4, 16)
    blocks = [a.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3] and a.num_free == 0
    with pytest.raises(NoFreeBlocks):
        a.allocate()
    a.free(blocks[2])
    assert a.num_free == 1 and a.allocate() == blocks[2]
    for b in blocks:
        a.free(b)
    with pytest.raises(AssertionError, match="double free"):
        a.free(blocks[0])
    a.check()


def test_fork_and_copy_on_write():
    a = BlockAllocator(4, 16)
    b = a.allocate()
    a.fork(b)
    a.fork(b)
    assert a.refcount[b] == 3
    new, copy = a.writable(b)  # shared: the writer gets a private block
    assert copy and new != b and a.refcount[b] == 2 and a.refcount[new] == 1
    same, copy = a.writable(new)  # sole owner writes in place
    assert same == new and not copy
    a.free(b)
    a.free(b)
    a.free(new)
    assert a.num_free == 4
    a.check()


def test_prefix_cache_reuse_and_lru_eviction():
    a = BlockAllocator(3, 4)
    h1, c1 = block_hash(None, [1, 2, 3, 4]), block_content(None, [1, 2, 3, 4])
    h2, c2 = block_hash(h1, [5, 6, 7, 8]), block_content(h1, [5, 6, 7, 8])
    assert h2 != block_hash(None, [5, 6, 7, 8])  # the chain: same tokens, other prefix
    b1, b2 = a.allocate(), a.allocate()
    a.register(b1, h1, c1)
    a.register(b2, h2, c2)
    a.free(b2)
    a.free(b1)
    assert a.num_free == 3 and a.num_used == 0  # cached blocks still count as free
    assert a.lookup(h1, c1) == b1 and a.refcount[b1] == 1  # revived from the cache
    a.free(b1)
    # exhaust: never-used block first, then the least recently freed cached one (b2)
    x, y = a.allocate(), a.allocate()
    assert x not in (b1, b2) and y == b2
    assert a.lookup(h2, c2) is None and a.lookup(h1, c1) == b1
    a.check()
    assert BlockAllocator(2, 4, prefix_caching=False).lookup(h1, c1) is None


def test_block_names_are_sha256_of_parent_and_tokens():
    """The oracle is hashlib: the same name in every process (no hash randomisation) and
    one that no client can steer into a collision."""
    import hashlib
    import struct

    root = hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()
    assert block_hash(None, [1, 2, 3, 4]) == root
    assert block_hash(root, [5, 6, 7, 8]) == hashlib.sha256(root + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert block_hash(None, [2**40, 0]) != block_hash(None, [0, 2**40])


def test_a_name_whose_block_holds_other_tokens_is_a_miss():
    """Even if two contents shared a name, a block is reused only for its own tokens."""
    a = BlockAllocator(4, 4)
    b = a.allocate()
    name = block_hash(None, [1, 2, 3, 4])
    a.register(b, name, block_content(None, [1, 2, 3, 4]))
    a.free(b)
    assert a.lookup(name, block_content(None, [9, 9, 9, 9])) is None  # forged: same name, other tokens
    assert a.refcount[b] == 0 and b in a.evictable
    assert a.lookup(name, block_content(None, [1, 2, 3, 4])) == b
    a.check()


def test_prefix_hits_count_admitted_sequences_only():
    """A sequence that must wait for memory looks its prefix up at every step; only the
    lookup of the step that admits it counts."""
    from qkv.infer.scheduler import Scheduler, Sequence

    a = BlockAllocator(6, 4)
    sched = Scheduler(a, max_num_seqs=4, max_batch_tokens=64)
    prompt = list(range(12))  # 3 full blocks
    first = Sequence(0, "a", 0, 0, list(prompt), len(prompt))
    sched.add(first)
    out = sched.schedule()
    for seq, n in out.scheduled:
        seq.num_computed += n
        sched.register_computed(seq)
    hog = Sequence(1, "b", 0, 1, list(range(100, 108)), 8)  # takes the last free blocks
    sched.add(hog)
    sched.schedule()
    sched.remove(first)  # its 3 blocks stay cached (evictable): the pool has 3 + 1 free
    second = Sequence(2, "c", 0, 2, prompt + list(range(50, 58)), 20)  # 3 hits, then needs 2 more blocks
    sched.add(second)
    for _ in range(5):
        sched.schedule()
        assert second in sched.waiting  # not admitted: needs more blocks than are free
    assert a.prefix_hits == 0
    sched.remove(hog)
    sched.schedule()
    assert second in sched.running and a.prefix_hits == 3
    a.check()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "free", "fork", "cow", "register", "lookup"]), st.integers(0, 50)),
        max_size=80,
    )
)
def test_allocator_invariants_under_random_ops(ops):
    a = BlockAllocator(6, 2)
    owned: list[int] = []  # one entry per reference we hold
    for op, x in ops:
        if op == "alloc":
            try:
                owned.append(a.allocate())
            except NoFreeBlocks:
                assert a.num_free == 0
        elif op == "free" and owned:
            a.free(owned.pop(x % len(owned)))
        elif op == "fork" and owned:
            b = owned[x % len(owned)]
            a.fork(b)
            owned.append(b)
        elif op == "cow" and owned:
            i = x % len(owned)
            if a.refcount[owned[i]] == 1 or a.num_free:  # a shared block needs a free one to copy into
                owned[i], _ = a.writable(owned[i])
        elif op == "register" and owned:
            a.register(owned[x % len(owned)], block_hash(None, [x % 7]), block_content(None, [x % 7]))
        elif op == "lookup":
            b = a.lookup(block_hash(None, [x % 7]), block_content(None, [x % 7]))
            if b is not None:
                owned.append(b)
        a.check()
        for b in range(6):
            assert a.refcount[b] == owned.count(b)
    for b in owned:
        a.free(b)
    a.check()
    assert a.num_free == 6 and all(r == 0 for r in a.refcount)


@pytest.mark.parametrize("window", [None, 3])
def test_paged_cache_stores_by_block_table_and_attends_like_contiguous(window):
    import torch.nn.functional as F

    from qkv.model.attention import causal_mask

    cfg = preset("tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2, sliding_window=window)
    bs = 4
    cache = PagedKVCache(cfg, num_blocks=12, block_size=bs)
    # three sequences with scattered block tables and different lengths (so two buckets)
    tables = [[5, 2, 9], [7], [1, 3, 4, 6, 8, 10]]
    lens = [9, 3, 22]
    T = max(lens)
    k, v = torch.randn(3, 2, T, 8), torch.randn(3, 2, T, 8)
    q = torch.randn(3, 4, T, 8)
    tab = torch.tensor([t + [0] * (6 - len(t)) for t in tables])
    cache.prepare(tab, torch.zeros(3, dtype=torch.long), torch.tensor(lens), T)
    assert len(cache._buckets()) >= 2
    y = cache.attend(1, q, k, v, scale=0.3)
    for b, (t, n) in enumerate(zip(tables, lens)):
        for p in range(n):  # token p sits in block t[p // bs] at offset p % bs
            torch.testing.assert_close(cache.k[1, t[p // bs], p % bs], k[b, :, p])
            torch.testing.assert_close(cache.v[1, t[p // bs], p % bs], v[b, :, p])
        mask = causal_mask(n, n, window=window)[None, None]
        ref = F.scaled_dot_product_attention(
            q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], attn_mask=mask, scale=0.3, enable_gqa=True
        )
        torch.testing.assert_close(y[b : b + 1, :, :n], ref, atol=1e-5, rtol=1e-5)
    assert cache.k[0].abs().sum() == 0  # other layers untouched

    # the plain protocol returns every row's K/V padded, with the mask that goes with it
    k_all, v_all = cache.update(0, k, v)
    assert k_all.shape == (3, 2, 6 * bs, 8)
    for b, n in enumerate(lens):
        torch.testing.assert_close(k_all[b, :, :n], k[b, :, :n])
    assert cache.full_mask().shape == (3, 1, T, 6 * bs)

    cache.copy_block(5, 0)
    torch.testing.assert_close(cache.k[:, 0], cache.k[:, 5])
