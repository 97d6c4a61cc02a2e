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
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

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
    """The same weights in transformers' LlamaForCausalLM (through qkv's exporter, which
    tests/test_interop_hf.py checks against transformers' own loading)."""
    from qkv.interop.hf import to_transformers

    return to_transformers(model, "llama")
