"""Alignment study, data and judge: `qkv align report` (base -> SFT -> RM -> PPO / DPO, the tax),
`qkv align data`, or `qkv align eval --model M`.

report: runs the whole study on the bundled tiny setup and writes docs/alignment.md,
        docs/img/alignment_*.png and <out-dir>/report.json (10-15 minutes on 2 busy CPU cores).
data:   writes the bundled task as JSONL (sft.jsonl, prefs.jsonl, prefs_heldout.jsonl,
        prompts.jsonl, eval_prompts.jsonl) for the stage commands.
eval:   the bundled task's judge on any chat model (qkv checkpoint, Hugging Face dir or
        .gguf): gold mean over the held-out questions, exact answers, length, EOS rate.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.align.report import ReportConfig
    from qkv.commands._align_args import add_dataclass_arguments

    p.add_argument("action", choices=["report", "data", "eval"], help="what to do")
    p.add_argument("--model", default=None, help="eval: the chat model to judge (qkv checkpoint, HF dir or .gguf)")
    p.add_argument("--out-dir", default="runs/align_report", help="run directory (report) or output directory (data)")
    p.add_argument("--docs", default="docs", help="where alignment.md and img/ go (report)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_dataclass_arguments(p, ReportConfig)


def run(args: argparse.Namespace) -> int:
    if args.action == "eval":
        return _eval(args)
    if args.action == "data":
        from pathlib import Path

        from qkv.align.task import make_task, write_jsonl

        t = make_task(seed=args.seed)
        out = Path(args.out_dir)
        write_jsonl(out / "sft.jsonl", t.sft)
        write_jsonl(out / "prefs.jsonl", t.prefs)
        write_jsonl(out / "prefs_heldout.jsonl", t.prefs_heldout)
        write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in t.rl_prompts])
        write_jsonl(out / "eval_prompts.jsonl", [{"prompt": p} for p in t.eval_prompts])
        print(
            f"wrote {len(t.sft)} SFT conversations, {len(t.prefs)}+{len(t.prefs_heldout)} preference pairs, "
            f"{len(t.rl_prompts)} RL prompts and {len(t.eval_prompts)} eval prompts to {out}"
        )
        return 0
    from qkv.align.report import ReportConfig, run_report
    from qkv.commands._align_args import dataclass_from_args

    run_report(args.out_dir, args.docs, dataclass_from_args(args, ReportConfig))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qkv.align.evaluate import judge_policy
    from qkv.align.task import gold_reward, make_task, prompt_text
    from qkv.commands._align_args import load_policy

    if not args.model:
        raise ValueError("qkv align eval needs --model (a qkv checkpoint, Hugging Face directory or .gguf file)")
    model, tok = load_policy(args.model)
    task = make_task(seed=args.seed, n_eval=args.n_eval)
    _, j = judge_policy(
        model.eval(),
        tok,
        task.eval_prompts,
        lambda p, t: gold_reward(prompt_text(p), t),
        args.max_new_tokens,
        args.temperature,
        seed=args.seed + 99,
        n=args.samples_per_prompt,
    )
    n = len(j["scores"])
    print(
        f"{args.model}: judge score {j['gold']:+.3f} (range -1..1) over {n} answers to {len(task.eval_prompts)} "
        f"held-out questions; exact {j['exact']:.1%}; {j['length']:.1f} tokens; EOS {j['eos_rate']:.0%}"
    )
    for p, t in j["examples"]:
        print(f"  {prompt_text(p)!r} -> {t!r}")
    return 0
