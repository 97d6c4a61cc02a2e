"""Generation ends on every token the model declares as an end: eos, a GGUF's eot/eom ids,
generation_config.json's eos_token_id list and the chat format's end of turn. One set
(`Tokenizer.end_ids`) is used by the engine, `qkv generate`, `qkv chat`, `qkv serve` and eval;
ignore_eos turns all of it off. Tiny random models whose zeroed output head makes greedy
decoding pick id 0, and Gemma 3's own vocabulary (skipped, with the install command, without it)."""

from __future__ import annotations

import json

import torch

from _serve_helpers import _CORPUS, tiny_tokenizer
from qkv import chat_formats
from qkv.checkpoint import save_model
from qkv.config import preset
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams
from qkv.model import build_model
from qkv.tokenizer import Tokenizer
from test_chat_formats import gemma_like_tokenizer
from test_detokenize import gemma3  # noqa: F401 (the fixture: Gemma 3's vocabulary, or a skip)


def specials_tokenizer(specials: list[str], eos: str) -> Tokenizer:
    """A byte-level BPE whose special tokens are `specials` (ids 0, 1, ...), without a template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return Tokenizer(backend, eos_token=eos)


def id0_model(vocab_size: int):
    """A random model whose zeroed output head ties every logit: greedy decoding emits id 0."""
    cfg = preset("tiny", vocab_size=vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=64)
    cfg.tie_embeddings = False
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def greedy(max_tokens: int, ignore_eos: bool = False) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


def test_eos_and_the_templates_end_of_turn():
    tok = tiny_tokenizer()  # ChatML: eos <|im_end|>, which is also the template's end of turn
    assert tok.end_ids == {tok.token_id("<|im_end|>")}
    tok.eos_token = "<|endoftext|>"  # a base model's end of document: the turn's end still ends a reply
    assert tok.end_ids == {tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")}
    tok.chat_template = None
    assert tok.end_ids == {tok.token_id("<|endoftext|>")}


def test_gemma_base_ends_on_eos_and_end_of_turn():
    base = gemma_like_tokenizer()  # no template; Gemma's turn tokens in the vocabulary
    both = {base.token_id("<eos>"), base.token_id("<end_of_turn>")}
    assert base.end_ids == both
    chat, _ = chat_formats.fallback(base)  # eos becomes <end_of_turn> for chat; <eos> still ends
    assert chat.eos_token == "<end_of_turn>" and chat.end_ids == both


def test_generation_config_list_is_read_and_written(tmp_path):
    from qkv.interop.hf import generation_config

    tok = specials_tokenizer(["<|tool_end|>", "<|eot|>", "<eos>"], eos="<eos>")
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1, 0]}))
    back = Tokenizer.load(tmp_path)
    assert back.end_tokens == ("<eos>", "<|eot|>", "<|tool_end|>") and back.end_ids == {0, 1, 2}
    assert generation_config({}, back)["eos_token_id"] == [2, 1, 0]  # an export keeps the list
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.load(tmp_path).end_ids == {1, 2}
    assert generation_config({}, tok)["eos_token_id"] == 2  # nothing declared: one id, as before


def test_gguf_eot_and_eom_ids_end_generation(tmp_path):
    from qkv.interop.gguf import _with_added_tokens

    base = specials_tokenizer(["<|eom_id|>", "<|eot_id|>", "<eos>"], eos="<eos>")
    tokens = [base.backend.id_to_token(i) for i in range(base.vocab_size)]
    meta = {"tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 1, "tokenizer.ggml.eom_token_id": 0}
    tok = _with_added_tokens(base.backend, tokens, [], meta, lambda t: True)
    assert tok.eos_id == 2 and tok.end_ids == {0, 1, 2}
    meta.pop("tokenizer.ggml.eom_token_id")
    assert _with_added_tokens(base.backend, tokens, [], meta, lambda t: True).end_ids == {1, 2}


def test_engine_stops_on_a_declared_end_token_unless_ignore_eos(tmp_path):
    tok = specials_tokenizer(["<|tool_end|>", "<eos>"], eos="<eos>")
    model = id0_model(tok.vocab_size)
    plain = Engine(model, tok, block_size=8, num_blocks=16)
    assert plain.generate([[5, 6]], greedy(4))[0][0].finish_reason == "length"  # id 0 is not an end yet
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    eng = Engine(model, Tokenizer.load(tmp_path), block_size=8, num_blocks=16)
    r = eng.generate([[5, 6]], greedy(4))[0][0]
    assert (r.token_ids, r.finish_reason, r.text) == ([0], "stop", "")
    r = eng.generate([[5, 6]], greedy(4, ignore_eos=True))[0][0]
    assert (r.token_ids, r.finish_reason) == ([0, 0, 0, 0], "length")


def test_gemma_base_stops_at_end_of_turn_in_generate_serve_and_eval(tmp_path, capsys):
    """id 0 is <end_of_turn>; the base file has no template and its eos is <eos>."""
    from starlette.testclient import TestClient

    from qkv.cli import main
    from qkv.eval.harness import greedy_until
    from qkv.serve.app import create_app

    tok = gemma_like_tokenizer()
    model = id0_model(tok.vocab_size)
    save_model(tmp_path / "ckpt", model, tok)
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "Hello", "--temperature", "0"]) == 0
    assert "[stopped: eos after 1 tokens" in capsys.readouterr().err
    assert greedy_until(model, tok.encode("Hello"), ["\n"], 4, tok) == ""
    app = create_app(Engine(model, tok, block_size=8, num_blocks=16), "g")
    with TestClient(app, base_url="http://localhost") as client:
        body = {"model": "g", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == ("", "stop")
        ignored = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
        assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 4


def test_gemma3_file_ends_on_eos_and_end_of_turn(gemma3):  # noqa: F811 (the imported fixture)
    """The Gemma 3 270M base GGUF declares only <eos>; its turn tokens add <end_of_turn>, the set
    the Hugging Face release's generation_config.json lists (eos_token_id [1, 106])."""
    assert gemma3.token_id("<eos>") == 1 and gemma3.token_id("<end_of_turn>") == 106
    assert gemma3.end_ids == {1, 106}
    chat, _ = chat_formats.fallback(gemma3)
    assert chat.end_ids == {1, 106}
