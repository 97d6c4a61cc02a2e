"""Shared helpers for benchmarks: machine ceilings measured in the same run, and timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_description() -> str:
    """The CPU a figure came from: its model name, core count and the SIMD features qkv's
    kernels and bf16 matmuls choose paths by (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return f"{name}, {os.cpu_count()} cores, " + (" ".join(f for f in wanted if f in flags) or "no AVX2")


def matmul_ceiling(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """Sustained FLOP/s of one large square matmul: the machine's compute ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def memory_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times)


def time_interleaved(fns: dict, reps: int = 5, warmup: int = 1, stat=statistics.median) -> dict[str, float]:
    """Seconds per call for each fn (the median of `reps`, or `stat` of them), alternating
    between them each repetition so that the shared machine's noise hits every contender
    alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return {k: stat(v) for k, v in samples.items()}


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in cols[1:]])
