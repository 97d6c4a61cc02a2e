"""The --dtype and --kv-dtype options of the verbs that decode (generate, chat, serve,
bench): one definition."""

from __future__ import annotations

import argparse


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weights to decode with: auto keeps the file's format (a quantized GGUF stays quantized), fp32 "
        "dequantizes, bf16 stores projections and embeddings as bf16",
    )


def add_kv_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-dtype",
        choices=["auto", "fp32", "bf16", "int8"],
        default="auto",
        help="KV cache storage: auto follows the weights (fp32 for quantized ones); int8 keeps each key/value "
        "vector as int8s and one scale, about a quarter of fp32's bytes (attention reads it in place)",
    )
