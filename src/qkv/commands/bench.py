"""Measure prompt processing (pp) and decode (tg) tokens/s of a model, as llama-bench does.

pp<p>: one prompt of p tokens in one forward; tg<n>: n greedy decode steps after a
one-token prompt, timed alone. Each is the best of --reps runs. Beside each decode figure:
the bytes a step reads and the roofline (memory bandwidth measured in this run / bytes
per token), so a figure says how close to the machine's limit it is.
"""

from __future__ import annotations

import argparse

from qkv.commands._weights import add_dtype_argument, add_kv_dtype_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="qkv checkpoint dir, Hugging Face dir, GGUF file or bundled name")
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens for the pp test (0 skips it)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="decode steps for the tg test (0 skips it)")
    p.add_argument(
        "-d", "--depth", type=int, default=0, help="tokens already in the KV cache before the tg test (llama-bench -d)"
    )
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions of each test; the best is reported")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads; None: torch's own choice")
    p.add_argument(
        "--backend", choices=["native", "torch"], default=None, help="inference backend; None: native where possible"
    )
    add_dtype_argument(p)
    add_kv_dtype_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from qkv.infer import speed
    from qkv.infer.backend import backend_of, prepare_for_inference
    from qkv.infer.kv_quant import kv_dtype
    from qkv.interop.load import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("n_prompt", "n_gen", "reps", "depth"):
        if getattr(args, name) < 0 or (name == "reps" and args.reps < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    model, _ = load_for_inference(args.model, args.dtype)
    model = prepare_for_inference(model.eval(), args.backend)
    if args.n_prompt + 1 > model.cfg.max_seq_len or args.depth + args.n_gen + 1 > model.cfg.max_seq_len:
        raise ValueError(f"-p and -d + -n must stay below the model's context of {model.cfg.max_seq_len} tokens")
    cache_dtype = kv_dtype(args.kv_dtype, next(model.parameters()).dtype)
    bandwidth = speed.read_bandwidth()
    results = []
    if args.n_prompt:
        results.append(speed.prompt_speed(model, args.n_prompt, args.reps, kv_dtype=cache_dtype))
    if args.n_gen:
        results.append(speed.decode_speed(model, args.n_gen, args.reps, depth=args.depth, kv_dtype=cache_dtype))
    per_token = speed.decode_bytes_per_token(model, args.depth + args.n_gen // 2, cache_dtype)
    rows = []
    for r in results:
        row = {
            "model": os.path.basename(str(args.model).rstrip("/")),
            "backend": backend_of(model),
            "weights": args.dtype,
            "kv_dtype": str(cache_dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "test": r.test,
            "tokens_per_s": round(r.tokens_per_s, 2),
            "stdev": round(r.stdev, 2),
        }
        if r.test.startswith("tg"):
            ceiling = bandwidth / per_token
            row |= {
                "bytes_per_token": per_token,
                "bandwidth_gb_s": round(bandwidth / 1e9, 2),
                "roofline_tokens_per_s": round(ceiling, 1),
                "roofline_fraction": round(r.tokens_per_s / ceiling, 3),
            }
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| model | backend | threads | test | t/s | of roofline |\n|---|---|---|---|---|---|")
    for row in rows:
        roof = f"{row['roofline_fraction']:.0%} of {row['roofline_tokens_per_s']}" if "roofline_fraction" in row else ""
        print(
            f"| {row['model']} | {row['backend']} | {row['threads']} | {row['test']} | "
            f"{row['tokens_per_s']:.2f} ± {row['stdev']:.2f} | {roof} |"
        )
    print(
        f"decode reads {per_token / 1e6:.1f} MB per token (weights + K/V in {cache_dtype} at the depth plus half "
        "the tg steps); "
        f"read bandwidth in this run: {bandwidth / 1e9:.1f} GB/s"
    )
    return 0
