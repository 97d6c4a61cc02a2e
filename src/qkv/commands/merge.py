"""Fold a LoRA adapter into its base model's weights: qkv merge BASE ADAPTER OUT.

BASE is any model qkv loads (qkv checkpoint, Hugging Face directory, .gguf file); ADAPTER a
PEFT adapter directory (what a `--lora-r` run writes at the top of its out_dir, or PEFT's
save_pretrained). Each adapted weight becomes W + (alpha / r) * B @ A. OUT is a qkv checkpoint
(--to qkv) or a transformers directory (--to hf) in fp32; a quantized GGUF base is dequantized
first, so OUT holds fp32 weights (run `qkv quantize OUT ...` to get a GGUF back).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model: qkv checkpoint dir, HF model dir, or .gguf file")
    p.add_argument("adapter", help="LoRA adapter directory in PEFT's format (adapter_config.json + safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", dest="dst_format", choices=["qkv", "hf"], default="qkv", help="output format")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qkv.interop import load
    from qkv.lora import load_adapter, merge_lora

    model, tokenizer = load(args.base, dequantize=True)  # the writers take plain fp32 weights
    cfg = load_adapter(model, args.adapter)
    merge_lora(model)
    out = Path(args.out)
    if args.dst_format == "qkv":
        from qkv.checkpoint import save_model

        save_model(out, model, tokenizer)
    else:
        from qkv.interop.hf import export_hf

        export_hf(model, out, tokenizer)
    print(f"merged the rank-{cfg.r} adapter {args.adapter} into {args.base}: wrote a {args.dst_format} model to {out}")
    return 0
