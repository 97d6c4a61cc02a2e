"""qkv: a complete, readable and fast language-model stack on PyTorch."""

from qkv.config import ModelConfig, preset
from qkv.model import Transformer, build_model, count_params

__version__ = "0.1.0"
__all__ = ["ModelConfig", "preset", "Transformer", "build_model", "count_params", "__version__"]
