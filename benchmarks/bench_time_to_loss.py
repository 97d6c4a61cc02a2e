"""Time to a target validation loss: qkv (Muon, AdamW) beside litgpt 0.5.13 (AdamW), on CPU.

Same model, data, batches and schedule for every run:
- a small GPT-2-style model: 4 layers, d 128, 4 heads, LayerNorm, tanh-GELU MLP (4d), biases,
  tied embeddings; RoPE positions, because litgpt has no learned position embedding;
- the bundled Shakespeare, tokenized once by `qkv prepare` (BPE, vocab 1024); litgpt reads the
  very same windows (the batches qkv's trainer draws for steps 0..N-1, dumped to .npy) and the same
  validation batches;
- batch 16 x context 128, fp32, lr warmup 20 steps then cosine to 0.1 x peak over N steps,
  grad clip 1.0; weights initialised as litgpt does, N(0, sqrt(2 / (5 d))) (INIT_STD below);
- AdamW lr 3e-3, betas (0.9, 0.95), weight decay 0.1 (qkv: not on norms, biases, embeddings;
  litgpt's `pretrain`: on everything, its default); qkv+Muon: Muon lr 0.02 (momentum 0.95,
  Nesterov, 5 Newton-Schulz steps) on the hidden matrices, AdamW lr 3e-3 on the rest.
litgpt runs through its own `litgpt.pretrain.setup` (Lightning Fabric), as shipped except that
its unconditional torch.compile is replaced by the eager model (qkv runs eager too): on the
2 shared cores where this was measured, inductor's compile of litgpt's model had not finished a
20-step run after 13 minutes. --litgpt-compile keeps it (on a quiet machine with a C++ compiler).

Wall time counts training only: the time spent evaluating is measured and subtracted in every run
(from the first training step). Runs go one
after another in fresh processes; the machine is shared, so compare ratios from one invocation.

    python benchmarks/bench_time_to_loss.py [--steps 400] [--target 5.0] [--litgpt-python PATH]

litgpt lives in its own virtualenv (default /root/.cache/qkv-bench/litgpt-venv):
    python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install litgpt==0.5.13 requests
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "qkv-bench" / "time-to-loss"
LITGPT_PY = Path.home() / ".cache" / "qkv-bench" / "litgpt-venv" / "bin" / "python"
L, D, H, T, B, VOCAB = 4, 128, 4, 128, 16, 1024
LR, MUON_LR, WARMUP, MIN_RATIO, WD, EVAL_BATCHES, SEED = 3e-3, 0.02, 20, 0.1, 0.1, 8, 1337
# litgpt's pretrain initialises every Linear and Embedding with N(0, sqrt(2 / (5 d))) (GPT-NeoX's
# small init); qkv's default is GPT-2's 0.02, meant for d = 768 and too small at d = 128 (qkv with
# 0.02 ended 400 AdamW steps at 3.99 where both reach 3.71-3.72 with this): the same init for both
INIT_STD = math.sqrt(2 / (5 * D))
IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "time_to_loss.png"


def prepare_data(steps: int) -> Path:
    """The token shards (qkv) and the same train/val windows as .npy (litgpt)."""
    from qkv.data.loader import EVAL_STREAM, WindowSampler
    from qkv.data.prepare import prepare
    from qkv.data.shards import TokenShards

    data = CACHE / f"shakespeare-{VOCAB}"
    if not (data / "index.json").exists():
        prepare("shakespeare", data, vocab_size=VOCAB, log=lambda s: None)
    train = WindowSampler(TokenShards(data, "train"), T, SEED)
    val = WindowSampler(TokenShards(data, "val"), T, SEED)
    np.save(CACHE / "train.npy", np.concatenate([train.windows((s, 0), B) for s in range(steps)]))
    np.save(CACHE / "val.npy", np.concatenate([val.windows((EVAL_STREAM + i, 0), B) for i in range(EVAL_BATCHES)]))
    return data


def run_qkv(optimizer: str, steps: int, eval_every: int, out: Path) -> list[dict]:
    import shutil

    import torch

    from qkv.train import TrainConfig
    from qkv.train.pretrain import make_trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        data_dir=str(CACHE / f"shakespeare-{VOCAB}"),
        out_dir=str(out),
        preset="tiny",
        model=dict(
            n_layer=L,
            d_model=D,
            n_head=H,
            n_kv_head=H,
            pos="rope",
            norm="layernorm",
            mlp="gelu",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            init_std=INIT_STD,
        ),
        seq_len=T,
        batch_size=B,
        max_steps=steps,
        lr=LR,
        warmup_steps=WARMUP,
        min_lr_ratio=MIN_RATIO,
        weight_decay=WD,
        optimizer=optimizer,
        muon_lr=MUON_LR,
        eval_every=eval_every,
        eval_steps=EVAL_BATCHES,
        save_every=0,
        log_every=10**9,
        progress=False,
        threads=2,
        seed=SEED,
        device="cpu",
    )
    t = make_trainer(cfg)
    trace: list[dict] = []
    evaluate, eval_time = t.evaluate, [0.0]

    def timed_evaluate() -> dict:
        e0 = time.perf_counter()
        trained = e0 - t0 - eval_time[0]
        out = evaluate()
        eval_time[0] += time.perf_counter() - e0
        trace.append({"step": t.step, "seconds": trained, **out})
        return out

    t.evaluate = timed_evaluate
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    t.fit()
    return trace


LITGPT_DRIVER = r"""
import json, sys, time
from dataclasses import dataclass
import numpy as np, torch
from torch.utils.data import DataLoader
import litgpt.pretrain as P
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.data import DataModule

a = json.loads(sys.argv[1])
torch.set_num_threads(2)
if not a["compile"]:  # litgpt.pretrain compiles unconditionally; eager unless asked (see the docstring)
    torch.compile = lambda model, *args, **kw: model

@dataclass
class Windows(DataModule):
    def connect(self, tokenizer=None, batch_size=1, max_seq_length=-1):
        self.batch_size = batch_size
    def train_dataloader(self):
        return DataLoader(torch.from_numpy(np.load(a["train"])), batch_size=self.batch_size, shuffle=False)
    def val_dataloader(self):
        return DataLoader(torch.from_numpy(np.load(a["val"])), batch_size=self.batch_size, shuffle=False)

trace, clock = [], {"t0": None, "eval": 0.0, "n": 0}
validate = P.validate
def timed_validate(fabric, model, loader, max_iters, verbose=True):
    e0 = time.perf_counter()
    loss = validate(fabric, model, loader, max_iters, verbose=False)
    if clock["t0"] is None:  # the sanity check before training: the clock starts after it
        clock["t0"] = time.perf_counter()
        return loss
    trained = e0 - clock["t0"] - clock["eval"]
    clock["eval"] += time.perf_counter() - e0
    clock["n"] += 1
    trace.append({"step": clock["n"] * a["eval_every"], "seconds": trained, "val_loss": float(loss)})
    return loss
P.validate = timed_validate

cfg = Config(name="bench-gpt2", block_size=a["T"], vocab_size=a["V"], padded_vocab_size=a["V"], n_layer=a["L"],
             n_head=a["H"], n_embd=a["D"], n_query_groups=a["H"], rotary_percentage=1.0, parallel_residual=False,
             bias=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=4 * a["D"],
             gelu_approximate="tanh")
P.setup(
    "bench-gpt2", model_config=cfg, out_dir=__import__("pathlib").Path(a["out"]), precision="32-true",
    data=Windows(), devices=1, logger_name="csv", seed=a["seed"],
    train=TrainArgs(save_interval=None, log_interval=10**9, global_batch_size=a["B"], micro_batch_size=a["B"],
                    max_tokens=a["steps"] * a["B"] * a["T"], max_seq_length=a["T"], max_norm=1.0,
                    min_lr=a["lr"] * a["min_ratio"], lr_warmup_steps=a["warmup"], tie_embeddings=True),
    eval=EvalArgs(interval=a["eval_every"], max_iters=a["eval_batches"], initial_validation=False,
                  final_validation=False),
    optimizer={"class_path": "torch.optim.AdamW",
               "init_args": {"lr": a["lr"], "weight_decay": a["wd"], "betas": [0.9, 0.95]}},
)
print("TRACE " + json.dumps(trace))
"""


def run_litgpt(python: Path, steps: int, eval_every: int, out: Path, compile: bool) -> list[dict]:
    args = dict(
        compile=compile,
        train=str(CACHE / "train.npy"),
        val=str(CACHE / "val.npy"),
        out=str(out),
        steps=steps,
        eval_every=eval_every,
        eval_batches=EVAL_BATCHES,
        T=T,
        B=B,
        V=VOCAB,
        L=L,
        H=H,
        D=D,
        lr=LR,
        min_ratio=MIN_RATIO,
        warmup=WARMUP,
        wd=WD,
        seed=SEED,
    )
    proc = subprocess.run(
        [str(python), "-c", LITGPT_DRIVER, json.dumps(args)], capture_output=True, text=True, cwd=str(CACHE)
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TRACE ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"litgpt run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(line[len("TRACE ") :])


def time_to(trace: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation at or below target."""
    return next((r["seconds"] for r in trace if r["val_loss"] <= target), None)


def run_all(args: argparse.Namespace, shape: list[str]) -> dict[str, list[dict]]:
    """Every run of --runs, one after another in fresh processes; their traces, also saved."""
    CACHE.mkdir(parents=True, exist_ok=True)
    prepare_data(args.steps)
    traces: dict[str, list[dict]] = {}
    for name in args.runs.split(","):
        w0 = time.perf_counter()
        if name == "litgpt":
            run = CACHE / "run-litgpt"
            traces[name] = run_litgpt(args.litgpt_python, args.steps, args.eval_every, run, args.litgpt_compile)
        else:
            cmd = [sys.executable, __file__, "--worker", name.split("-", 1)[1], "--steps", str(args.steps), *shape]
            proc = subprocess.run(cmd + ["--eval-every", str(args.eval_every)], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("TRACE ")), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"{name} failed: {proc.stderr[-3000:]}")
            traces[name] = json.loads(line[len("TRACE ") :])
        last = traces[name][-1]
        (CACHE / f"trace-{name}.json").write_text(json.dumps(traces[name]))
        print(
            f"{name}: {last['step']} steps, val loss {last['val_loss']:.4f}, {last['seconds']:.1f} s training "
            f"({time.perf_counter() - w0:.0f} s wall with evals and start-up)",
            flush=True,
        )
    (CACHE / "traces.json").write_text(json.dumps(traces, indent=1))
    return traces


def main() -> None:
    global B, T, WARMUP, EVAL_BATCHES  # the run's shape, also in the worker processes
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--target", default="5.0", help="validation loss(es) to reach, nats/token, comma-separated")
    p.add_argument("--litgpt-python", type=Path, default=LITGPT_PY)
    p.add_argument("--runs", default="litgpt,qkv-muon,qkv-adamw")
    p.add_argument("--litgpt-compile", action="store_true", help="keep litgpt's torch.compile (see above)")
    p.add_argument("--batch", type=int, default=B)
    p.add_argument("--context", type=int, default=T)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--eval-batches", type=int, default=EVAL_BATCHES)
    p.add_argument("--from-traces", action="store_true", help="no runs: report and plot the last invocation's traces")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    targets = [float(t) for t in args.target.split(",") if t.strip()]
    B, T, WARMUP, EVAL_BATCHES = args.batch, args.context, args.warmup, args.eval_batches
    shape = ["--batch", str(B), "--context", str(T), "--warmup", str(WARMUP), "--eval-batches", str(EVAL_BATCHES)]
    if args.worker:  # one qkv run in this fresh process
        print("TRACE " + json.dumps(run_qkv(args.worker, args.steps, args.eval_every, CACHE / f"run-{args.worker}")))
        return

    traces = json.loads((CACHE / "traces.json").read_text()) if args.from_traces else run_all(args, shape)

    for target in targets:
        base = time_to(traces.get("litgpt", []), target)
        print(f"\ntime to val loss {target} (training seconds; ratio to litgpt):")
        for name, trace in traces.items():
            t = time_to(trace, target)
            ratio = f"{t / base:.2f}x" if t is not None and base else "-"
            best = min(r["val_loss"] for r in trace)
            print(f"  {name:10s} {'not reached' if t is None else f'{t:7.1f} s'}  {ratio:>6s}  best val {best:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, trace in traces.items():
        ax.plot([r["seconds"] for r in trace], [r["val_loss"] for r in trace], marker=".", label=name)
    for i, target in enumerate(targets):
        ax.axhline(target, color="grey", ls="--", lw=0.8, label="targets" if i == 0 else None)
    ax.set_xlabel("training wall time (s, evals excluded; 2 shared CPU cores)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"GPT-2-style {L}x{D}, Shakespeare BPE {VOCAB}, batch {B}x{T}")
    ax.set_ylim(top=min(7.2, max(r["val_loss"] for t in traces.values() for r in t) + 0.1))
    ax.legend()
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=110)
    print(f"plot: {IMG}")


if __name__ == "__main__":
    main()
