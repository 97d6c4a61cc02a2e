"""Plot a run's metrics.jsonl: loss curves (train and val), bits per byte, learning rate, tokens/s as PNG files.

Writes RUN/loss.png (train + val loss and val bits/byte) and RUN/lr.png (learning rate and
throughput) unless --out is given.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output folder for the PNGs; None: the run dir")


def plot_run(run_dir, out_dir=None) -> list:
    import io
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qkv.io import atomic_write_bytes

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a training run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no metrics yet; train for at least log_every steps")
    out = Path(out_dir or run_dir)

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        return out / name

    written = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(*series("loss"), label="train")
    if series("val_loss")[0]:
        a1.plot(*series("val_loss"), "o-", label="val")
    a1.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss: {run_dir.name}")
    a1.legend()
    a1.grid(alpha=0.3)
    if series("val_bpb")[0]:
        a2.plot(*series("val_bpb"), "o-", color="C1")
    a2.set(xlabel="step", ylabel="bits per byte", title="val bits per byte")
    a2.grid(alpha=0.3)
    written.append(save(fig, "loss.png"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(*series("lr"))
    a1.set(xlabel="step", ylabel="learning rate", title="schedule")
    a1.grid(alpha=0.3)
    a2.plot(*series("tokens_per_s"))
    a2.set(xlabel="step", ylabel="tokens/s", title="throughput")
    a2.grid(alpha=0.3)
    written.append(save(fig, "lr.png"))
    return written


def run(args: argparse.Namespace) -> int:
    for p in plot_run(args.run, args.out):
        print(p)
    return 0
