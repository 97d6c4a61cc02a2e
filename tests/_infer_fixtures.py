"""Shared helpers for the inference tests: a tiny BPE tokenizer, tiny random models, and
a qkv -> transformers LlamaForCausalLM weight mapping (the oracle)."""

from __future__ import annotations

import torch

from qkv.config import preset
from qkv.model import build_model

TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]


def make_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from qkv.tokenizer import Tokenizer

    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(TEXT * 5, trainer)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return Tokenizer(t, chat_template=template, eos_token="<|endoftext|>")


def tiny_model(vocab_size: int = 320, seed: int = 0, **overrides):
    """A random 2-layer GQA model with weights large enough for varied, tie-free outputs."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=128, init_std=0.08)
    cfg.update(overrides)
    return build_model(preset("tiny", **cfg)).eval()


def to_hf_llama(model):
    """Copy a qkv Llama-style model into transformers' LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attention_bias=c.qkv_bias,
        mlp_bias=c.mlp_bias, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.final_norm.weight}
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = b.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.mlp_norm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(b.attn, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(b.mlp, n).weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf
