"""The measurements behind `qkv serve`'s --max-num-seqs and --max-batch-tokens defaults.

In-process, on one GGUF file with 2 threads, through the serving Engine:
  1. decode throughput by batch size: B requests decoding together, tokens/s and ms per
     step (where tokens/s stops growing, more sequences per step only add latency);
  2. the cost of a prefill chunk in a decode step: 16 requests decoding while one long
     prompt is prefilled in chunks of the step budget; ms per step and the decoders' worst
     inter-token gap, by budget (a budget's chunk is what each decode step can wait for).

    python benchmarks/bench_serve_defaults.py ~/.cache/qkv-bench/smollm2-135m-instruct-q8_0.gguf
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def decode_rate(model, tok, batch: int, tokens: int = 32) -> tuple[float, float]:
    """(tokens/s, ms per step) of `batch` requests decoding together, after their prefill."""
    engine = Engine(model, tok, max_num_seqs=batch, max_batch_tokens=4096)
    for i in range(batch):
        engine.add_request(tok.encode(f"request {i}: the quick brown fox"), SamplingParams(max_tokens=tokens, **GREEDY))
    engine.step()  # every prefill, in one step
    steps, t0, made = 0, time.perf_counter(), 0
    while engine.has_unfinished():
        made += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    wall = time.perf_counter() - t0
    return made / wall, 1000 * wall / steps


def prefill_stall(model, tok, budget: int, decoders: int = 16, prompt_tokens: int = 1024) -> tuple[float, float]:
    """(mean ms per step, worst ms per step) while `decoders` requests decode and one prompt of
    `prompt_tokens` is prefilled in chunks under a step budget of `budget` tokens."""
    engine = Engine(model, tok, max_num_seqs=decoders + 1, max_batch_tokens=max(budget, decoders + 1))
    for i in range(decoders):
        engine.add_request(tok.encode(f"request {i}: the quick brown fox"), SamplingParams(max_tokens=512, **GREEDY))
    engine.step()  # the decoders' prompts, in one step
    prompt_tokens = min(prompt_tokens, engine.max_len - 2)
    long_prompt = (tok.encode(" the quick brown fox jumps over the lazy dog") * prompt_tokens)[:prompt_tokens]
    engine.add_request(long_prompt, SamplingParams(max_tokens=1, **GREEDY))
    times = []
    while len(engine.requests) > decoders:  # until the long prompt is in and its one token out
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return 1000 * sum(times) / len(times), 1000 * max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8,16,32,64")
    ap.add_argument("--budgets", default="64,128,256,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_for_serving(args.gguf)
    decode_rate(model, tok, 2, 4)  # warm-up
    print(f"{args.gguf}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}\n")
    print("| sequences decoding together | tokens/s | ms per step |\n|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        rate, ms = decode_rate(model, tok, b)
        print(f"| {b} | {rate:.0f} | {ms:.1f} |", flush=True)
    print("\n| --max-batch-tokens | ms per step while a 1024-token prompt prefills beside 16 decoders | worst step |")
    print("|---|---|---|")
    for budget in (int(x) for x in args.budgets.split(",")):
        mean, worst = prefill_stall(model, tok, budget)
        print(f"| {budget} | {mean:.1f} | {worst:.1f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
