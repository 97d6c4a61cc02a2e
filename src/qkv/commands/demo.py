"""The whole pipeline on the bundled Shakespeare in minutes on a CPU:
prepare -> pretrain tiny -> SFT -> DPO -> sample -> report.

Everything lands under --out (default runs/demo): data/ (tokenizer + shards), pretrain/
(the run: checkpoints, metrics.jsonl, loss.png), sft/ and dpo/ (the chat models).
Re-running reuses prepared data and resumes or reuses each training stage.

The alignment stages use the bundled task of qkv.align.task (docs/alignment.md): word
questions over Shakespeare lines plus real chatterbot conversations for SFT, preference
pairs labelled by a programmatic judge for DPO, and the judge's score on held-out prompts
as the measure of what each stage changed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PROMPTS = ["ROMEO:\n", "To be, or not to be", "KING HENRY.\n"]
CHAT_PROMPTS = [  # for the chat model after SFT: one task question (held-out play), one conversation
    [{"role": "user", "content": 'First word: "Now is the winter of our discontent"'}],
    [{"role": "user", "content": "Hello, how are you?"}],
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for all demo outputs")
    p.add_argument("--source", default="shakespeare", help="corpus (see `qkv prepare --help`)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--steps", type=int, default=600, help="pretraining optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's own choice)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps (0 skips SFT and DPO)")
    p.add_argument("--dpo-steps", type=int, default=100, help="DPO steps after SFT (0 skips DPO)")
    p.add_argument("--samples", type=int, default=3, help="samples to generate")
    p.add_argument("--max-tokens", type=int, default=60, help="tokens per sample")
    p.add_argument("--eval-limit", type=int, default=20, help="items per benchmark in the closing `qkv eval` glance")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def alignment_stages(args: argparse.Namespace, pretrained: Path, report: list) -> Path:
    """SFT then DPO from the pretrained checkpoint on the bundled task; appends report lines
    (the judge's mean score on held-out prompts after each stage) and returns the final
    chat model's directory."""
    if args.sft_steps <= 0:
        return pretrained
    import copy

    from qkv.align.data import Preference
    from qkv.align.dpo import run_dpo
    from qkv.align.evaluate import judge_policy, win_rate
    from qkv.align.sft import run_sft
    from qkv.align.task import gold_reward, make_task, prompt_text
    from qkv.checkpoint import load_model
    from qkv.tokenizer import IM_END, Tokenizer
    from qkv.train import TrainConfig
    from qkv.train.state import latest_checkpoint

    model, tok = load_model(pretrained), Tokenizer.load(pretrained)
    tok.eos_token = IM_END  # a chat model ends its turn with <|im_end|>, as SmolLM2 does
    task = make_task(seed=0, n_eval=64)
    out = Path(args.out)

    def stage_cfg(name: str, steps: int, lr: float) -> TrainConfig:
        return TrainConfig(
            out_dir=str(out / name),
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=lr,
            max_steps=steps,
            warmup_steps=max(1, steps // 10),
            eval_every=0,
            save_every=0,
            log_every=10,
            threads=args.threads,
            progress=not args.no_progress,
            device="cpu",
        )

    def done_before(name: str) -> bool:  # a re-run resumes (or reuses) each stage, as pretraining does
        return (out / name).exists() and latest_checkpoint(out / name) is not None

    def judged(m) -> list[float]:  # the judge's score of one sampled answer per held-out prompt
        return judge_policy(m, tok, task.eval_prompts, lambda p, t: gold_reward(prompt_text(p), t), seed=7)[1]["scores"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    print(f"[3/5] SFT for {args.sft_steps} steps on {len(task.sft)} conversations -> {out / 'sft'}")
    t = time.perf_counter()
    r = run_sft(
        model,
        tok,
        [c["messages"] for c in task.sft],
        stage_cfg("sft", args.sft_steps, 1e-3),
        packing=True,
        resume=done_before("sft"),
    )
    sft_scores = judged(model)
    report.append(
        (
            "SFT",
            f"train loss {r.train_loss:.3f} on assistant tokens; judge score {mean(sft_scores):+.3f} "
            f"on {len(sft_scores)} held-out questions (range -1..1)  [{time.perf_counter() - t:.0f}s]",
        )
    )
    if args.dpo_steps <= 0:
        return out / "sft"
    print(f"[4/5] DPO for {args.dpo_steps} steps on {len(task.prefs)} judged preference pairs -> {out / 'dpo'}")
    t = time.perf_counter()
    prefs = [Preference(p["prompt"], p["chosen"], p["rejected"]) for p in task.prefs]
    ref = copy.deepcopy(model)
    run_dpo(
        model, tok, prefs, stage_cfg("dpo", args.dpo_steps, 1e-4), ref_model=ref, beta=0.1, resume=done_before("dpo")
    )
    dpo_scores = judged(model)
    report.append(
        (
            "DPO",
            f"judge score {mean(dpo_scores):+.3f} (SFT {mean(sft_scores):+.3f}); "
            f"wins {win_rate(dpo_scores, sft_scores):.0%} of prompts against SFT  [{time.perf_counter() - t:.0f}s]",
        )
    )
    return out / "dpo"


def sample(model_dir: Path, prompts: list, max_tokens: int, seed: int = 0) -> list[str]:
    """One sampled continuation per prompt: a string is continued as text, a list of chat
    messages gets the model's assistant reply (rendered with its chat template)."""
    from qkv.checkpoint import load_model
    from qkv.infer.generate import generate
    from qkv.infer.sampling import SamplingParams
    from qkv.tokenizer import Tokenizer

    model = load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    outs = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed + i)
        if isinstance(p, str):
            ids = generate(model, tok.encode(p), params, eos_id=tok.eos_id)
            outs.append(p + tok.decode(ids, skip_special=True))
        else:
            ids = generate(model, tok.encode_chat(p, add_generation_prompt=True)[0], params, eos_id=tok.eos_id)
            outs.append(f"user: {p[-1]['content']}\nassistant: {tok.decode(ids, skip_special=True)}")
    return outs


def benchmark_glance(model_dir: Path, args: argparse.Namespace) -> None:
    """A few items of two benchmarks on the pretrained model: where it stands against chance."""
    from qkv.eval import data
    from qkv.eval.harness import RANDOM_BASELINE, EvalOptions, evaluate
    from qkv.interop.load import load_for_inference

    tasks = ["arc_easy", "piqa"]
    try:
        data.data_root()
    except FileNotFoundError as e:
        print(f"\n(skipping the benchmark glance: {e})")
        return
    print(f"\n--- qkv eval --model {model_dir} --tasks {','.join(tasks)} --limit {args.eval_limit} ---")
    model, tokenizer = load_for_inference(model_dir)
    results = evaluate(model, tokenizer, tasks, EvalOptions(limit=args.eval_limit, progress=False))
    for name, r in results.items():
        score, err = r.metrics[r.primary], r.metrics[r.primary + "_stderr"]
        print(f"{name:<9} {r.primary} {score:.2f} ± {err:.2f} on {r.n} items (chance {RANDOM_BASELINE[name]:.2f})")
    print("a model this small trained for minutes sits near chance; `qkv eval` on SmolLM2 shows a real one")


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.commands.plot import plot_run
    from qkv.data.prepare import prepare
    from qkv.data.shards import INDEX, read_index
    from qkv.model import count_params
    from qkv.train import TrainConfig
    from qkv.train.pretrain import make_trainer
    from qkv.train.state import latest_checkpoint

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "pretrain"
    report: list[tuple[str, str]] = []

    print(f"[1/5] prepare {args.source} -> {data_dir}")
    t = time.perf_counter()
    if (data_dir / INDEX).exists():
        index = read_index(data_dir)
        print(f"      reusing prepared data ({index['splits']['train']['tokens']:,} train tokens)")
    else:
        index = prepare(args.source, data_dir, vocab_size=args.vocab_size, log=lambda s: print("      " + s))
    report.append(
        (
            "tokenizer",
            f"byte-level BPE, vocab {index['vocab_size']}, {index['bytes_per_token']:.2f} bytes/token on held-out text",
        )
    )
    report.append(
        (
            "corpus",
            f"{index['splits']['train']['tokens']:,} train / {index['splits']['val']['tokens']:,} val tokens "
            f"(unigram entropy {index['unigram_entropy']:.3f} nats/token)  [{time.perf_counter() - t:.0f}s]",
        )
    )

    print(f"[2/5] pretrain {args.preset} for {args.steps} steps -> {run_dir}")
    cfg = TrainConfig(
        preset=args.preset,
        data_dir=str(data_dir),
        out_dir=str(run_dir),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.steps,
        warmup_steps=max(1, args.steps // 15),
        eval_every=max(1, args.steps // 4),
        eval_steps=8,
        log_every=5,
        save_every=max(1, args.steps // 3),
        threads=args.threads,
        progress=not args.no_progress,
        device="cpu",
    )
    t = time.perf_counter()
    trainer = make_trainer(cfg, resume=latest_checkpoint(run_dir) is not None if run_dir.exists() else False)
    n = count_params(trainer.model)
    first_eval = trainer.evaluate() if trainer.step == 0 else {}
    result = trainer.fit()
    val = (
        {"val_loss": result.val_loss, "val_bpb": result.val_bpb} if result.val_loss is not None else trainer.evaluate()
    )
    first_loss = next((r["loss"] for r in result.history if "loss" in r), float("nan"))
    init = f"{first_eval['val_loss']:.3f} at init -> " if first_eval else ""
    report.append(
        ("model", f"{args.preset}: {n.total / 1e6:.2f}M params ({n.total_non_embedding / 1e6:.2f}M non-embedding)")
    )
    report.append(("train loss", f"{first_loss:.3f} (first logged) -> {result.train_loss:.3f} (step {result.step})"))
    report.append(("val loss", f"{init}{val['val_loss']:.3f} nats/token; {val['val_bpb']:.3f} bits/byte"))
    report.append(("throughput", f"{result.tokens_per_s:,.0f} tokens/s  [{time.perf_counter() - t:.0f}s]"))
    plots = plot_run(run_dir)

    final_dir = alignment_stages(args, run_dir, report)

    print(f"[5/5] sample from {run_dir}" + (f" and {final_dir}" if final_dir != run_dir else ""))
    samples = sample(
        run_dir, (PROMPTS * args.samples)[: args.samples], args.max_tokens
    )  # the base model continues text
    if final_dir != run_dir:  # the chat model answers
        samples += sample(final_dir, CHAT_PROMPTS, args.max_tokens)

    print("\n=== qkv demo report ===")
    w = max(len(k) for k, _ in report)
    for k, v in report:
        print(f"{k:<{w}}  {v}")
    print(
        f"{'files':<{w}}  data {data_dir}/ | model {final_dir}/ (config.json, model.safetensors, tokenizer.json) | "
        f"metrics {run_dir / 'metrics.jsonl'} | plots {', '.join(str(p) for p in plots)}"
    )
    print(f"{'total time':<{w}}  {time.perf_counter() - t_start:.0f}s")
    for i, s in enumerate(samples, 1):
        print(f"\n--- sample {i} ---\n{s.strip()}")
    benchmark_glance(run_dir, args)
    chat = f"qkv chat --model {final_dir}   |   " if final_dir != run_dir else ""
    print(f"\nnext: {chat}qkv generate --model {run_dir} --prompt 'ROMEO:'   |   qkv plot {run_dir}")
    return 0
