"""Supervised fine-tuning on chat JSONL ({"messages": [...]}); loss on assistant tokens only.

Example: qkv sft --model runs/base --data sft.jsonl --out-dir runs/sft --max-steps 500 --lr 3e-4 --packing
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands._align_args import add_stage_arguments

    add_stage_arguments(p, 'JSONL of {"messages": [{"role", "content"}, ...]}', epochs=True)
    p.add_argument(
        "--packing", action="store_true", help="pack several conversations per row (block-diagonal attention)"
    )


def run(args: argparse.Namespace) -> int:
    from qkv.align.data import load_sft, sft_fit
    from qkv.align.sft import run_sft
    from qkv.commands._align_args import (
        check_data,
        load_chat_tokenizer,
        load_policy,
        max_steps_given,
        report,
        stage_config,
    )

    cfg = stage_config(args, "sft")
    data = load_sft(args.data)
    heldout = load_sft(args.heldout) if args.heldout else None
    check_data(args.model, cfg, sft_fit, load_chat_tokenizer(args.model), data)  # before the weights load
    model, tok = load_policy(args.model, cfg)
    result = run_sft(
        model,
        tok,
        data,
        cfg,
        eval_conversations=heldout,
        packing=args.packing,
        resume=args.resume,
        epochs=args.epochs,
        max_steps_cap=cfg.max_steps if max_steps_given(args) else None,
    )
    report(result, "sft done")
    return 0
