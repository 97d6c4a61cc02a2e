"""qkv.interop: models in and out of qkv — Hugging Face directories (llama, mistral, qwen2,
mixtral, gpt2) both ways, GGUF files in. `load(path)` takes any of them or a qkv checkpoint."""

from qkv.interop.load import detect_format, load, load_config

__all__ = ["detect_format", "load", "load_config"]
