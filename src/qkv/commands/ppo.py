"""PPO-RLHF: policy + value head, frozen reference and reward model, engine rollouts, KL penalty, GAE.

Data: prompts JSONL ({"prompt": ...}). --gold-judge logs the bundled task's gold reward
beside the proxy (reward-model) score for every rollout (out_dir/rollouts.jsonl).
Example: qkv ppo --model runs/sft --reward-model runs/rm --data prompts.jsonl --iterations 50 --out-dir runs/ppo
"""

from __future__ import annotations

import argparse

STAGE_OVERRIDES = dict(lr=1e-5)  # RL fine-tuning steps are small: TrainConfig defaults the stage changes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.align.ppo import PPOConfig
    from qkv.commands._align_args import add_dataclass_arguments, add_stage_arguments

    add_stage_arguments(p, 'JSONL of {"prompt": ...}', heldout=False, **STAGE_OVERRIDES)
    p.add_argument("--reward-model", required=True, help="reward model directory (from `qkv reward`)")
    p.add_argument("--ref", default=None, help="reference checkpoint; None: --model")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations (rollout batches); sets max_steps")
    p.add_argument("--ptx-data", default=None, help="plain-text file for PPO-ptx (with --ptx-coef > 0)")
    p.add_argument("--gold-judge", action="store_true", help="also log the bundled task's gold reward per rollout")
    add_dataclass_arguments(p, PPOConfig)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from qkv.align.policy import load_reward_model
    from qkv.align.ppo import PPOConfig, run_ppo
    from qkv.commands._align_args import (
        dataclass_from_args,
        load_policy,
        load_prompts_arg,
        reference_for,
        report,
        stage_config,
        task_gold_fn,
    )

    cfg = stage_config(args, "ppo", **STAGE_OVERRIDES)
    ppo = dataclass_from_args(args, PPOConfig)
    policy, tok = load_policy(args.model, cfg)
    ref = reference_for(policy, args.ref, args.model)  # LoRA: the policy with its adapters off
    rm = load_reward_model(args.reward_model)
    prompts = load_prompts_arg(args.data)
    ptx = None
    if args.ptx_data:
        path = Path(args.ptx_data)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file (--ptx-data)")
        ptx = torch.tensor(tok.encode(path.read_text(encoding="utf-8", errors="replace")), dtype=torch.long)
    result, stats = run_ppo(
        policy,
        ref,
        rm,
        tok,
        prompts,
        cfg,
        ppo,
        gold_fn=task_gold_fn() if args.gold_judge else None,
        ptx_tokens=ptx,
        resume=args.resume,
        n_iterations=args.iterations,
    )
    report(result, "ppo done")
    if stats:
        s = stats[-1]
        gold = f", gold {s['gold']:.3f}" if s.get("gold") is not None else ""
        print(f"last rollout: proxy score {s['score_proxy']:.3f}{gold}, KL {s['kl']:.3f}, beta {s['kl_coef']:.4f}")
    return 0
