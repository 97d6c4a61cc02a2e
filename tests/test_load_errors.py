"""Bad model input gives one clear error line naming the file and the problem, from
`qkv.interop.load` and from `qkv convert` (exit status 1, one line on stderr)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import save_model
from qkv.cli import main as qkv_main
from qkv.config import ModelConfig
from qkv.interop import load
from qkv.interop.hf import export_hf
from qkv.model import build_model

CFG = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return export_hf(build_model(CFG), tmp_path / "hf")


def convert_fails(capsys, src, *extra) -> str:
    """Run `qkv convert SRC OUT`; it must exit 1 with exactly one line on stderr."""
    code = qkv_main(["convert", str(src), str(Path(src).parent / "converted"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf: no such file"):
        load(missing)
    assert "nope.gguf" in convert_fails(capsys, missing)


def test_missing_weights(hf_dir, capsys):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: weights file not found"):
        load(hf_dir)
    assert "model.safetensors" in convert_fails(capsys, hf_dir)


def test_missing_shard(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: shard listed"):
        load(hf_dir)


def test_unknown_architecture(hf_dir, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(
        ValueError,
        match=r"config\.json: unsupported architecture model_type='bert'.*llama, mistral, qwen2, mixtral, gpt2",
    ):
        load(hf_dir)
    assert "bert" in convert_fails(capsys, hf_dir)


def test_shape_mismatch(hf_dir, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(ValueError, match=r"model\.safetensors: shape mismatch for blocks\.0\.mlp\.\w+_proj\.weight"):
        load(hf_dir)
    assert "shape mismatch" in convert_fails(capsys, hf_dir)


def test_shape_mismatch_qkv_checkpoint(tmp_path, capsys):
    save_model(tmp_path / "ck", build_model(CFG))
    ModelConfig.from_dict({**CFG.to_dict(), "d_ff": CFG.d_ff + 8}).save(tmp_path / "ck" / "config.json")
    with pytest.raises(ValueError, match=r"model\.safetensors: shape mismatch"):
        load(tmp_path / "ck")
    assert "shape mismatch" in convert_fails(capsys, tmp_path / "ck", "--to", "hf")


@pytest.mark.parametrize("make", ["hf", "qkv"])
def test_truncated_safetensors(tmp_path, capsys, make):
    d = export_hf(build_model(CFG), tmp_path / "m") if make == "hf" else save_model(tmp_path / "m", build_model(CFG))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file \(truncated or corrupt"):
        load(d)
    assert "truncated" in convert_fails(capsys, d)


def test_truncated_gguf(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.randn(64, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        load(path)
    assert "bad.gguf" in convert_fails(capsys, path)


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_tensor("token_embd.weight", torch.randn(64, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"phi\.gguf: unsupported GGUF architecture 'phi2'; qkv imports llama, qwen2"):
        load(path)


def test_pickled_weights_are_refused(hf_dir, capsys):
    (hf_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, hf_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: pickled weights are refused"):
        load(hf_dir)
    assert "pickled" in convert_fails(capsys, hf_dir)


def test_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json here"):
        load(tmp_path / "empty")
    assert "config.json" in convert_fails(capsys, tmp_path / "empty")


def test_export_error_via_cli(tmp_path, capsys):
    save_model(tmp_path / "ck", build_model(CFG.replace(pos="sinusoidal")))
    err = convert_fails(capsys, tmp_path / "ck", "--to", "hf")
    assert "cannot export to llama: pos='sinusoidal'" in err
    assert not (tmp_path / "converted" / "model.safetensors").exists()


def test_gguf_tensor_larger_than_its_bytes(tmp_path, capsys):
    """A tensor whose declared shape needs more bytes than the file gives it (here it would run
    into the next tensor's data) is refused, naming the tensor, before anything reads it."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType

    path = tmp_path / "overlap.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    blocks = gguf.quants.quantize(torch.randn(64, 32).numpy(), GGMLQuantizationType.Q8_0)  # (64, 34) bytes
    w.add_tensor("token_embd.weight", blocks, raw_shape=(128, 34), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", torch.ones(2048).numpy())  # enough bytes after it for the reader
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = (
        r"overlap\.gguf: GGUF tensor 'token_embd\.weight' declares shape \[32, 128\] of Q8_0 \(4352 bytes\) "
        r"but the file holds 2176 bytes for it"
    )
    for dequantize in (False, True):
        with pytest.raises(ValueError, match=message):
            load(path, dequantize=dequantize)
    assert "token_embd.weight" in convert_fails(capsys, path)


# --- hostile sizes and shard names ---------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_attention_heads", 0, r"n_head=0 is out of range"),
        ("max_position_embeddings", 2**34, r"max_seq_len=17179869184 is out of range"),
        ("hidden_size", -32, r"d_model=-32 is out of range"),
        ("num_hidden_layers", "2", r"n_layer='2' is out of range"),
    ],
)
def test_hostile_sizes_in_a_transformers_config(hf_dir, capsys, key, value, message):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        load(hf_dir)
    assert message.split(" is")[0].replace("\\", "") in convert_fails(capsys, hf_dir)


def test_hostile_sizes_in_a_qkv_checkpoint(tmp_path, capsys):
    d = save_model(tmp_path / "ck", build_model(CFG))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_head": 0}))
    with pytest.raises(ValueError, match=r"config\.json: n_head=0 is out of range"):
        load(d)
    assert "n_head=0" in convert_fails(capsys, d)


def test_hostile_sizes_in_a_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    for name, heads, context, message in [
        ("noheads.gguf", 0, 32, "n_head=0 is out of range"),
        ("huge.gguf", 4, 2**34, "max_seq_len=17179869184 is out of range"),
    ]:
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_embedding_length(32)
        w.add_head_count(heads)
        w.add_feed_forward_length(64)
        w.add_uint64("llama.context_length", context)  # add_context_length writes 32 bits
        w.add_layer_norm_rms_eps(1e-5)
        w.add_tensor("token_embd.weight", torch.randn(64, 32).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=f"{name}: {message}"):
            load(path)


def test_a_shard_name_outside_the_model_directory_is_refused(hf_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    (hf_dir / "model.safetensors").rename(outside)
    index = {"weight_map": {"a": "../outside.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard '\.\./outside\.safetensors' lies outside"):
        load(hf_dir)


def test_serve_max_model_len_caps_the_context_and_the_cache(tmp_path):
    import argparse

    from qkv.commands.serve import add_arguments, cap_context
    from qkv.infer.engine import Engine

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model", "m", "--max-model-len", "16"]).max_model_len == 16
    assert p.parse_args(["--model", "m"]).max_model_len is None
    model = build_model(CFG.replace())  # its own config (capping changes it); max_seq_len 32
    assert cap_context(model, None) == 32 and cap_context(model, 100) == 32  # never raised
    assert cap_context(model, 16) == 16 and model.cfg.max_seq_len == 16
    engine = Engine(model, None, block_size=4, max_num_seqs=1)
    assert engine.max_len == 16 and engine.allocator.num_blocks * 4 == 16  # one capped context of KV cache
    with pytest.raises(ValueError, match="--max-model-len 0 must be >= 1"):
        cap_context(model, 0)
