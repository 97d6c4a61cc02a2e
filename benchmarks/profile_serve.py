"""Where each millisecond of a `qkv serve` engine step goes, by stage, from py-spy samples.

Starts `qkv serve` on a GGUF file (2 threads), runs bench_serve.py's greedy workload (32
requests, prompts of 8-64 words, 64 tokens, ignore_eos) at 16 clients and at 1 client while
`py-spy record --threads --idle` samples every Python thread, and reads the server's own
/metrics (steps, time inside steps) before and after each level. Each thread's samples are
sorted into stages by the innermost frame that names one (the rules are STAGES below) and
turned into milliseconds per engine step: a thread's share of samples in a stage times the
level's wall time over its steps.

    python benchmarks/profile_serve.py ~/.cache/qkv-bench/smollm2-135m-instruct-q8_0.gguf

py-spy samples wall time: a frame waiting for the GIL or for a CPU counts where it waits
(a torch op that waits to re-take the GIL shows as "forward"). The in-process row (the
same requests through `Engine.generate`, no HTTP) is the step time with no server around it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import greedy_workload, run_level, start_server, stop  # noqa: E402 (after the sys.path line above)

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

# (thread, stage, pattern on py-spy's "Class.function (path:line)"): a sample's stage is named by
# its innermost frame that matches one of its thread's patterns
STAGES = [
    ("engine", "forward (model compute)", r"^Engine\._(forward|score_prompt) \("),
    ("engine", "scheduling + KV blocks", r"\(qkv/infer/(scheduler|paged)\.py"),
    ("engine", "detokenize + stop strings", r"\(qkv/infer/(detokenize|stop_strings)\.py|^Engine\._output \("),
    ("engine", "sampling", r"^Engine\._(sample_and_emit|sample|append|apply_grammar|finish) \("),
    ("engine", "step bookkeeping", r"^Engine\.step \("),
    ("engine", "hand-off to asyncio", r"^AsyncEngine\._(dispatch|deliver|resolve) \("),
    ("engine", "stats for /metrics", r"^AsyncEngine\._update_stats \("),
    ("engine", "waiting for requests", r"^AsyncEngine\.(_loop|_handle) \("),
    ("main", "idle (epoll wait)", r"select \(selectors\.py"),
    ("main", "SSE/JSON framing", r"\(qkv/serve/responses\.py"),
    ("main", "hand-off from the engine", r"\(qkv/serve/async_engine\.py|\(asyncio/queues\.py"),
    ("main", "request parsing + validation", r"\(qkv/serve/(app|protocol|guard)\.py|\(pydantic"),
    ("main", "HTTP (uvicorn, starlette)", r"\((uvicorn|starlette|h11|httptools|fastapi|anyio)/"),
    ("main", "asyncio loop", r"\(asyncio/"),
    ("worker", "idle", r"^Condition\.wait \("),
    ("worker", "tokenizing", r"\(qkv/|\(tokenizers/"),
]


PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def thread_kind(name: str) -> str:
    if "qkv-engine" in name:
        return "engine"
    if "MainThread" in name or "process " in name:
        return "main"
    return "worker"


def classify(stack: list[str], kind: str) -> str:
    rules = [(stage, pattern) for k, stage, pattern in STAGES if k == kind]
    for frame in reversed(stack):  # innermost first
        for stage, pattern in rules:
            if re.search(pattern, frame):
                return stage
    return "other"


def read_raw(path: Path) -> dict[str, Counter]:
    """py-spy's raw (collapsed) output: 'thread;frame;frame... count' per line."""
    by_kind: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        frames = stack_text.split(";")
        kind = thread_kind(frames[0])  # "thread (tid): name"
        by_kind.setdefault(kind, Counter())[classify(frames[1:], kind)] += int(count)
    return by_kind


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:_total)?{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def profile_level(url: str, name: str, pid: int, items: list[dict], clients: int, out: Path) -> dict:
    before = httpx.get(url + "/metrics").text
    spy = subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--threads", "--idle", "--nonblocking"]
        + ["--rate", "200", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    results, wall = asyncio.run(run_level(url, name, items, clients))
    spy.send_signal(2)
    spy.wait(30)
    after = httpx.get(url + "/metrics").text
    tokens = sum(r.tokens for r in results if r.ok)
    steps = metric(after, "qkv_engine_steps") - metric(before, "qkv_engine_steps")
    rows = metric(after, "qkv_engine_step_rows") - metric(before, "qkv_engine_step_rows")
    in_step = metric(after, "qkv_engine_step_seconds") - metric(before, "qkv_engine_step_seconds")
    if steps != steps and clients == 1:  # a server without step counters: one token per step at 1 client
        steps, rows = tokens, tokens
    return dict(
        clients=clients,
        wall=wall,
        steps=steps,
        rows_per_step=rows / steps,
        tok_s=tokens / wall,
        ms_per_step=1000 * wall / steps,
        ms_in_step=1000 * in_step / steps,
        samples=read_raw(out),
    )


def in_process(path: str, items: list[dict], clients: int, threads: int) -> dict:
    """The same requests through Engine.generate, `clients` at a time: ms per step, no HTTP."""
    import torch

    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    model, tok = load_for_serving(path)
    engine = Engine(model, tok, max_num_seqs=16)
    prompts = [tok.encode(it["prompt"]) for it in items]
    params = [SamplingParams(max_tokens=it["max_tokens"], temperature=0.0, ignore_eos=True) for it in items]
    engine.generate(prompts[:2], params[:2])
    steps0, t0 = getattr(engine, "steps_total", float("nan")), time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), clients):
        res = engine.generate(prompts[i : i + clients], params[i : i + clients])
        tokens += sum(len(r[0].token_ids) for r in res)
    wall = time.perf_counter() - t0
    steps = getattr(engine, "steps_total", float("nan")) - steps0  # nan: a qkv tree without step counters
    return dict(ms_per_step=1000 * wall / steps, tok_s=tokens / wall)


def report(level: dict) -> str:
    ms = level["ms_per_step"]
    lines = [
        f"### {level['clients']} client(s): {level['tok_s']:.0f} tok/s, {ms:.2f} ms per step "
        f"({level['ms_in_step']:.2f} ms inside engine.step()), {level['rows_per_step']:.1f} rows per step",
        "",
        "| thread | stage | share of the thread's samples | ms per step |",
        "|---|---|---|---|",
    ]
    for kind in ("engine", "main", "worker"):
        counts = level["samples"].get(kind)
        if not counts:
            continue
        total = sum(counts.values())
        for stage, n in counts.most_common():
            lines.append(f"| {kind} | {stage} | {100 * n / total:.1f}% | {ms * n / total:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="the GGUF file to serve")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="16,1")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--keep", default=None, help="keep py-spy's raw samples in this directory")
    args = ap.parse_args()
    from _serve_helpers import free_port

    items = greedy_workload(args.requests)
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.gguf, "m", port, max(levels), args.threads)
    measured = []
    try:
        asyncio.run(run_level(url, "m", greedy_workload(4, seed=1), 4))
        with tempfile.TemporaryDirectory() as tmp:
            keep = Path(args.keep or tmp)
            keep.mkdir(parents=True, exist_ok=True)
            for c in levels:
                measured.append(profile_level(url, "m", proc.pid, items, c, keep / f"c{c}.txt"))
    finally:
        stop(proc)
    print(f"{args.gguf}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}\n")
    for level in measured:
        print(report(level) + "\n", flush=True)
    for level in measured:
        ceiling = in_process(args.gguf, items, level["clients"], args.threads)
        print(
            f"in-process Engine.generate, {level['clients']} at a time: {ceiling['ms_per_step']:.2f} ms per step, "
            f"{ceiling['tok_s']:.0f} tok/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
