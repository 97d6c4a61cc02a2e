"""GRPO: group-relative advantages from several samples per prompt, no value model.

Rewards come from the bundled task's gold judge (--gold-judge, a programmatic reward) or
a reward model (--reward-model). Data: prompts JSONL ({"prompt": ...}).
Example: qkv grpo --model runs/sft --data prompts.jsonl --gold-judge --iterations 30 --out-dir runs/grpo
"""

from __future__ import annotations

import argparse

STAGE_OVERRIDES = dict(lr=1e-5)  # RL fine-tuning steps are small: TrainConfig defaults the stage changes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.align.grpo import GRPOConfig
    from qkv.commands._align_args import add_dataclass_arguments, add_stage_arguments

    add_stage_arguments(p, 'JSONL of {"prompt": ...}', heldout=False, **STAGE_OVERRIDES)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gold-judge", action="store_true", help="reward = the bundled task's programmatic judge")
    src.add_argument("--reward-model", default=None, help="reward = this reward model's score")
    p.add_argument("--ref", default=None, help="reference checkpoint; None: --model")
    p.add_argument("--iterations", type=int, default=None, help="GRPO iterations; sets max_steps")
    add_dataclass_arguments(p, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    from qkv.align.grpo import GRPOConfig, run_grpo
    from qkv.commands._align_args import (
        dataclass_from_args,
        load_policy,
        load_prompts_arg,
        reference_for,
        report,
        stage_config,
        task_gold_fn,
    )

    cfg = stage_config(args, "grpo", **STAGE_OVERRIDES)
    grpo = dataclass_from_args(args, GRPOConfig)
    policy, tok = load_policy(args.model, cfg)
    ref = reference_for(policy, args.ref, args.model)
    if args.gold_judge:
        reward_fn = task_gold_fn()
    else:
        from qkv.align.policy import load_reward_model
        from qkv.align.reward import score

        rm = load_reward_model(args.reward_model)

        def reward_fn(prompt, response: str) -> float:
            return float(score(rm, tok, [prompt], [response])[0])

    prompts = load_prompts_arg(args.data)
    result, stats = run_grpo(
        policy, ref, tok, prompts, reward_fn, cfg, grpo, n_iterations=args.iterations, resume=args.resume
    )
    report(result, "grpo done")
    if stats:
        print(f"last rollout: reward {stats[-1]['reward']:.3f}, KL {stats[-1]['kl']:.3f}")
    return 0
