"""Hostile model files through `qkv generate`: one error line, exit status 1, no traceback, and
no large allocation on the way (the process's peak RSS, reset before each case, stays small).

Covered: GGUF files that are truncated or declare absurd counts, string lengths, dimensions or
data offsets; configs with absurd sizes; a shard index pointing outside the model directory;
pickled weights only; chat templates that loop, repeat or recurse without end (the render
budget of qkv.chat_template). tests/test_load_errors.py checks the messages of the loaders
themselves in more detail.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from _serve_helpers import make_tiny_checkpoint
from qkv.cli import main as qkv_main
from qkv.config import ModelConfig
from qkv.interop.hf import export_hf
from qkv.model import build_model

gguf = pytest.importorskip("gguf")

CFG = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)
PEAK_GROWTH_MB = 64  # a hostile file may cost a little parsing, never a model-sized allocation


def _status_kb(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def generate_fails(capsys, model: Path, *extra: str) -> str:
    """`qkv generate --model MODEL`: exit 1, exactly one line on stderr, and a small peak RSS."""
    capsys.readouterr()
    peak_known = _reset_peak_rss()
    base = _status_kb("VmRSS") if peak_known else 0
    code = qkv_main(["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "1", *extra])
    grown_mb = (_status_kb("VmHWM") - base) / 1024 if peak_known else 0.0
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qkv generate: error: "), err
    assert grown_mb < PEAK_GROWTH_MB, f"peak RSS grew {grown_mb:.0f} MB on a hostile file"
    return err


# --- GGUF ------------------------------------------------------------------------------------


def small_gguf(path: Path) -> Path:
    """A whole tiny llama model as an f32 GGUF, token_embd.weight its first tensor."""
    from qkv.interop.gguf_export import export_gguf

    export_gguf(build_model(CFG), None, path, log=lambda _: None)
    return path


def _tensor_info(data: bytearray) -> int:
    """Offset of token_embd.weight's n_dims in the tensor-info section (after its name)."""
    return bytes(data).index(b"token_embd.weight") + len(b"token_embd.weight")


def _set_u64(data: bytearray, at: int, value: int) -> None:
    data[at : at + 8] = struct.pack("<Q", value)


# the header is magic (4), version (u32), tensor count (u64), metadata count (u64), then the
# first metadata key as a u64 length + bytes; a tensor info is name, n_dims (u32), dims (u64
# each), type (u32), data offset (u64)
GGUF_EDITS = {
    "truncated": lambda d: d.__delitem__(slice(len(d) // 2, None)),
    "tensor count 2^62": lambda d: _set_u64(d, 8, 2**62),
    "metadata count 2^62": lambda d: _set_u64(d, 16, 2**62),
    "key length 2^62": lambda d: _set_u64(d, 24, 2**62),
    "n_dims 2^31": lambda d: d.__setitem__(slice(_tensor_info(d), _tensor_info(d) + 4), struct.pack("<I", 2**31)),
    "dimension 2^40": lambda d: _set_u64(d, _tensor_info(d) + 4, 2**40),
    "data offset past the end": lambda d: _set_u64(d, _tensor_info(d) + 4 + 2 * 8 + 4, 2**40),
}


@pytest.mark.parametrize("edit", list(GGUF_EDITS))
def test_hostile_gguf(tmp_path, capsys, edit):
    path = small_gguf(tmp_path / "hostile.gguf")
    data = bytearray(path.read_bytes())
    GGUF_EDITS[edit](data)
    path.write_bytes(bytes(data))
    assert "hostile.gguf: not a readable GGUF file" in generate_fails(capsys, path)


def test_the_unedited_gguf_loads(tmp_path):
    """The file the edits start from is good: each failure above is the edit's doing."""
    from qkv.interop import load

    model, _ = load(small_gguf(tmp_path / "good.gguf"))
    assert model.cfg.vocab_size == CFG.vocab_size and model.cfg.d_model == CFG.d_model


@pytest.mark.parametrize("key", ["llama.block_count", "llama.feed_forward_length"])
def test_gguf_metadata_sizes_in_range_but_not_matching_the_tensors(tmp_path, capsys, key):
    """Metadata within the size limits asking for a model far larger than the file's tensors:
    refused from the tensor shapes, before the model is allocated."""
    from qkv.interop.gguf_export import export_gguf

    path = tmp_path / "big.gguf"
    export_gguf(build_model(CFG), None, path, log=lambda _: None)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(key.encode()) + len(key)  # the key's value type (u32), then the value
    fmt = {4: "<I", 10: "<Q"}[struct.unpack("<I", data[at : at + 4])[0]]  # GGUF UINT32 / UINT64
    data[at + 4 : at + 4 + struct.calcsize(fmt)] = struct.pack(fmt, 4096 if key.endswith("count") else 2**20)
    path.write_bytes(bytes(data))
    generate_fails(capsys, path)


# --- configs and directories -----------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return export_hf(build_model(CFG), tmp_path / "hf")


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 0}, "n_head=0 is out of range"),
        ({"max_position_embeddings": 2**34}, "max_seq_len=17179869184 is out of range"),
        ({"vocab_size": 2**40}, "vocab_size=1099511627776 is out of range"),
        ({"intermediate_size": 2**40}, "d_ff=1099511627776 is out of range"),
        ({"num_hidden_layers": 10**6}, "n_layer=1000000 is out of range"),
    ],
)
def test_absurd_config_sizes(hf_dir, capsys, changes, message):
    _edit_config(hf_dir, **changes)
    assert message in generate_fails(capsys, hf_dir)


def test_sizes_in_range_but_not_matching_the_weights(hf_dir, capsys):
    """Sizes each within their limits whose model would take terabytes: the weights file
    disagrees, and that is found before any tensor of the declared size exists."""
    _edit_config(hf_dir, vocab_size=2**24, hidden_size=2**16, intermediate_size=2**20, num_attention_heads=512)
    assert "model.safetensors: shape mismatch" in generate_fails(capsys, hf_dir)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../outside.safetensors"])
def test_shard_paths_outside_the_directory(hf_dir, capsys, shard):
    (hf_dir / "model.safetensors").rename(hf_dir.parent / "outside.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    assert "lies outside" in generate_fails(capsys, hf_dir)


def test_pickled_weights_only(hf_dir, capsys):
    (hf_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, hf_dir / "pytorch_model.bin")
    assert "pickled weights are refused" in generate_fails(capsys, hf_dir)


# --- chat templates --------------------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "it loops too long",
    ),
    "a huge repeat": ("{{ 'x' * 1000000000 }}", "repeats a value to more than"),
    "endless output": ("{% for i in range(200000) %}{{ 'x' * 1000 }}{% endfor %}", "output exceeds"),
    "a huge width": ("{{ 'x' | center(1000000000) }}", "too large to build"),
    "a huge format width": ("{{ '%01000000000d' % 1 }}", "too large to build"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
}


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "ckpt", max_seq_len=64)


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_chat_template(chat_checkpoint, capsys, name):
    template, message = HOSTILE_TEMPLATES[name]
    config_path = chat_checkpoint / "tokenizer_config.json"
    good = config_path.read_text()
    try:
        config_path.write_text(json.dumps({**json.loads(good), "chat_template": template}))
        err = generate_fails(capsys, chat_checkpoint, "--chat")
    finally:
        config_path.write_text(good)
    assert "chat template" in err and message in err, err


def test_the_chat_checkpoint_generates(chat_checkpoint, capsys):
    """With its own (ChatML) template the same checkpoint answers: the template is the fault."""
    assert qkv_main(["generate", "--model", str(chat_checkpoint), "--prompt", "hi", "--max-tokens", "1", "--chat"]) == 0
