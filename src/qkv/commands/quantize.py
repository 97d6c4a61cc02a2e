"""Write a model as a GGUF file with its weights in a llama.cpp block format (q8_0, q4_0, q4_k, ...).

MODEL is anything `qkv.interop.load` reads: a qkv checkpoint directory, a Hugging Face
directory or a GGUF file. Embedding, head and projection weights are written in --type;
norms and biases stay f32; a tensor whose row width the format's blocks do not divide falls
back to a format that fits (q4_k -> q5_0, q6_k -> q8_0, 32-weight formats -> f16), as
llama-quantize does, and the fallback is printed. A GGUF source is loaded with its blocks kept
(about the file's size in memory): weights it already holds in --type are copied byte for
byte, the rest are dequantized one at a time and quantized again. For example:
`qkv quantize runs/tiny runs/tiny-q4_0.gguf --type q4_0`.
"""

from __future__ import annotations

import argparse

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "f16", "bf16", "f32"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="source: qkv checkpoint dir, HF model dir, or .gguf file")
    p.add_argument("out", help="the GGUF file to write (its directory must exist)")
    p.add_argument("--type", dest="qtype", choices=TYPES, default="q8_0", help="format of the weight matrices")
    p.add_argument("--name", default=None, help="general.name in the file; None: the output file's stem")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkv.interop import load
    from qkv.interop.gguf_export import export_gguf

    out = Path(args.out)
    if not out.parent.is_dir():  # before the (possibly long) load
        raise FileNotFoundError(f"{out.parent}: output directory does not exist; create it first")
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; give the path of the .gguf file to write")
    # GGUF blocks stay as they are: dequantizing them here or in the writer gives the same numbers
    model, tokenizer = load(args.model, dequantize=False)
    written = export_gguf(model, tokenizer, out, args.qtype, name=args.name)
    print(written.describe() + ("" if tokenizer is not None else "; no tokenizer"))
    return 0
