"""transformers' `from_pretrained(dir, gguf_file=...)` as the oracle for a GGUF model, fast.

transformers reads a GGUF file's metadata twice (config, then weights) with the `gguf`
package's reader, which makes numpy views element by element: on Gemma 3's 262,144-token
vocabulary that is about two minutes of a test's time, spent on tokenizer arrays the model
never uses. `hf_model` hands transformers a copy of the file without those arrays, with
`{arch}.vocab_size` (the length of the dropped token list, where the file lacks the key;
transformers reads it from there when the list is absent) in their place. Architecture
metadata and tensors are copied byte for byte, so transformers still maps names, reads the
architecture and dequantizes the blocks itself. Tests of the tokenizer load the original."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from qkv.interop.gguf_file import DEFAULT_ALIGNMENT, MAGIC, _Cursor

VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
_COPIES: dict[Path, Path] = {}
_DIR = tempfile.TemporaryDirectory(prefix="qkv-gguf-oracle-")


def without_vocabulary(path: Path, out: Path) -> Path:
    """Write `path` to `out` without its tokenizer arrays, with `{arch}.vocab_size` set."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data, path)
    assert bytes(cur.take(4, "magic")) == MAGIC
    version = cur.u32("version")
    n_tensors, n_fields = cur.u64("tensors"), cur.u64("fields")
    kept: list[bytes] = []
    fields = {}
    for _ in range(n_fields):
        start = cur.pos
        key = cur.string("key")
        fields[key] = cur.value(cur.u32("type"), key)
        if key not in VOCAB_ARRAYS:
            kept.append(bytes(data[start : cur.pos]))
    infos_start = cur.pos
    for _ in range(n_tensors):
        cur.string("name")
        for _ in range(cur.u32("n_dims")):
            cur.u64("dim")
        cur.u32("type")
        cur.u64("offset")
    infos = bytes(data[infos_start : cur.pos])
    align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // align) * align
    key = f"{fields['general.architecture']}.vocab_size"
    if key not in fields:
        n_vocab = len(fields["tokenizer.ggml.tokens"])
        kept.append(struct.pack("<Q", len(key)) + key.encode() + struct.pack("<II", 4, n_vocab))  # 4: uint32
    head = MAGIC + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept) + infos
    with open(out, "wb") as f:
        f.write(head + b"\0" * (-len(head) % align))
        f.write(memoryview(data[data_start:]))
    return out


def hf_model(path: Path):
    """transformers' model for the GGUF file at `path` (fp32, eval mode)."""
    import transformers

    path = Path(path)
    if path not in _COPIES:
        _COPIES[path] = without_vocabulary(path, Path(_DIR.name) / path.name)
    copy = _COPIES[path]
    model = transformers.AutoModelForCausalLM.from_pretrained(copy.parent, gguf_file=copy.name, dtype=torch.float32)
    return model.eval()
