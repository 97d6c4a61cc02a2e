"""A model file without a chat template but with Gemma's turn tokens chats in Gemma's format:
the rendering against the format Gemma's instruction-tuned models use (written out), and
`qkv chat` and the server stopping at <end_of_turn>, on a tiny random model."""

from __future__ import annotations

import io

import httpx
import pytest
import torch

from _serve_helpers import _CORPUS, BackgroundServer
from qkv import chat_formats
from qkv.checkpoint import save_model
from qkv.config import preset
from qkv.infer.engine import Engine
from qkv.model import build_model
from qkv.serve.app import create_app
from qkv.tokenizer import Tokenizer

TURN_TOKENS = ["<end_of_turn>", "<start_of_turn>", "<bos>", "<eos>"]  # <end_of_turn> is id 0


def gemma_like_tokenizer(template: str | None = None) -> Tokenizer:
    """A byte-level BPE whose specials include Gemma's turn tokens, without a chat template
    (as the Gemma 3 270M base GGUF ships)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=TURN_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS * 2, trainer)
    return Tokenizer(backend, chat_template=template, bos_token="<bos>", eos_token="<eos>", add_bos=True)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return gemma_like_tokenizer()


def test_fallback_renders_gemma_turns(tok):
    chat, note = chat_formats.fallback(tok)
    assert "Gemma" in note and "<end_of_turn>" in note
    assert chat.eos_token == "<end_of_turn>" and tok.eos_token == "<eos>" and tok.chat_template is None
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi there \n"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Count to 3."},
    ]
    expected = (  # Gemma's format: the system text opens the first user turn, "model" is the assistant
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCount to 3.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert chat.render_chat(messages, add_generation_prompt=True) == expected
    ids, mask = chat.encode_chat(messages[:3])
    assert ids[0] == chat.bos_id and ids.count(chat.eos_id) == 2
    assert chat.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<end_of_turn>\n"
    with pytest.raises(ValueError, match="alternate"):
        chat.render_chat([{"role": "assistant", "content": "x"}])


def test_a_template_or_a_vocabulary_without_turn_tokens_is_kept(tok):
    with_template = gemma_like_tokenizer("{{ messages[0]['content'] }}")
    assert chat_formats.fallback(with_template) == (with_template, None)
    from _serve_helpers import tiny_tokenizer

    plain = tiny_tokenizer()
    plain.chat_template = None
    assert chat_formats.fallback(plain) == (plain, None)


def end_of_turn_model(tok: Tokenizer):
    """A random model whose zeroed output head ties every logit, so greedy decoding picks id 0
    (<end_of_turn>) first: a reply that is one end of turn."""
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=128)
    cfg.tie_embeddings = False
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_server_stops_at_end_of_turn(tok):
    chat, _ = chat_formats.fallback(tok)
    model = end_of_turn_model(tok)
    app = create_app(Engine(model, chat, block_size=16, num_blocks=32, max_num_seqs=2), "tiny-gemma")
    messages = [{"role": "user", "content": "Hello!"}]
    with BackgroundServer(app) as srv:
        body = dict(model="tiny-gemma", messages=messages, max_tokens=8, temperature=0)
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"]["content"] == ""
    prompt = chat.encode_chat(messages, add_generation_prompt=True)[0]
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1}


def test_chat_command_uses_the_fallback(tok, tmp_path, monkeypatch, capsys):
    from qkv.cli import main

    save_model(tmp_path / "ckpt", end_of_turn_model(tok), tok)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n"))
    assert main(["chat", "--model", str(tmp_path / "ckpt"), "--temperature", "0", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "Gemma's turn format" in err
    assert "[" not in out  # no "cut short" marker: the reply ended at <end_of_turn>


def test_alignment_stages_take_the_fallback_too(tok, tmp_path, capsys):
    from qkv.commands._align_args import load_chat_tokenizer

    save_model(tmp_path / "ckpt", end_of_turn_model(tok), tok)
    chat = load_chat_tokenizer(str(tmp_path / "ckpt"))
    assert chat.chat_template == chat_formats.GEMMA_TEMPLATE and chat.eos_token == "<end_of_turn>"
    assert "Gemma's turn format" in capsys.readouterr().err
