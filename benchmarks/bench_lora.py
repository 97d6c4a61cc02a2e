"""LoRA vs full fine-tuning of a bundled model: peak RSS, step time and the task judge.

--model smollm2 (SmolLM2-135M-Instruct, a Q4_1 GGUF) or gemma3-270m (Gemma 3 270M base, a Q4_K_M
GGUF). Each run is `qkv sft` in its own process (so its peak RSS is its own), on the bundled
task's SFT data, the same batch, sequence length and number of steps:

    full        every weight trains (the GGUF dequantized to fp32), AdamW lr 3e-5
    lora-f32    LoRA r=16 alpha=32 on all linear layers of an fp32 copy (`qkv convert --to qkv`), lr 1e-3
    qlora-<q>   the same adapters on the GGUF kept quantized (QLoRA), lr 1e-3

Step time: the median of the steps after the first (metrics.jsonl). Judge: the bundled task's
gold judge (qkv.align.task.gold_reward, in [-1, 1]) averaged over 32 held-out prompts, greedy,
for the base model and after each run. Benchmarks (--eval-tasks): `qkv eval`'s harness on the
first --eval-limit items of each task, 0-shot, for the base and each run (adapters merged). Run
under the shared lock:

    flock /tmp/qkv-bench.lock python benchmarks/bench_lora.py [--model smollm2|gemma3-270m] --steps 20 \
        [--eval-tasks arc_easy,hellaswag --eval-limit 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"smollm2": "q4_1", "gemma3-270m": "q4_k_m"}  # bundled model -> its GGUF's weight format

RUNNER = """
import json, resource, sys
from qkv.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
sys.exit(rc)
"""


def run_sft(name: str, model: str, data: Path, out: Path, steps: int, lr: float, lora: bool, threads: int) -> dict:
    args = [sys.executable, "-c", RUNNER, "sft", "--model", model, "--data", str(data), "--out-dir", str(out)]
    args += ["--max-steps", str(steps), "--batch-size", "4", "--seq-len", "128", "--lr", str(lr), "--warmup-steps", "2"]
    args += ["--save-every", "0", "--eval-every", "0", "--log-every", "1", "--no-progress", "--threads", str(threads)]
    if lora:
        args += ["--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all-linear"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ})
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rss = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_MB")))
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [h["tokens"] / h["tokens_per_s"] for h in hist[1:] if h.get("tokens_per_s")]
    for line in proc.stdout.splitlines():
        if line.startswith("sft done"):
            print(f"  {name}: {line}")
    return {
        "name": name,
        "peak_rss_mb": rss,
        "step_s": statistics.median(step_s),
        "first_loss": hist[0]["loss"],
        "last_loss": hist[-1]["loss"],
    }


def judge(model, tok, prompts) -> float:
    from qkv.align.evaluate import judge_policy
    from qkv.align.task import gold_reward, prompt_text

    _, summary = judge_policy(
        model, tok, prompts, lambda p, r: gold_reward(prompt_text(p), r), max_new_tokens=16, temperature=0.0
    )
    return summary["gold"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--no-judge", action="store_true", help="peak RSS and step time only (no generation)")
    ap.add_argument("--eval-tasks", default="", help="qkv eval tasks scored before and after each run (none: skip)")
    ap.add_argument("--eval-limit", type=int, default=200, help="items per --eval-tasks task")
    args = ap.parse_args()

    import torch

    from qkv import chat_formats
    from qkv.align.task import make_task, write_jsonl
    from qkv.eval.harness import EvalOptions, core_score, evaluate, parse_tasks
    from qkv.interop import load
    from qkv.lora import load_adapter, merge_lora

    torch.set_num_threads(args.threads)
    task = make_task(seed=0, n_sft=400, n_prefs=10, n_prefs_heldout=10, n_rl=10, n_eval=args.n_eval)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    data = write_jsonl(tmp / "sft.jsonl", task.sft)
    f32 = tmp / f"{args.model}-f32"  # an fp32 qkv checkpoint of the model, for LoRA on fp32 weights
    subprocess.run([sys.executable, "-m", "qkv.cli", "convert", args.model, str(f32), "--to", "qkv"], check=True)
    runs = [
        ("full", args.model, 3e-5, False),
        ("lora-f32", str(f32), 1e-3, True),
        (f"qlora-{MODELS[args.model]}", args.model, 1e-3, True),
    ]
    base, raw_tok = load(str(f32))
    # a base model's file may have turn tokens but no template, as `qkv sft` says
    tok, _ = chat_formats.fallback(raw_tok)
    eval_tasks = parse_tasks(args.eval_tasks) if args.eval_tasks else []

    def bench_scores(m) -> dict:
        """Each task's primary accuracy with its standard error, and the CORE score."""
        if not eval_tasks:
            return {}
        res = evaluate(m, raw_tok, eval_tasks, EvalOptions(limit=args.eval_limit, progress=False))
        out = {t: (r.metrics[r.primary], r.metrics[r.primary + "_stderr"], r.primary) for t, r in res.items()}
        return {**out, "CORE": core_score(res)}

    scores = {"base (no fine-tuning)": float("nan") if args.no_judge else judge(base, tok, task.eval_prompts)}
    base_bench = bench_scores(base)
    results = []
    for name, model, lr, lora in runs:
        r = run_sft(name, model, data, tmp / name, args.steps, lr, lora, args.threads)
        r["judge"], r["bench"] = float("nan"), {}
        results.append(r)
        if args.no_judge and not eval_tasks:
            continue
        if lora:
            m, _ = load(model, dequantize=True)
            load_adapter(m, tmp / name)
            merge_lora(m)
        else:
            m, _ = load(tmp / name)
        if not args.no_judge:
            r["judge"] = scores[name] = judge(m, tok, task.eval_prompts)
        r["bench"] = bench_scores(m)
        del m
    print(f"\n{args.model}: {args.steps} steps of 4 x 128 tokens, {args.threads} threads", end="")
    print(f"; judge over {args.n_eval} prompts")
    print(f"base judge {scores['base (no fine-tuning)']:+.3f}")
    print("| run | peak RSS (MB) | step (s) | loss first -> last | judge |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['peak_rss_mb']:,.0f} | {r['step_s']:.2f} | "
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {r['judge']:+.3f} |"
        )
    if eval_tasks:
        print(f"\nqkv eval, first {args.eval_limit} items of each task, 0-shot (primary metric +- stderr):")
        print("| model | " + " | ".join(eval_tasks) + " | CORE |")
        print("|---|" + "---|" * (len(eval_tasks) + 1))
        for name, b in [("base (no fine-tuning)", base_bench)] + [(r["name"], r["bench"]) for r in results]:
            cells = [f"{b[t][0]:.3f} +- {b[t][1]:.3f} ({b[t][2]})" for t in eval_tasks]
            print(f"| {name} | " + " | ".join(cells) + f" | {b['CORE']:.3f} |")


if __name__ == "__main__":
    main()
