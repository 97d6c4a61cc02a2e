"""qkv: a complete, readable and fast language-model stack on PyTorch."""

from qkv.config import ModelConfig, preset
from qkv.model import Transformer, build_model, count_params

__version__ = "0.1.0"
__all__ = ["ModelConfig", "preset", "Transformer", "build_model", "count_params", "load", "__version__"]


def __getattr__(name: str):
    # `qkv.load(path)` -> (model, tokenizer) for qkv checkpoints, Hugging Face dirs and GGUF
    # files; imported lazily so `import qkv` stays light.
    if name == "load":
        from qkv.interop import load

        return load
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")
