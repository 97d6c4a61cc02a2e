"""One entry point for every model source: `load(path)` -> (Transformer, Tokenizer | None).

`path` may be a qkv checkpoint directory (config.json without `model_type`), a Hugging Face
directory (config.json with `model_type`), a `.gguf` file (or a directory holding exactly one),
or a registered model name such as `smollm2` (qkv.interop.registry). The format is detected from
what is on disk, so callers (engine, server, alignment, inspect) never need to know.

A GGUF model keeps its quantized weights as the file's blocks (qkv.quant's QuantLinear /
QuantEmbedding; about the file's size in memory) unless `dequantize=True` asks for plain fp32
weights, which whatever trains, converts or exports a model needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from qkv.config import ModelConfig
from qkv.interop.registry import resolve_model
from qkv.model import Transformer
from qkv.tokenizer import Tokenizer

Format = Literal["qkv", "hf", "gguf"]


def detect_format(path: str | Path) -> Format:
    """'qkv', 'hf' or 'gguf' for what is at `path`; a clear error when it is none of them."""
    from qkv.checkpoint import is_qkv_checkpoint

    path = resolve_model(path)
    if path.is_file():
        if path.suffix == ".gguf" or _magic(path) == b"GGUF":
            return "gguf"
        if path.name == "config.json":
            return detect_format(path.parent)
        raise ValueError(f"{path}: not a model; expected a .gguf file or a model directory")
    if is_qkv_checkpoint(path):
        return "qkv"
    if (path / "config.json").exists():
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if ggufs:  # picking one would be a guess: say which are there
        names = ", ".join(g.name for g in ggufs)
        raise ValueError(f"{path}: holds {len(ggufs)} GGUF files ({names}); pass one of them as --model")
    raise FileNotFoundError(f"{path / 'config.json'}: no config.json here; not a qkv or Hugging Face model directory")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _gguf_file(path: Path) -> Path:
    return path if path.is_file() else sorted(path.glob("*.gguf"))[0]


def load(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dequantize: bool = False,
) -> tuple[Transformer, Tokenizer | None]:
    """Load a model and its tokenizer (None when the source has none) in eval mode. `dtype`
    applies to floating-point weights; quantized GGUF weights stay in their block format
    unless `dequantize` (qkv and Hugging Face sources are never quantized)."""
    path = resolve_model(path)
    fmt = detect_format(path)
    if fmt == "qkv":
        from qkv.checkpoint import load_model

        model = load_model(path)
        tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    elif fmt == "hf":
        from qkv.interop.hf import import_hf

        model, tokenizer = import_hf(path if path.is_dir() else path.parent)
    else:
        from qkv.interop.gguf import import_gguf

        model, tokenizer = import_gguf(_gguf_file(path), dequantize=dequantize)
    if fmt != "gguf":  # a GGUF's sampling keys cost another header parse: sampling_defaults() reads them
        from qkv.interop.hf import read_generation_config

        model.generation_defaults = read_generation_config(path if path.is_dir() else path.parent)
    model = model.to(device=device, dtype=dtype).eval()
    _return_freed_memory()
    return model, tokenizer


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS. Loading makes and drops many temporary
    buffers (header strings, each tensor's bytes before it becomes a tensor), and glibc keeps
    freed memory in the process: SmolLM2 Q4_0's RSS grew by 1.48x its file after a load and
    by 1.17x after this call. A no-op where the C library has no malloc_trim (musl, macOS)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


WEIGHT_FORMATS = ("auto", "fp32", "bf16")


def load_for_inference(path: str | Path, weights: str = "auto") -> tuple[Transformer, Tokenizer | None]:
    """Load a model to decode with, its weights stored as `weights` says: "auto" keeps them
    as the source stores them (a quantized GGUF stays in its blocks, fp32 stays fp32),
    "fp32" dequantizes everything, "bf16" stores every projection and embedding as bf16
    (half fp32's bytes per decode step; activations, norms and the KV cache stay fp32, and
    the native kernels read bf16 on any AVX2 CPU)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    model, tokenizer = load(path, dequantize=weights != "auto")
    if weights == "bf16":
        from qkv.quant import quantize_model

        quantize_model(model, "bf16")
    return model, tokenizer


def load_config(path: str | Path) -> ModelConfig:
    """Only the ModelConfig of a model source (no weights are read)."""
    path = resolve_model(path)
    fmt = detect_format(path)
    if fmt == "qkv":
        return ModelConfig.load((path if path.is_dir() else path.parent) / "config.json")
    if fmt == "hf":
        from qkv.interop.hf import config_from_hf, read_hf_config

        d = path if path.is_dir() else path.parent
        return config_from_hf(read_hf_config(d), d / "config.json")
    from qkv.interop.gguf import config_from_gguf, open_gguf

    f = _gguf_file(path)
    return config_from_gguf(open_gguf(f), f)


# GGUF keys of the sampling a model's authors recommend (llama.cpp's general.sampling.*)
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def sampling_defaults(path: str | Path) -> dict:
    """The sampling defaults a model source carries, as SamplingParams field names ({} when it
    carries none): a directory's generation_config.json, a GGUF's general.sampling.* keys.
    Callers lay them over qkv.infer.sampling.DEFAULT_SAMPLING."""
    from qkv.interop.hf import read_generation_config

    path = resolve_model(path)
    fmt = detect_format(path)
    if fmt != "gguf":
        return read_generation_config(path if path.is_dir() else path.parent)
    from qkv.interop.gguf import open_gguf
    from qkv.interop.registry import card_sampling

    file = _gguf_file(path)
    reader = open_gguf(file)
    out: dict = card_sampling(file)  # the file's own keys, below, win over its model card
    for key, name in GGUF_SAMPLING_KEYS.items():
        value = reader.fields.get(key)
        if isinstance(value, (int, float)):
            out[name] = int(value) if name == "top_k" else float(value)
    return out
