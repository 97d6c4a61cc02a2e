"""The --dtype option of the verbs that decode (generate, chat, serve, bench): one definition."""

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
