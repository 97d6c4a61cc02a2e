"""The int8 KV cache (--kv-dtype int8): its rounding, the decode kernel that reads it in
place against attention over the dequantized cache, and both caches (contiguous and paged)
against each other and against the fp32 cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _infer_fixtures import make_tokenizer, tiny_model
from qkv.config import preset
from qkv.infer import kv_quant
from qkv.infer.engine import Engine
from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import Int8KVCache, KVCache, new_kv_cache
from qkv.infer.paged import PagedKVCache
from qkv.infer.sampling import SamplingParams
from qkv.kernels import decode_attention
from qkv.model.attention import causal_mask, math_attention


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.sampled_from([8, 64]), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_quantize_rounds_each_vector_to_half_a_step(n, D, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, D, generator=g) * magnitude
    x[0, 0] = 0.0  # an all-zero vector has scale 0 and comes back as zeros
    q, scale = kv_quant.quantize(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1]
    assert int(q.abs().max()) <= 127
    back = kv_quant.dequantize(q, scale)
    assert torch.all((back - x).abs() <= scale.unsqueeze(-1) * 0.5 * (1 + 1e-5) + 1e-30)
    assert back[0, 0].abs().sum() == 0


def _reference(q, kq, vq, ks, vs, n_keys, window, scale):
    """Attention of one query per row over each row's first n_keys dequantized K/V."""
    out = []
    for b, n in enumerate(n_keys):
        k = kv_quant.dequantize(kq[b : b + 1, :, :n], ks[b : b + 1, :, :n])
        v = kv_quant.dequantize(vq[b : b + 1, :, :n], vs[b : b + 1, :, :n])
        mask = causal_mask(1, n, window=window)[None, None]
        out.append(math_attention(q[b : b + 1], k, v, mask, scale)[0])
    return torch.cat(out)


@pytest.mark.skipif(decode_attention._attention_q8.get() is None, reason="native kernels off (QKV_NATIVE=0 or no AVX2)")
@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    st.sampled_from([8, 64, 72]),
    st.lists(st.integers(1, 40), min_size=3, max_size=3),
    st.sampled_from([None, 5]),
    st.integers(0, 2**16),
)
def test_int8_decode_kernel_matches_attention_over_the_dequantized_cache(B, heads, D, lens, window, seed):
    H, Hkv = heads
    n_keys = lens[:B]
    g = torch.Generator().manual_seed(seed)
    S = max(n_keys)
    q = torch.randn(B, H, 1, D, generator=g)
    kq, ks = kv_quant.quantize(torch.randn(B, Hkv, S, D, generator=g) * 3)
    vq, vs = kv_quant.quantize(torch.randn(B, Hkv, S, D, generator=g))
    ref = _reference(q, kq, vq, ks, vs, n_keys, window, 0.125)

    # the same keys in a paged pool: block size 4, blocks handed out in a scrambled order
    bs, nblk = 4, -(-S // 4)
    pool_k = torch.zeros(B * nblk + 3, bs, Hkv, D, dtype=torch.int8)
    pool_v, pool_ks, pool_vs = torch.zeros_like(pool_k), torch.zeros(pool_k.shape[:-1]), torch.zeros(pool_k.shape[:-1])
    ids = torch.randperm(B * nblk + 3, generator=g)[: B * nblk].view(B, nblk)
    for b in range(B):
        for p in range(S):
            blk, off = ids[b, p // bs], p % bs
            pool_k[blk, off], pool_v[blk, off] = kq[b, :, p], vq[b, :, p]
            pool_ks[blk, off], pool_vs[blk, off] = ks[b, :, p], vs[b, :, p]
    with torch.inference_mode():
        assert decode_attention.applies(q, pool_k, pool_v, (pool_ks, pool_vs))
        total = torch.tensor(n_keys, dtype=torch.int32)
        paged = decode_attention.paged_decode(
            q, pool_k, pool_v, ids.to(torch.int32), total, 0.125, window, (pool_ks, pool_vs)
        )
    torch.testing.assert_close(paged, ref, atol=1e-5, rtol=1e-5)

    # and in a contiguous cache's prefix view (rows of equal length): the dense layout
    with torch.inference_mode():
        dense = decode_attention.dense_decode(q, kq, vq, 0.125, (ks, vs), window)
    torch.testing.assert_close(dense, _reference(q, kq, vq, ks, vs, [S] * B, window, 0.125), atol=1e-5, rtol=1e-5)


def _decode_logits(model, cache, ids, steps):
    out = [forward_step(model, cache, ids, last_only=True)]
    for t in range(steps):
        out.append(forward_step(model, cache, ids[:, t : t + 1]))
    return torch.cat(out, 1)


@pytest.mark.parametrize("window", [None, 6])
def test_int8_cache_stays_close_to_fp32_and_takes_a_quarter_of_the_bytes(window):
    model = tiny_model(sliding_window=window)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = _decode_logits(model, KVCache(model.cfg, 40, batch=2), ids, 12)
        cache = new_kv_cache(model.cfg, 40, batch=2, dtype=torch.int8)
        assert isinstance(cache, Int8KVCache)
        got = _decode_logits(model, cache, ids, 12)
    # per-vector int8 keeps each K/V element within 1/254 of its vector's largest: logits
    # move by well under 1% of their range on this model
    assert (got - ref).abs().max() <= 0.01 * ref.abs().max()
    D = model.cfg.head_dim
    assert cache.nbytes * 4 * D == KVCache(model.cfg, 40, batch=2).nbytes * (D + 4)


def test_paged_int8_engine_matches_the_contiguous_int8_cache_alone_and_batched():
    model, tok = tiny_model(sliding_window=8), make_tokenizer()
    prompts = [tok.encode("To be, or not to be"), tok.encode("Now is the winter of our discontent made")]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = []
    with torch.inference_mode():
        for p in prompts:  # one sequence through the contiguous int8 cache, greedy
            cache, out = Int8KVCache(model.cfg, len(p) + 24), []
            logits = forward_step(model, cache, torch.tensor([p]), last_only=True)
            for _ in range(24):
                out.append(int(logits[0, -1].argmax()))
                logits = forward_step(model, cache, torch.tensor([[out[-1]]]))
            alone.append(out)
    engine = Engine(model, tok, block_size=4, num_blocks=64, cache_dtype="int8")
    assert engine.cache.k.dtype == torch.int8 and engine.cache.scales is not None
    batched = engine.generate(prompts, greedy)
    assert [r[0].token_ids for r in batched] == alone
    assert engine.allocator.num_used == 0


def test_kv_dtype_names():
    assert kv_quant.kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_quant.kv_dtype(None, torch.int8) == torch.float32  # quantized weights: an fp32 cache
    assert kv_quant.kv_dtype("int8", torch.float32) == torch.int8
    with pytest.raises(ValueError, match="unknown KV cache dtype 'q4'"):
        kv_quant.kv_dtype("q4", torch.float32)
    cfg = preset("tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    paged = PagedKVCache(cfg, num_blocks=3, block_size=4, dtype=torch.int8)
    paged.copy_block(0, 2)
    assert paged.nbytes == 2 * 2 * 3 * 4 * 2 * (8 + 4)
