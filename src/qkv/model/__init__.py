"""qkv.model: the transformer and its parts (attention, positions, layers, moe)."""

from qkv.model.transformer import Block, ParamCounts, Transformer, build_model, count_params

__all__ = ["Block", "ParamCounts", "Transformer", "build_model", "count_params"]
