"""Convert a model between formats: qkv checkpoint, Hugging Face directory or GGUF file -> qkv, HF or GGUF.

SRC is a qkv checkpoint directory, a Hugging Face directory (llama, mistral, qwen2, mixtral,
gpt2; safetensors, sharded or not) or a .gguf file; its format is detected unless --from
says. For example: `qkv convert --from gguf model.gguf --to qkv runs/smollm2`. Export to hf
picks the transformers architecture from the config (MoE: mixtral; learned positions with
layernorm and gelu: gpt2; q/k/v bias without o bias: qwen2; sliding window: mistral;
otherwise llama) unless --arch says; a config feature the target cannot express is an
error naming it. Export to gguf writes one llama.cpp file (llama, or qwen2 for q/k/v biases)
with its weights in --type (f32, f16 or bf16; `qkv quantize` writes the block formats).
Pickled weights (.bin) are refused.
"""

from __future__ import annotations

import argparse

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GGUF_TYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source: qkv checkpoint dir, HF model dir, or .gguf file")
    p.add_argument("dst", help="destination directory (a .gguf file for --to gguf)")
    p.add_argument(
        "--from", dest="src_format", choices=["auto", "qkv", "hf", "gguf"], default="auto", help="source format"
    )
    p.add_argument("--to", dest="dst_format", choices=["qkv", "hf", "gguf"], default="qkv", help="destination format")
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "mistral", "qwen2", "mixtral", "gpt2"],
        default="auto",
        help="transformers architecture for --to hf",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument(
        "--type",
        dest="gguf_type",
        choices=list(GGUF_TYPES.values()),
        default=None,
        help="GGUF weight type for --to gguf; None: --dtype's",
    )
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from qkv.interop import detect_format, load

    if args.gguf_type is not None and args.dst_format != "gguf":
        raise ValueError(f"--type applies to --to gguf only; use --dtype for --to {args.dst_format}")
    found = detect_format(args.src)
    if args.src_format != "auto" and found != args.src_format:
        raise ValueError(f"{args.src}: looks like a {found} model, not --from {args.src_format}; use --from auto")
    dst = Path(args.dst)
    if args.dst_format == "gguf":
        return _to_gguf(args, dst)
    dtype = getattr(torch, DTYPES[args.dtype])
    model, tokenizer = load(args.src, dtype=dtype, dequantize=True)  # writers take plain weights
    if args.dst_format == "qkv":
        from qkv.checkpoint import save_model

        save_model(dst, model, tokenizer)
    else:
        from qkv.interop.hf import export_hf

        export_hf(model, dst, tokenizer, arch=None if args.arch == "auto" else args.arch, dtype=dtype)
    from qkv.model import count_params

    n = count_params(model).total
    print(
        f"wrote {args.dst_format} model to {dst} ({n / 1e6:.1f}M parameters, {args.dtype}"
        f"{', with tokenizer' if tokenizer is not None else ', no tokenizer'})"
    )
    return 0


def _to_gguf(args: argparse.Namespace, dst) -> int:
    """One GGUF file in f32, f16 or bf16 (fp32 weights are loaded; the writer rounds them)."""
    from qkv.interop import load
    from qkv.interop.gguf_export import export_gguf

    if not dst.parent.is_dir():  # before the (possibly long) load
        raise FileNotFoundError(f"{dst.parent}: output directory does not exist; create it first")
    model, tokenizer = load(args.src, dequantize=True)
    written = export_gguf(model, tokenizer, dst, args.gguf_type or GGUF_TYPES[args.dtype])
    print(written.describe() + ("" if tokenizer is not None else "; no tokenizer"))
    return 0
