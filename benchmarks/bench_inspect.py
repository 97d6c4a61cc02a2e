"""Cost of inspecting vs a plain forward, measured side by side in one run.

plain forward (fused attention)  vs  capture_attention (math path, every layer's probabilities
kept)  vs  logit lens (residual of every block through norm + unembedding)  vs  routing.
Also the machine's matmul ceiling measured in the same run, to place the plain forward.

    python benchmarks/bench_inspect.py [--model smollm2] [--tokens 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def best_of(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", help="preset (random weights) or 'smollm2'")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qkv.commands.inspect import load_any
    from qkv.inspect.attention import capture_attention, classify_heads
    from qkv.inspect.logit_lens import lens_logits

    model, _, cfg, note = load_any(args.model)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = best_of(lambda: a @ b, args.reps)
    with torch.no_grad():
        t_plain = best_of(lambda: model(ids), args.reps)
    t_att = best_of(lambda: capture_attention(model, ids[0]), args.reps)
    t_lens = best_of(lambda: lens_logits(model, ids[0]), args.reps)
    t_cls = best_of(lambda: classify_heads(model, seg_len=args.tokens // 2, batch=1), 1)
    print(f"{note}, {args.tokens} tokens, {args.threads} thread(s), best of {args.reps}")
    print(f"machine ceiling: {2 * n**3 / t_mm / 1e9:.1f} GFLOP/s (fp32 {n}x{n} matmul)")
    print(f"{'what':<40} {'ms':>9} {'x plain':>8}")
    for name, t in (
        ("plain forward (fused attention)", t_plain),
        ("capture_attention (all layers, probs)", t_att),
        ("logit lens (all layers)", t_lens),
        ("classify_heads (probe, batch 1)", t_cls),
    ):
        print(f"{name:<40} {t * 1e3:9.1f} {t / t_plain:8.2f}")


if __name__ == "__main__":
    main()
