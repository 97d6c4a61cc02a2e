"""The model stays plain PyTorch; the inference side installs its fast implementations."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from qkv.config import ModelConfig
from qkv.infer import backend, fused_decode
from qkv.infer.generate import generate
from qkv.infer.sampling import SamplingParams
from qkv.kernels import native
from qkv.model import build_model
from qkv.model.layers import RMSNorm

CFG = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)


def test_the_model_package_imports_no_inference_code():
    model_dir = Path(__file__).parents[1] / "src" / "qkv" / "model"
    offenders = [
        f"{p.name}: {line.strip()}"
        for p in sorted(model_dir.glob("*.py"))
        for line in p.read_text().splitlines()
        if re.search(r"\bqkv\.(kernels|infer|quant|train|serve)\b", line)
    ]
    assert offenders == []


def test_prepare_swaps_modules_and_shares_parameters():
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    backend.prepare_for_inference(model, "native")
    assert backend.backend_of(model) == "native"
    assert isinstance(model.blocks[0].attn.q_proj, backend.NativeLinear)
    assert isinstance(model.blocks[0].attn_norm, backend.NativeRMSNorm)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # same names, same tensors
    backend.prepare_for_inference(model, "torch")
    assert type(model.blocks[0].attn.q_proj) is nn.Linear
    assert type(model.blocks[0].attn_norm) is RMSNorm
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    backend.prepare_for_inference(model)  # None keeps what the model has
    assert backend.backend_of(model) == "torch"


def test_native_and_torch_backends_generate_the_same_tokens():
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    params = SamplingParams(max_tokens=12, temperature=0.0)
    backend.prepare_for_inference(model, "torch")
    reference = generate(model, [1, 2, 3, 4, 5], params)
    backend.prepare_for_inference(model, "native")
    assert generate(model, [1, 2, 3, 4, 5], params) == reference


def test_a_prepared_model_still_trains():
    torch.manual_seed(0)
    model = backend.prepare_for_inference(build_model(CFG), "native").train()
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad is not None


def test_fused_block_refuses_a_config_field_it_does_not_know():
    @dataclasses.dataclass
    class NewerConfig(ModelConfig):
        attn_logit_softcap: float = 50.0

    assert fused_decode.refusal(CFG) is None
    why = fused_decode.refusal(NewerConfig(**CFG.to_dict()))
    assert why is not None and "attn_logit_softcap" in why
    assert "attn_softcap" in (fused_decode.refusal(CFG.replace(attn_softcap=50.0)) or "")


@pytest.mark.skipif(not native.enabled(), reason="native kernels are off here (QKV_NATIVE=0 or no AVX2 CPU)")
def test_struct_mirrors_match_the_c_structs():
    assert fused_decode._decode_kernel() is not None  # raises if a ctypes mirror's size is off


@pytest.mark.skipif(not native.enabled(), reason="native kernels are off here (QKV_NATIVE=0 or no AVX2 CPU)")
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "q6_k", "bf16"])
def test_fused_block_runs_quantized_projections_like_the_modules(qtype):
    """The fused decode step over QuantLinear blocks computes what the modules compute one by
    one (the same quantized kernel), and the cache it fills matches."""
    from qkv.infer.kv_cache import KVCache
    from qkv.quant import quantize_model

    torch.manual_seed(0)
    # q/k/v biases (Qwen2's): a repacked format runs q/k/v in one call, each with its own bias
    cfg = CFG.replace(d_model=256, n_head=4, n_kv_head=2, head_dim=64, d_ff=512, qkv_bias=True)
    model = quantize_model(build_model(cfg).eval(), qtype, include=["blocks.*"])
    with torch.no_grad():
        for blk in model.blocks:
            for proj in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                proj.bias.normal_()  # built as zeros
    backend.prepare_for_inference(model, "native")
    view = fused_decode._current_view(model)
    assert fused_decode.supports(model) and view is not None and len(view.blocks) == cfg.n_layer
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    caches = [KVCache(cfg, 16), KVCache(cfg, 16)]
    with torch.inference_mode():
        for c in caches:
            model.hidden(prompt, cache=c)
            c.advance(prompt.shape[1])
        step = torch.tensor([[7]])
        pos = torch.tensor([prompt.shape[1]])
        fused = fused_decode.hidden(model, step, pos, caches[0])
        modules = model.hidden(step, positions=pos, cache=caches[1])
    assert fused is not None
    torch.testing.assert_close(fused, modules, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=1e-5)
