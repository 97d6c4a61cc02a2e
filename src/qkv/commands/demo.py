"""The whole pipeline on the bundled Shakespeare in minutes on a CPU: prepare -> pretrain tiny -> sample -> report.

Everything lands under --out (default runs/demo): data/ (tokenizer + shards), pretrain/
(the run: checkpoints, metrics.jsonl, loss.png). Re-running reuses prepared data and
resumes or reuses the pretraining run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PROMPTS = ["ROMEO:\n", "To be, or not to be", "KING HENRY.\n"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for all demo outputs")
    p.add_argument("--source", default="shakespeare", help="corpus (see `qkv prepare --help`)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--steps", type=int, default=600, help="pretraining optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--samples", type=int, default=3, help="samples to generate")
    p.add_argument("--max-tokens", type=int, default=60, help="tokens per sample")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def alignment_stages(args: argparse.Namespace, pretrained: Path, report: list) -> Path:
    """HOOK for the alignment stages (SFT -> DPO): take the pretrained checkpoint dir, run
    the stages, append (label, value) lines to `report`, and return the checkpoint dir that
    samples should come from. Until they land, the pretrained model is the final model."""
    return pretrained


def sample(model_dir: Path, prompts: list[str], max_tokens: int, seed: int = 0) -> list[str]:
    import torch

    from qkv.checkpoint import load_model
    from qkv.tokenizer import Tokenizer

    model = load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    outs = []
    try:
        from qkv.infer.generate import generate
        from qkv.infer.sampling import SamplingParams

        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed + i)
            ids = generate(model, tok.encode(p), params, eos_id=tok.eos_id)
            outs.append(p + tok.decode(ids, skip_special=True))
    except ImportError:  # minimal fallback when the inference engine is absent
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in prompts:
                ids = tok.encode(p)
                for _ in range(max_tokens):
                    logits = model(torch.tensor([ids[-model.cfg.max_seq_len:]]), last_only=True)[0, -1] / 0.8
                    v, ix = logits.topk(50)
                    ids.append(int(ix[torch.multinomial(v.softmax(-1), 1, generator=g)]))
                    if ids[-1] == tok.eos_id:
                        break
                outs.append(tok.decode(ids, skip_special=True))
    return outs


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

    print(f"[1/3] prepare {args.source} -> {data_dir}")
    t = time.perf_counter()
    if (data_dir / INDEX).exists():
        index = read_index(data_dir)
        print(f"      reusing prepared data ({index['splits']['train']['tokens']:,} train tokens)")
    else:
        index = prepare(args.source, data_dir, vocab_size=args.vocab_size, log=lambda s: print("      " + s))
    report.append(("tokenizer", f"byte-level BPE, vocab {index['vocab_size']}, {index['bytes_per_token']:.2f} bytes/token on held-out text"))
    report.append(("corpus", f"{index['splits']['train']['tokens']:,} train / {index['splits']['val']['tokens']:,} val tokens "
                             f"(unigram entropy {index['unigram_entropy']:.3f} nats/token)  [{time.perf_counter() - t:.0f}s]"))

    print(f"[2/3] pretrain {args.preset} for {args.steps} steps -> {run_dir}")
    cfg = TrainConfig(
        preset=args.preset, data_dir=str(data_dir), out_dir=str(run_dir), seq_len=args.seq_len,
        batch_size=args.batch_size, lr=args.lr, max_steps=args.steps, warmup_steps=max(1, args.steps // 15),
        eval_every=max(1, args.steps // 4), eval_steps=8, log_every=5, save_every=max(1, args.steps // 3),
        threads=args.threads, progress=not args.no_progress, device="cpu",
    )
    t = time.perf_counter()
    trainer = make_trainer(cfg, resume=latest_checkpoint(run_dir) is not None if run_dir.exists() else False)
    n = count_params(trainer.model)
    first_eval = trainer.evaluate() if trainer.step == 0 else {}
    result = trainer.fit()
    val = {"val_loss": result.val_loss, "val_bpb": result.val_bpb} if result.val_loss is not None else trainer.evaluate()
    first_loss = next((r["loss"] for r in result.history if "loss" in r), float("nan"))
    init = f"{first_eval['val_loss']:.3f} at init -> " if first_eval else ""
    report.append(("model", f"{args.preset}: {n.total / 1e6:.2f}M params ({n.total_non_embedding / 1e6:.2f}M non-embedding)"))
    report.append(("train loss", f"{first_loss:.3f} (first logged) -> {result.train_loss:.3f} (step {result.step})"))
    report.append(("val loss", f"{init}{val['val_loss']:.3f} nats/token; {val['val_bpb']:.3f} bits/byte"))
    report.append(("throughput", f"{result.tokens_per_s:,.0f} tokens/s  [{time.perf_counter() - t:.0f}s]"))
    plots = plot_run(run_dir)

    final_dir = alignment_stages(args, run_dir, report)

    print(f"[3/3] sample from {final_dir}")
    samples = sample(final_dir, (PROMPTS * args.samples)[: args.samples], args.max_tokens)

    print("\n=== qkv demo report ===")
    w = max(len(k) for k, _ in report)
    for k, v in report:
        print(f"{k:<{w}}  {v}")
    print(f"{'files':<{w}}  data {data_dir}/ | model {final_dir}/ (config.json, model.safetensors, tokenizer.json) | "
          f"metrics {run_dir / 'metrics.jsonl'} | plots {', '.join(str(p) for p in plots)}")
    print(f"{'total time':<{w}}  {time.perf_counter() - t_start:.0f}s")
    for i, s in enumerate(samples, 1):
        print(f"\n--- sample {i} ---\n{s.strip()}")
    print(f"\nnext: qkv generate {final_dir} --prompt 'ROMEO:'   |   qkv plot {run_dir}")
    return 0
