"""The fused native decode block (qkv.infer.fused_decode) against the model's own forward."""

import pytest
import torch

from qkv.config import preset
from qkv.infer import fused_decode, kv_quant
from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import KVCache, new_kv_cache
from qkv.infer.paged import PagedKVCache
from qkv.model import build_model

pytestmark = pytest.mark.skipif(fused_decode._decode_layers.get() is None, reason="no AVX2 CPU or C compiler here")

VARIANTS = {
    "llama (GQA, RoPE)": dict(),
    "biases (Qwen2-style)": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "MQA": dict(n_kv_head=1),
    "MHA": dict(n_kv_head=4),
    "learned positions": dict(pos="learned"),
    "sinusoidal positions": dict(pos="sinusoidal"),
    "no positions": dict(pos="none"),
    "sliding window": dict(sliding_window=5),
    "GPT-2 (LayerNorm, GELU tanh, biases)": dict(
        norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, o_bias=True, mlp_bias=True
    ),
    "LayerNorm without bias, exact GELU": dict(norm="layernorm", norm_bias=False, mlp="gelu", gelu_approx="none"),
    "Gemma 3 (GeGLU, qk-norm, sandwich norms, 1+w, local/global RoPE)": dict(
        mlp="geglu",
        qk_norm=True,
        post_norm=True,
        norm_offset=1.0,
        embed_scale=8.0,
        sliding_window=5,
        layer_types=["local", "global"],
        rope_local_theta=100.0,
        query_pre_attn_scalar=24,
        final_softcap=3.0,
    ),
    "GeGLU exact, post-norms with LayerNorm": dict(mlp="geglu", gelu_approx="none", norm="layernorm", post_norm=True),
}


def _model(**kw):
    cfg = preset("tiny", vocab_size=300, n_layer=2, d_model=64, n_head=4, **{"n_kv_head": 2, **kw})
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)  # away from init so every weight and bias matters
    return m


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_matches_the_model_and_fills_the_cache_alike(variant, batch):
    m = _model(**VARIANTS[variant])
    cfg = m.cfg
    fused, ref = KVCache(cfg, 40, batch=batch), KVCache(cfg, 40, batch=batch)
    prompt = torch.randint(3, 300, (batch, 9))
    with torch.inference_mode():
        forward_step(m, fused, prompt)  # prefill: T > 1 takes the model's path
        forward_step(m, ref, prompt)
        for _ in range(8):  # past the window, for the sliding-window variant
            tok = torch.randint(3, 300, (batch, 1))
            pos = torch.arange(fused.pos, fused.pos + 1)
            h = fused_decode.hidden(m, tok, pos, fused)
            assert h is not None
            fused.advance(1)
            h_ref = m.hidden(tok, positions=pos, cache=ref)  # each layer narrows to its own window
            ref.advance(1)
            torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.k, ref.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.v, ref.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(attn_softcap=5.0), dict(n_expert=4), dict(attn_impl="math"), dict(mlp="none")])
def test_models_outside_the_fused_block_take_their_own_path(kw):
    m = _model(**kw)
    cache = KVCache(m.cfg, 20)
    with torch.inference_mode():
        forward_step(m, cache, torch.tensor([[5, 6, 7]]))
        assert fused_decode.hidden(m, torch.tensor([[8]]), torch.tensor([3]), cache) is None


def test_no_fused_path_for_bf16_training_mode_or_inspection():
    m = _model()
    cache = KVCache(m.cfg, 20)
    tok, pos = torch.tensor([[8]]), torch.tensor([0])
    with torch.inference_mode():
        assert fused_decode.hidden(m, tok, pos, cache) is not None
        m.train()
        assert fused_decode.hidden(m, tok, pos, cache) is None
        m.eval()
        m.blocks[0].attn.keep_probs = True
        assert fused_decode.hidden(m, tok, pos, cache) is None
        m.blocks[0].attn.keep_probs = False
        m.to(torch.bfloat16)
        assert fused_decode.hidden(m, tok, pos, KVCache(m.cfg, 20, dtype=torch.bfloat16)) is None


def test_a_full_cache_leaves_the_error_to_the_model():
    m = _model()
    cache = KVCache(m.cfg, 4)
    with torch.inference_mode():
        forward_step(m, cache, torch.tensor([[5, 6, 7, 8]]))
        assert fused_decode.hidden(m, torch.tensor([[9]]), torch.tensor([4]), cache) is None
        with pytest.raises(ValueError, match="KV cache full"):
            forward_step(m, cache, torch.tensor([[9]]))


@pytest.mark.parametrize("batch", [3, 6])  # under 4 rows and 4 or more: the kernels' two tilings
def test_a_decode_step_is_bitwise_the_same_alone_or_batched(batch):
    m = _model()
    cfg = m.cfg
    prompts = torch.randint(3, 300, (batch, 9))
    alone = [KVCache(cfg, 20) for _ in range(batch)]
    batched = KVCache(cfg, 20, batch=batch)
    tok = torch.randint(3, 300, (batch, 1))
    with torch.inference_mode():
        for b, cache in enumerate(alone):
            forward_step(m, cache, prompts[b : b + 1])
            batched.k[:, b], batched.v[:, b] = cache.k[:, 0], cache.v[:, 0]  # the same cache contents
        batched.pos = alone[0].pos
        pos = torch.tensor([batched.pos])
        together = fused_decode.hidden(m, tok, pos, batched)
        for b, cache in enumerate(alone):
            assert torch.equal(fused_decode.hidden(m, tok[b : b + 1], pos, cache)[0], together[b])


def test_the_fused_step_follows_weights_changed_after_its_first_call():
    """The C view of the blocks is cached between steps: a module swapped in, a weight assigned
    or moved (`.data`), or a projection the block cannot read must each show in the next step."""
    m = _model()
    cache = KVCache(m.cfg, 20)
    tok = torch.tensor([[8]])

    def step_matches_model() -> bool:
        with torch.inference_mode():
            cache.pos = 0
            h = fused_decode.hidden(m, tok, torch.tensor([0]), cache)
            assert h is not None
            cache.pos = 0
            torch.testing.assert_close(h, m.hidden(tok, positions=torch.tensor([0]), cache=cache))
        return True

    assert step_matches_model()
    new = torch.nn.Linear(m.cfg.d_model, m.blocks[0].attn.q_proj.out_features, bias=False)
    torch.nn.init.normal_(new.weight, 0, 0.2)
    m.blocks[0].attn.q_proj = new  # a module swapped in
    assert step_matches_model()
    m.blocks[1].mlp.up_proj.weight = torch.nn.Parameter(torch.randn_like(m.blocks[1].mlp.up_proj.weight) * 0.2)
    assert step_matches_model()
    m.blocks[1].mlp.down_proj.weight.data = torch.randn_like(m.blocks[1].mlp.down_proj.weight) * 0.2  # moved
    assert step_matches_model()
    m.blocks[1].attn_norm.weight.data = m.blocks[1].attn_norm.weight.data + 0.5
    assert step_matches_model()
    m.blocks[1].attn.o_proj = m.blocks[1].attn.o_proj.to(torch.bfloat16)  # one the C block cannot read
    with torch.inference_mode():
        assert fused_decode.hidden(m, tok, torch.tensor([0]), cache) is None


GEMMA = "Gemma 3 (GeGLU, qk-norm, sandwich norms, 1+w, local/global RoPE)"
TABLES = torch.tensor([[5, 2, 7, 0], [1, 6, 3, 4]])  # scattered blocks of 8 slots, 32 tokens a row


def _cache(cfg, dtype: torch.dtype, paged: bool, batch: int):
    if paged:
        return PagedKVCache(cfg, num_blocks=8, block_size=8, dtype=dtype)
    return new_kv_cache(cfg, 32, batch=batch, dtype=dtype)


def _forward(m, cache, tokens: torch.Tensor, start: int, fused: bool) -> torch.Tensor:
    """One forward of tokens (B, T) at positions start.. through either cache kind, by the
    fused block (a decode step) or the model's own path."""
    B, T = tokens.shape
    if isinstance(cache, PagedKVCache):
        cache.prepare(TABLES[:B], torch.full((B,), start), torch.full((B,), T), T)
        pos = cache.pos
    else:
        pos = torch.arange(start, start + T)
    h = fused_decode.hidden(m, tokens, pos, cache) if fused else m.hidden(tokens, positions=pos, cache=cache)
    assert h is not None
    if isinstance(cache, KVCache):
        cache.advance(T)
    return h


def _int8_state(cache) -> list[torch.Tensor]:
    scales = (cache.k_scale, cache.v_scale) if isinstance(cache, KVCache) else cache.scales
    return [cache.k, cache.v, *scales]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("variant", ["llama (GQA, RoPE)", GEMMA])
def test_fused_step_with_an_int8_cache_writes_and_attends_as_the_pytorch_int8_path(variant, paged):
    """Three caches from one prompt: int8 through the fused block, int8 through the model's
    own path (Int8KVCache / the paged pool with the q8 kernel), fp32 through the fused block.
    Layer 0's new K/V depend on the token alone, so there the fused int8 rows must be
    kv_quant.quantize of the fused fp32 rows bit for bit (the same rounding); deeper layers
    see attention over int8 and match the PyTorch int8 path to the kernels' rounding."""
    m = _model(**VARIANTS[variant])
    cfg, B = m.cfg, 2
    fused, ref, fp32 = (_cache(cfg, dt, paged, B) for dt in (torch.int8, torch.int8, torch.float32))
    prompt = torch.randint(3, 300, (B, 9))
    with torch.inference_mode():
        for c in (fused, ref, fp32):
            _forward(m, c, prompt, 0, fused=False)  # prefill: T > 1 takes the model's path
        for step in range(9, 17):  # past the window, for the Gemma variant
            tok = torch.randint(3, 300, (B, 1))
            h = _forward(m, fused, tok, step, fused=True)
            h_ref = _forward(m, ref, tok, step, fused=False)
            _forward(m, fp32, tok, step, fused=True)
            torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    k, v, ks, vs = _int8_state(fused)
    for data, scale, exact in ((k, ks, fp32.k), (v, vs, fp32.v)):
        q, s = kv_quant.quantize(exact[0])
        assert torch.equal(data[0], q) and torch.equal(scale[0], s)
    for got, want in zip(_int8_state(fused), _int8_state(ref), strict=True):
        if got.dtype == torch.int8:  # one step of 1/127 at most, where the fp32 K/V differ by an ulp
            assert (got.int() - want.int()).abs().max() <= 1
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_the_fused_block_quantizes_kv_vectors_bitwise_as_kv_quant():
    """The C rounding against kv_quant.quantize on many vectors of mixed magnitudes and on
    exact ties (a vector whose largest element is 127 * 2^e has scale 2^e, so (k + 1/2) * 2^e
    lands halfway between two steps and must round to even, as torch.round does)."""
    import ctypes

    from qkv.kernels import native

    fn = native.Kernel("decode_attention_f32", "qkv_quantize_kv_f32", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2)
    g = torch.Generator().manual_seed(0)
    n, D = 8192, 64
    mixed = torch.randn(n, D, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 3)
    e = torch.randint(-10, 10, (n // 4, 1), generator=g).float()
    ties = (torch.randint(-127, 127, (n // 4, D), generator=g) + 0.5) * 2**e
    ties[:, 0] = 127 * 2 ** e[:, 0]
    x = torch.cat([mixed, ties, torch.zeros(1, D)])
    q, scale = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0])
    fn.get()(x.data_ptr(), q.data_ptr(), scale.data_ptr(), x.shape[0], D)
    q_ref, scale_ref = kv_quant.quantize(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_the_fused_step_reads_rope_tables_grown_past_their_build_length():
    from qkv.model.transformer import ROPE_ROWS_AT_BUILD

    m = _model(max_seq_len=2 * ROPE_ROWS_AT_BUILD)
    pos = ROPE_ROWS_AT_BUILD + 100
    fused, ref = KVCache(m.cfg, pos + 1), KVCache(m.cfg, pos + 1)
    fused.pos = ref.pos = pos  # an empty prefix: the step attends to itself
    tok = torch.tensor([[8]])
    with torch.inference_mode():
        h = fused_decode.hidden(m, tok, torch.tensor([pos]), fused)
        assert m.rope_cos.shape[0] == 2 * ROPE_ROWS_AT_BUILD
        torch.testing.assert_close(h, m.hidden(tok, positions=torch.tensor([pos]), cache=ref), atol=1e-5, rtol=1e-5)


def test_describe_names_the_kv_caches_the_fused_block_reads():
    if not fused_decode.native.enabled():
        pytest.skip("native kernels are off here")
    cfg = _model().cfg
    assert "int8 KV cache read in place" in fused_decode.describe(cfg, "int8")
    assert "fp32 or int8 KV cache read in place" in fused_decode.describe(cfg)
    assert fused_decode.describe(cfg, "bf16").startswith("op by op")
