"""Hugging Face interop against transformers as the oracle: tiny random models of each
supported architecture are imported by qkv (logits, greedy generation, parameter counts
must match transformers) and exported back (transformers must load them and agree)."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.config import ModelConfig
from qkv.interop import load, load_config
from qkv.interop.hf import config_to_hf, export_hf, pick_arch
from qkv.model import build_model, count_params

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, PROMPT, NEW = 128, 8, 32
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=96,
)

CASES = {
    "llama-gqa": ("LlamaConfig", dict(COMMON, num_key_value_heads=2)),
    "llama-mqa": ("LlamaConfig", dict(COMMON, num_key_value_heads=1, attention_bias=True)),
    "llama-rope-llama3": (
        "LlamaConfig",
        dict(
            COMMON,
            num_key_value_heads=2,
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama-rope-linear": (
        "LlamaConfig",
        dict(COMMON, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2, sliding_window=12)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            attn_pdrop=0.0,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
        ),
    ),
}
EXPECTED_ARCH = {
    "llama-gqa": "llama",
    "llama-mqa": "llama",
    "llama-rope-llama3": "llama",
    "llama-rope-linear": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "mixtral": "mixtral",
    "gpt2": "gpt2",
}


def make_hf(case: str):
    cls, kw = CASES[case]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw)).eval()
    with torch.no_grad():  # perturb everything (biases and norms start at 0 and 1) so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def greedy_qkv(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Plain greedy decoding with a full recompute each step (no cache, no engine)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_roundtrip(case, tmp_path):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits

    # import: logits, parameter counts
    model, tokenizer = load(tmp_path / "hf")
    assert tokenizer is None
    with torch.no_grad():
        ours = model(ids)
    assert max_diff(ours, ref) <= 1e-4, f"{case}: imported logits differ by {max_diff(ours, ref)}"
    assert count_params(model).total == hf.num_parameters()
    assert load_config(tmp_path / "hf") == model.cfg

    # greedy generation: 32 tokens identical to transformers' generate
    prompt = ids[:1, :PROMPT]
    theirs = hf.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert theirs.shape[1] == PROMPT + NEW
    assert greedy_qkv(model, prompt, NEW).tolist() == theirs.tolist()

    # export: transformers loads it as the same architecture and computes the same logits
    assert pick_arch(model.cfg) == EXPECTED_ARCH[case]
    export_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == EXPECTED_ARCH[case]
    assert back.num_parameters() == hf.num_parameters()
    with torch.no_grad():
        again = back(ids).logits
    assert max_diff(again, ref) <= 1e-4, f"{case}: exported logits differ by {max_diff(again, ref)}"


def test_sharded_checkpoint_and_tokenizer(tmp_path):
    """Sharded safetensors with an index, plus tokenizer files, import and export."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = make_hf("llama-gqa")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(tmp_path / "hf")

    model, tok = load(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= 1e-4
    assert tok is not None and tok.eos_token == "</s>" and tok.chat_template == fast.chat_template
    text = "the cat sat"
    assert tok.encode(text) == fast(text, add_special_tokens=False)["input_ids"]

    export_hf(model, tmp_path / "out", tokenizer=tok)
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == tok.eos_id


def test_bf16_load_and_export(tmp_path):
    hf = make_hf("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    export_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert next(back.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides, arch, feature",
    [
        (dict(pos="sinusoidal"), None, "sinusoidal"),
        (dict(qk_norm=True), None, "qk_norm"),
        (dict(norm="layernorm"), None, "norm='layernorm'"),
        (dict(pos="learned", norm="layernorm", mlp="swiglu"), None, "pos='learned'"),
        (dict(pos="none"), "llama", "pos='none'"),
        (dict(n_expert=4, moe_renormalize=False), None, "moe_renormalize"),
        (
            dict(n_kv_head=2, pos="learned", norm="layernorm", mlp="gelu", qkv_bias=True, o_bias=True, mlp_bias=True),
            None,
            "grouped-query",
        ),
        (dict(qkv_bias=True, o_bias=True), "qwen2", "qwen2 has q/k/v biases"),
    ],
)
def test_export_refuses_unmappable_features(overrides, arch, feature):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, d_model=32, n_head=4, **overrides)
    with pytest.raises(ValueError, match="cannot export") as e:
        config_to_hf(cfg, arch)
    assert feature in str(e.value)


def test_qkv_model_exports_and_reimports(tmp_path):
    """A model born in qkv (not from transformers) goes out and back unchanged."""
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)
    model = build_model(cfg).eval()
    export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) <= 1e-4
    again, _ = load(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


class _DDPLike(torch.nn.Module):
    """Holds the model in `.module` as DistributedDataParallel does (a real DDP needs a process group)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model


def test_wrapped_models_save_and_export_under_the_inner_names(tmp_path):
    """DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, nested in either order, are looked
    through: checkpoints, exports and training state carry the inner model's parameter names."""
    from safetensors.torch import load_file

    from qkv.checkpoint import WEIGHTS, save_model
    from qkv.train.state import full_model_state
    from qkv.wrappers import unwrap

    model = build_model(ModelConfig(vocab_size=VOCAB, n_layer=1, d_model=32, n_head=4, max_seq_len=32))
    names = set(model.state_dict())
    for wrapped in (
        model,
        _DDPLike(model),
        torch.compile(model),
        _DDPLike(torch.compile(model)),
        torch.compile(_DDPLike(model)),
    ):
        assert unwrap(wrapped) is model
    wrapped = _DDPLike(torch.compile(model))
    assert set(load_file(save_model(tmp_path / "ck", wrapped) / WEIGHTS)) == names
    assert set(full_model_state(wrapped)) == names
    plain, through = (
        load_file(export_hf(model, tmp_path / "a") / WEIGHTS),
        load_file(export_hf(wrapped, tmp_path / "b") / WEIGHTS),
    )
    assert plain.keys() == through.keys() and all(torch.equal(plain[k], through[k]) for k in plain)
