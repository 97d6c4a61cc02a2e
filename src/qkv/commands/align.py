"""Alignment study and data: `qkv align report` (base -> SFT -> RM -> PPO / DPO, the tax) or `qkv align data`.

report: runs the whole study on the bundled tiny setup and writes docs/alignment.md,
        docs/img/alignment_*.png and <out-dir>/report.json (10-15 minutes on 2 busy CPU cores).
data:   writes the bundled task as JSONL (sft.jsonl, prefs.jsonl, prefs_heldout.jsonl,
        prompts.jsonl, eval_prompts.jsonl) for the stage commands.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.align.report import ReportConfig
    from qkv.commands._align_args import add_dataclass_arguments

    p.add_argument("action", choices=["report", "data"], help="what to do")
    p.add_argument("--out-dir", default="runs/align_report", help="run directory (report) or output directory (data)")
    p.add_argument("--docs", default="docs", help="where alignment.md and img/ go (report)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_dataclass_arguments(p, ReportConfig)


def run(args: argparse.Namespace) -> int:
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
        print(f"wrote {len(t.sft)} SFT conversations, {len(t.prefs)}+{len(t.prefs_heldout)} preference pairs, "
              f"{len(t.rl_prompts)} RL prompts and {len(t.eval_prompts)} eval prompts to {out}")
        return 0
    from qkv.align.report import ReportConfig, run_report
    from qkv.commands._align_args import dataclass_from_args

    run_report(args.out_dir, args.docs, dataclass_from_args(args, ReportConfig))
    return 0
