"""Where each millisecond of a `qkv serve` engine step goes, by stage, from py-spy samples.

Starts `qkv serve` on a GGUF file (2 threads), runs bench_serve.py's greedy workload (32
requests, prompts of 8-64 words, 64 tokens, ignore_eos) at 16 clients and at 1 client while
`py-spy record --threads --idle` samples every Python thread, and reads the server's own
/metrics (steps, time inside steps) before and after each level. Each thread's samples are
sorted into stages by the innermost frame that names one (the rules are STAGES below) and
turned into milliseconds per engine step: a thread's share of samples in a stage times the
level's wall time over its steps. First, the time to first token the same way: the same
requests one at a time, each asking for one token, so each thread's samples split a request's
whole time by stage, beside the same prompts' first token through the engine in-process.

    python benchmarks/profile_serve.py ~/.cache/qkv-bench/smollm2-135m-instruct-q8_0.gguf
    python benchmarks/profile_serve.py FILE.gguf --first-token   # only the time-to-first-token part

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
    # model compute, split: the weight products (native fp32 or quantized kernels: a prefill's rows,
    # the logits), the paged cache's attention (it lives in paged.py beside the block allocator),
    # the fused decode blocks (one C call per block) and the rest of the model's forward
    ("engine", "forward: linears", r"\(qkv/kernels/(quant_linear|cpu_linear)\.py|^(QuantLinear|NativeLinear)\."),
    ("engine", "forward: attention", r"^PagedKVCache\.|^Attention\.forward \("),
    ("engine", "forward: fused decode blocks", r"\(qkv/infer/fused_decode\.py"),
    ("engine", "forward: other", r"^Engine\._(forward|score_prompt) \("),
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


def start_py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling every thread of the server (idle ones too) into `out`, once attached."""
    spy = subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--threads", "--idle", "--nonblocking"]
        + ["--rate", "200", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    return spy


def profile_level(url: str, name: str, pid: int, items: list[dict], clients: int, out: Path) -> dict:
    before = httpx.get(url + "/metrics").text
    spy = start_py_spy(pid, out)
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


def profile_first_token(url: str, name: str, pid: int, items: list[dict], out: Path) -> dict:
    """One client, each request asking for one token, so a request's whole time is its time to
    first token: the py-spy samples of that level are each thread's milliseconds per request."""
    first = [dict(it, max_tokens=1) for it in items]
    before = httpx.get(url + "/metrics").text
    spy = start_py_spy(pid, out)
    results, wall = asyncio.run(run_level(url, name, first, 1))
    spy.send_signal(2)
    spy.wait(30)
    after = httpx.get(url + "/metrics").text
    ok = sorted(r.ttft for r in results if r.ok)
    in_step = metric(after, "qkv_engine_step_seconds") - metric(before, "qkv_engine_step_seconds")
    return dict(
        requests=len(first),
        failed=len(first) - len(ok),
        wall=wall,
        ttft_p50=1000 * ok[len(ok) // 2] if ok else float("nan"),
        ttft_mean=1000 * sum(ok) / len(ok) if ok else float("nan"),
        ms_in_step=1000 * in_step / len(first),
        samples=read_raw(out),
    )


def in_process_first_token(path: str, items: list[dict], threads: int) -> float:
    """Median ms from add_request to the first token through Engine.step in this process (no HTTP)."""
    import torch

    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    model, tok = load_for_serving(path)
    engine = Engine(model, tok, max_num_seqs=16)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([tok.encode(items[0]["prompt"])], params)
    times = []
    for it in items:
        ids = tok.encode(it["prompt"], add_special=True)
        t0 = time.perf_counter()
        engine.add_request(ids, params)
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def stage_rows(level: dict, unit: str, unit_ms: float, fmt: str) -> list[str]:
    """The markdown rows of each thread's py-spy samples by stage: its share of the thread's
    samples, and that share of `unit_ms` (the time of one request or one step)."""
    rows = ["| thread | stage | share of the thread's samples | " + unit + " |", "|---|---|---|---|"]
    for kind in ("engine", "main", "worker"):
        counts = level["samples"].get(kind)
        if not counts:
            continue
        total = sum(counts.values())
        for stage, n in counts.most_common():
            rows.append(f"| {kind} | {stage} | {100 * n / total:.1f}% | {unit_ms * n / total:{fmt}} |")
    return rows


def report_first_token(level: dict, in_process_ms: float) -> str:
    per = level["wall"] / level["requests"]
    lines = [
        f"### time to first token, 1 client, {level['requests']} requests of one token ({level['failed']} failed): "
        f"p50 {level['ttft_p50']:.1f} ms, mean {level['ttft_mean']:.1f} ms at the client; "
        f"{level['ms_in_step']:.1f} ms per request inside engine.step(); "
        f"in-process add_request to first token (no HTTP): p50 {in_process_ms:.1f} ms",
        "",
    ]
    return "\n".join(lines + stage_rows(level, "ms per request", 1000 * per, ".1f"))


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
    ]
    return "\n".join(lines + stage_rows(level, "ms per step", ms, ".2f"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="the GGUF file to serve")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="16,1")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--keep", default=None, help="keep py-spy's raw samples in this directory")
    ap.add_argument(
        "--first-token", action="store_true", help="only the time-to-first-token breakdown (1 client, 1 token each)"
    )
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
            first = profile_first_token(url, "m", proc.pid, items, keep / "first.txt")
            for c in [] if args.first_token else levels:
                measured.append(profile_level(url, "m", proc.pid, items, c, keep / f"c{c}.txt"))
    finally:
        stop(proc)
    print(f"{args.gguf}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}\n")
    print(report_first_token(first, in_process_first_token(args.gguf, items, args.threads)) + "\n", flush=True)
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
