"""The engine's first-token step on the main thread vs on a fresh worker thread, interleaved.

`qkv serve` runs the engine on a thread of its own; `qkv generate`, `qkv chat`, `qkv bench` and
the in-process rows of bench_serve.py / profile_serve.py run it on the main thread. This times
the same prompts (bench_serve.py's, 8-64 words; one token each, prefix caching off so the
second run of a prompt computes it all again) alternately on the two, in one process.

    python benchmarks/bench_serve_engine_thread.py ~/.cache/qkv-bench/smollm2-135m-instruct-q8_0.gguf
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import greedy_workload  # noqa: E402 (after the sys.path line above)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_for_serving(args.model)
    engine = Engine(model, tok, max_num_seqs=16, prefix_caching=False)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    items = greedy_workload(args.requests)

    def first_token(ids: list[int], times: list[float]) -> None:
        t0 = time.perf_counter()
        engine.add_request(ids, params)
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - t0)

    first_token(tok.encode(items[0]["prompt"]), [])  # warm-up
    main_thread: list[float] = []
    worker: list[float] = []
    for it in items:
        ids = tok.encode(it["prompt"], add_special=True)
        first_token(ids, main_thread)
        t = threading.Thread(target=first_token, args=(ids, worker))
        t.start()
        t.join()

    def p50(xs: list[float]) -> float:
        return 1000 * sorted(xs)[len(xs) // 2]

    print(
        f"{args.model}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}: first token p50 "
        f"main thread {p50(main_thread):.1f} ms, worker thread {p50(worker):.1f} ms, "
        f"ratio {p50(main_thread) / p50(worker):.2f}"
    )


if __name__ == "__main__":
    main()
