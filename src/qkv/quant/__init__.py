"""qkv.quant: weights kept in GGUF's quantized block formats (formats.py) and the modules
that hold them in place of nn.Linear / nn.Embedding (modules.py), whose Q8_0 / Q4_0 rows are
repacked for the native decode kernel (repack.py)."""

from qkv.quant.formats import FORMATS, BlockFormat, block_format, dequantize, quantize
from qkv.quant.modules import QuantEmbedding, QuantLinear, quantize_model, repack_model

__all__ = [
    "FORMATS",
    "BlockFormat",
    "QuantEmbedding",
    "QuantLinear",
    "block_format",
    "dequantize",
    "quantize",
    "quantize_model",
    "repack_model",
]
