"""Contiguous KV cache: cached decoding equals recomputation; sizes follow the formula."""

import pytest
import torch

from _infer_fixtures import tiny_model
from qkv.config import preset
from qkv.infer.generate import forward_step, generate, generate_no_cache
from qkv.infer.kv_cache import KVCache, kv_bytes_per_token, kv_cache_bytes
from qkv.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_head=4),  # MHA
        dict(n_kv_head=2),  # GQA
        dict(n_kv_head=1),  # MQA
        dict(pos="learned", norm="layernorm", mlp="gelu"),
        dict(sliding_window=6),
        dict(attn_impl="math"),
    ],
)
def test_cached_greedy_equals_recompute(overrides):
    m = tiny_model(**overrides)
    prompt = [5, 17, 33, 2, 99, 250, 7]
    P = SamplingParams(max_tokens=24, temperature=0)
    assert generate(m, prompt, P) == generate_no_cache(m, prompt, 24)


def test_cached_logits_match_full_forward():
    m = tiny_model()
    ids = torch.randint(0, 320, (1, 20))
    full = m(ids)[0]
    c = KVCache(m.cfg, 32)
    parts = [forward_step(m, c, ids[:, :7])[0], forward_step(m, c, ids[:, 7:8])[0], forward_step(m, c, ids[:, 8:])[0]]
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)
    assert c.pos == 20


def test_truncate_rolls_back():
    m = tiny_model()
    ids = torch.randint(0, 320, (1, 12))
    c = KVCache(m.cfg, 32)
    forward_step(m, c, ids[:, :8])
    a = forward_step(m, c, ids[:, 8:12])
    c.truncate(8)
    b = forward_step(m, c, ids[:, 8:12])
    torch.testing.assert_close(a, b)


def test_cache_full_is_a_clear_error():
    m = tiny_model()
    c = KVCache(m.cfg, 4)
    with pytest.raises(ValueError, match="cache full"):
        forward_step(m, c, torch.zeros(1, 5, dtype=torch.long))


def test_kv_bytes_formula_and_gqa_shrink():
    mha = preset("llama-100m", n_kv_head=12)
    gqa = preset("llama-100m")  # 12 query heads, 4 KV heads
    mqa = preset("llama-100m", n_kv_head=1)
    assert kv_bytes_per_token(mha) == 2 * 12 * 12 * 64 * 4
    assert kv_bytes_per_token(mha, torch.bfloat16) == 2 * 12 * 12 * 64 * 2
    assert kv_bytes_per_token(mha) // kv_bytes_per_token(gqa) == 3
    assert kv_bytes_per_token(mha) // kv_bytes_per_token(mqa) == 12
    assert kv_cache_bytes(gqa, 1024, batch=8) == kv_bytes_per_token(gqa) * 1024 * 8
    m = tiny_model(n_kv_head=1)
    assert KVCache(m.cfg, 50).nbytes == kv_cache_bytes(m.cfg, 50)


def test_seeded_sampling_is_reproducible():
    m = tiny_model()
    P = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=123)
    assert generate(m, [1, 2, 3], P) == generate(m, [1, 2, 3], P)
    assert generate(m, [1, 2, 3], P) != generate(m, [1, 2, 3], SamplingParams(max_tokens=12, seed=124))


def test_prompt_longer_than_context_rejected():
    m = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="context"):
        generate(m, list(range(16)), SamplingParams(max_tokens=2))
