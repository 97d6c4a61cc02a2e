"""Direct preference optimisation (sigmoid, ipo, hinge or robust) against a frozen reference.

Reference log-probs are computed once up front. --ref defaults to the starting model.
Example: qkv dpo --model runs/sft --data prefs.jsonl --beta 0.1 --loss-type sigmoid --out-dir runs/dpo
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands._align_args import add_stage_arguments

    add_stage_arguments(p, 'JSONL of {"prompt", "chosen", "rejected"}', epochs=True)
    p.add_argument("--ref", default=None, help="reference checkpoint; None: a frozen copy of --model")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument(
        "--loss-type",
        choices=["sigmoid", "ipo", "hinge", "robust"],
        default="sigmoid",
        help="ipo uses TRL's length-normalised log-ratios",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0, help="robust DPO's label noise rate")


def run(args: argparse.Namespace) -> int:
    from qkv.align.data import load_preferences, preference_fit
    from qkv.align.dpo import run_dpo
    from qkv.commands._align_args import (
        check_data,
        load_chat_tokenizer,
        load_policy,
        max_steps_given,
        report,
        stage_config,
    )

    cfg = stage_config(args, "dpo")
    prefs = load_preferences(args.data)
    heldout = load_preferences(args.heldout) if args.heldout else None
    check_data(args.model, cfg, preference_fit, load_chat_tokenizer(args.model), prefs)  # before the weights load
    model, tok = load_policy(args.model, cfg)
    ref = load_policy(args.ref)[0] if args.ref else None
    result = run_dpo(
        model,
        tok,
        prefs,
        cfg,
        ref_model=ref,
        beta=args.beta,
        loss_type=args.loss_type,
        label_smoothing=args.label_smoothing,
        heldout=heldout,
        resume=args.resume,
        epochs=args.epochs,
        max_steps_cap=cfg.max_steps if max_steps_given(args) else None,
    )
    report(result, "dpo done")
    return 0
