"""Train a Bradley-Terry reward model (transformer + scalar head) on preference JSONL.

Data: {"prompt", "chosen", "rejected"} lines (strings or message lists; optional "margin").
Example: qkv reward --model runs/sft --data prefs.jsonl --heldout prefs_val.jsonl --out-dir runs/rm
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands._align_args import add_stage_arguments

    add_stage_arguments(p, 'JSONL of {"prompt", "chosen", "rejected"}', epochs=True)
    p.add_argument("--margin", type=float, default=0.0, help="margin m in -log sigmoid(r_w - r_l - m)")
    p.add_argument(
        "--center-coef",
        type=float,
        default=None,
        help="add c * (r_w + r_l)^2 (TRL's center_rewards_coefficient); None: none",
    )


def run(args: argparse.Namespace) -> int:
    from qkv.align.data import load_preferences, preference_fit, read_jsonl
    from qkv.align.policy import RewardModel, from_transformer
    from qkv.align.reward import run_reward
    from qkv.commands._align_args import (
        check_data,
        load_chat_tokenizer,
        load_policy,
        max_steps_given,
        report,
        stage_config,
    )

    cfg = stage_config(args, "reward")
    if cfg.lora_r:
        raise ValueError("qkv reward trains every weight and its score head; drop --lora-r (adapters: sft, dpo, grpo)")
    prefs = load_preferences(args.data)
    rows = [r for _, r in read_jsonl(args.data)]
    margins = [float(r["margin"]) for r in rows] if all("margin" in r for r in rows) else None
    heldout = load_preferences(args.heldout) if args.heldout else None
    check_data(args.model, cfg, preference_fit, load_chat_tokenizer(args.model), prefs)  # before the weights load
    base, tok = load_policy(args.model)
    model = from_transformer(RewardModel, base)
    result, metrics = run_reward(
        model,
        tok,
        prefs,
        cfg,
        heldout=heldout,
        margins=margins,
        margin=args.margin,
        center_coef=args.center_coef,
        resume=args.resume,
        epochs=args.epochs,
        max_steps_cap=cfg.max_steps if max_steps_given(args) else None,
    )
    report(result, "reward model done")
    if metrics:
        print(
            f"held-out pairwise accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs, "
            f"mean margin {metrics['margin']:.3f}"
        )
    return 0
