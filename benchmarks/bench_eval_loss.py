"""Evaluation loss (torch.no_grad) cost: qkv's fused linear + cross-entropy vs plain cross-entropy.

Three contenders on the same final hidden states and targets, timed in turn in one run
(the transformer body is run once, outside the timing; it costs the same for all):
- plain: F.cross_entropy(model.head(h), y), logits materialised;
- fused, loss only: fused_linear_cross_entropy, which under no_grad takes the forward-only path;
- fused, gradients built: the autograd function called directly, which builds the h and W
  gradients even under no_grad (what the loss did before it checked for a backward).
Then the whole evaluation step, model.loss(x, y) vs plain, for the share of it in a step.

    python benchmarks/bench_eval_loss.py [--preset tiny] [--batch 8] [--seq 256] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import table, time_interleaved
from qkv.config import preset
from qkv.model import build_model
from qkv.model.loss import _FusedLinearCrossEntropy, fused_linear_cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, max_seq_len=max(args.seq, 16))
    model = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    with torch.no_grad():
        h = model.hidden(x)
    w = model.output_weight
    chunk = max(1, 2**25 // w.shape[0])
    head = {
        "plain cross-entropy": lambda: F.cross_entropy(model.head(h).flatten(0, 1).float(), y.flatten()),
        "fused, loss only": lambda: fused_linear_cross_entropy(h, w, y),
        "fused, gradients built": lambda: _FusedLinearCrossEntropy.apply(h.flatten(0, 1), w, y.flatten(), -100, chunk),
    }
    step = {
        "plain cross-entropy": lambda: F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()),
        "fused, loss only": lambda: model.loss(x, y),
    }
    print(
        f"{args.preset}: vocab {cfg.vocab_size}, d_model {cfg.d_model}, {args.batch}x{args.seq} tokens, "
        f"{args.threads} thread(s), torch.no_grad, best of {args.reps}"
    )
    for title, fns in (("loss from hidden states", head), ("whole eval step", step)):
        with torch.no_grad():
            losses = {k: fn().item() for k, fn in fns.items()}
            assert max(losses.values()) - min(losses.values()) < 1e-3 * max(losses.values()), losses
            times = time_interleaved(fns, reps=args.reps, stat=min)
        base = times["plain cross-entropy"]
        rows = [[k, f"{t * 1e3:.1f}", f"{t / base:.2f}"] for k, t in times.items()]
        print(table(rows, [title, "ms", "x plain"]))


if __name__ == "__main__":
    main()
