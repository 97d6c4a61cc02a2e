"""A decode step on the thread that set the model up vs on a second thread, and the fix.

`qkv serve` steps its engine on a thread of its own. Every thread that runs a parallel op
keeps an OpenMP team (libgomp, shared by torch and the native kernels); once the process
holds more OpenMP threads than CPUs, libgomp stops spin-waiting between parallel regions, so
a step's many small products each wait for a wake-up. `qkv serve` therefore sets the model up
on a thread that exits before serving (`on_passing_thread`). This times, in one process per
set-up, greedy 64-token decodes and first tokens (bench_serve.py's prompts, prefix caching
off) on the main thread and on a fresh worker thread, alternately:

    python benchmarks/bench_serve_engine_thread.py MODEL.gguf                    # both set-ups, each in its own process
    python benchmarks/bench_serve_engine_thread.py MODEL.gguf --set-up passing   # one set-up, this process

With `--set-up passing` only the worker is timed: a parallel op on the main thread would
start the second team this avoids.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams
from qkv.serve.async_engine import on_passing_thread

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import greedy_workload  # noqa: E402 (after the sys.path line above)


def on_worker(fn) -> None:
    t = threading.Thread(target=fn)  # a thread that lives as long as its timing, like the engine's
    t.start()
    t.join()


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)

    def build() -> tuple[Engine, object]:
        model, tok = load_for_serving(args.model)
        return Engine(model, tok, max_num_seqs=16, prefix_caching=False), tok

    engine, tok = on_passing_thread(build) if args.set_up == "passing" else build()
    prompts = [tok.encode(it["prompt"], add_special=True) for it in greedy_workload(args.requests)]
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    decode = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    times: dict[str, dict[str, list[float]]] = {"main": {"ttft": [], "tpot": []}, "worker": {"ttft": [], "tpot": []}}

    def one(where: str) -> None:
        for ids in prompts:
            t0 = time.perf_counter()
            engine.add_request(ids, first)
            while engine.has_unfinished():
                engine.step()
            times[where]["ttft"].append(1000 * (time.perf_counter() - t0))
        engine.add_request(prompts[0], decode)
        engine.step()  # the prefill and first token
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        times[where]["tpot"].append(1000 * (time.perf_counter() - t0) / steps)

    on_worker(lambda: one("worker"))  # warm-up
    times["worker"] = {"ttft": [], "tpot": []}
    for _ in range(args.rounds):
        if args.set_up == "main":
            one("main")
        on_worker(lambda: one("worker"))
    for where, t in times.items():
        if t["tpot"]:
            rounds = ", ".join(f"{x:.1f}" for x in t["tpot"])
            print(
                f"set up on {args.set_up:>7}, stepped on {where:>6}: decode {statistics.median(t['tpot']):.1f} "
                f"ms/token (rounds {rounds}), first token p50 {statistics.median(t['ttft']):.1f} ms",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=12, help="prompts timed for the first token, per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set-up", choices=["main", "passing"], default=None, help="default: each, in its own process")
    args = ap.parse_args()
    print(f"{args.model}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.set_up:
        measure(args)
        return
    for set_up in ("main", "passing"):
        cmd = [sys.executable, __file__, args.model, "--set-up", set_up, "--threads", str(args.threads)]
        cmd += ["--requests", str(args.requests), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print("\n".join(line for line in out.splitlines() if line.startswith("set up")), flush=True)


if __name__ == "__main__":
    main()
