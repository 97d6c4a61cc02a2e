"""The fused native decode block (qkv.infer.fused_decode) against the model's own forward."""

import pytest
import torch

from qkv.config import preset
from qkv.infer import fused_decode
from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import KVCache
from qkv.model import build_model

pytestmark = pytest.mark.skipif(fused_decode._decode_block.get() is None, reason="no AVX2 CPU or C compiler here")

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
