"""qkv's native CPU kernels (qkv.kernels) beside PyTorch's ops and the machine's ceilings,
all measured in this run, fp32:

1. linear: y = x W^T for 1-64 rows (a decode step's products) on llama-100m's shapes,
   native vs F.linear (MKL): weight bytes read per second and FLOP/s, beside the read
   bandwidth and the large-matmul FLOP/s; on an AVX-512 CPU also the kernel's AVX2 path.
2. decode attention over the paged cache (64 sequences): the native kernel reading blocks
   in place vs gathering blocks into a padded batch + SDPA (the cache's fallback path).
3. one decode step of llama-100m: the fused block (one native call per block) vs the
   model's op-by-op forward with the native ops vs PyTorch ops only.

    python benchmarks/bench_kernels.py [--threads 2] [--rows 1,2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import matmul_ceiling, table, time_interleaved
from qkv.config import preset
from qkv.infer import fused_decode
from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import KVCache
from qkv.infer.paged import PagedKVCache
from qkv.kernels import cpu_linear, linear, native
from qkv.model import build_model


def read_ceiling() -> tuple[float, callable]:
    big = torch.ones(512 * 2**20 // 4)
    return big.nbytes, big.sum


def bench_linear(rows_list: list[int], reps: int, compare_avx2: bool) -> list[list]:
    """Each sample runs the product over `copies` distinct matrices of one shape (like the
    layers of a model: 72+ MB, so every weight comes from memory, as in decode).
    `compare_avx2` adds the kernel's AVX2 path (on a CPU whose best path is AVX-512)."""
    nbytes, read = read_ceiling()
    out = []
    for n_out, n_in, copies, what in (
        (2048, 768, 12, "MLP up (2048x768) x 12"),
        (768, 2048, 12, "MLP down (768x2048) x 12"),
        (32000, 768, 2, "LM head (32000x768) x 2"),
    ):
        ws = [torch.randn(n_out, n_in) for _ in range(copies)]
        w_bytes = sum(w.nbytes for w in ws)
        for rows in rows_list:
            x = torch.randn(rows, n_in)

            def avx2(x=x, ws=ws):
                with cpu_linear.pinned_simd_path("avx2"):
                    return [linear(x, w) for w in ws]

            paths = {
                "native": lambda x=x, ws=ws: [linear(x, w) for w in ws],
                "mkl": lambda x=x, ws=ws: [F.linear(x, w) for w in ws],
                "read": read,
            }
            if compare_avx2:
                paths["avx2"] = avx2
            with torch.inference_mode():
                t = time_interleaved(paths, reps)
            bw = nbytes / t["read"]
            flop = 2 * rows * n_out * n_in * copies
            out.append(
                [
                    what,
                    rows,
                    f"{w_bytes / t['native'] / 1e9:.1f}",
                    f"{w_bytes / t['mkl'] / 1e9:.1f}",
                    f"{bw / 1e9:.1f}",
                    f"{flop / t['native'] / 1e9:.0f}",
                ]
                + ([f"{flop / t['avx2'] / 1e9:.0f}"] if compare_avx2 else [])
                + [
                    f"{flop / t['mkl'] / 1e9:.0f}",
                    f"{t['mkl'] / t['native']:.2f}x",
                ]
            )
    return out


def bench_attention(contexts: list[int], reps: int) -> list[list]:
    cfg = preset("llama-100m")
    out = []
    for ctx in contexts:
        B, bs = 64, 16
        nblk = -(-(ctx + 1) // bs)
        cache = PagedKVCache(cfg, num_blocks=B * nblk, block_size=bs)
        cache.k.normal_()
        cache.v.normal_()
        tables = torch.randperm(B * nblk).view(B, nblk)  # scattered, as after many requests
        start = torch.full((B,), ctx)
        cache.prepare(tables, start, torch.ones(B, dtype=torch.long), 1)
        q = torch.randn(B, cfg.n_head, 1, cfg.head_dim)
        k = v = torch.randn(B, cfg.n_kv_head, 1, cfg.head_dim)

        def native_attend(cache=cache, q=q, k=k, v=v):
            return cache.attend(0, q, k, v, 0.125)

        def gather_sdpa(cache=cache, q=q, k=k, v=v):
            with native.disabled():
                cache.buckets = None
                return cache.attend(0, q, k, v, 0.125)

        with torch.inference_mode():
            t = time_interleaved({"native": native_attend, "gather": gather_sdpa}, reps)
            torch.testing.assert_close(native_attend(), gather_sdpa(), atol=1e-4, rtol=1e-4)
        kv_bytes = 2 * B * (ctx + 1) * cfg.n_kv_head * cfg.head_dim * 4
        out.append(
            [
                f"{B} x {ctx + 1}",
                f"{kv_bytes / 2**20:.0f} MiB",
                f"{t['native'] * 1e3:.2f}",
                f"{t['gather'] * 1e3:.2f}",
                f"{kv_bytes / t['native'] / 1e9:.1f}",
                f"{t['gather'] / t['native']:.2f}x",
            ]
        )
    return out


def bench_step(reps: int) -> list[list]:
    m = build_model(preset("llama-100m")).eval()
    weights = sum(p.numel() * 4 for p in m.parameters())
    cache = KVCache(m.cfg, 200)
    tok = torch.tensor([[5]])
    forward_step(m, cache, torch.tensor([list(range(64))]))
    nbytes, read = read_ceiling()

    def step():
        forward_step(m, cache, tok)
        cache.pos = 64

    def op_by_op():
        with torch.inference_mode():
            h = m.hidden(tok, positions=torch.tensor([64]), cache=cache)
            m.head(h)
        cache.pos = 64

    def pytorch_ops():
        with native.disabled():
            op_by_op()

    assert fused_decode.supports(m)
    t = time_interleaved({"fused": step, "ops": op_by_op, "torch": pytorch_ops, "read": read}, reps)
    bw = nbytes / t["read"]
    return [
        [
            label,
            f"{t[k] * 1e3:.1f}",
            f"{weights / t[k] / 1e9:.1f}",
            f"{weights / t[k] / bw:.0%}",
            f"{t['torch'] / t[k]:.2f}x",
        ]
        for label, k in (
            ("fused block (one native call per block)", "fused"),
            ("op by op, native linear/attention/norm/RoPE", "ops"),
            ("op by op, PyTorch ops only", "torch"),
        )
    ] + [["(read bandwidth)", "", f"{bw / 1e9:.1f}", "100%", ""]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="123", help="which parts to run")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64", help="part 1's row counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.enabled():
        sys.exit("native kernels are off here (QKV_NATIVE=0, or no AVX2/FMA CPU)")
    reps = 3 if args.quick else 7
    print(f"threads={args.threads}  fp32 matmul ceiling (2048^3) = {matmul_ceiling() / 1e9:.0f} GFLOP/s\n")
    if "1" in args.parts:
        path = cpu_linear.simd_path()
        print(f"## 1. linear, native ({path} path) vs PyTorch (MKL), median of", reps)
        rows = [1, 4] if args.quick else [int(r) for r in args.rows.split(",")]
        avx2 = path == "avx512"
        print(
            table(
                bench_linear(rows, reps, compare_avx2=avx2),
                ["matrices", "rows", "native GB/s", "MKL GB/s", "read GB/s", "native GFLOP/s"]
                + (["native AVX2 path GFLOP/s"] if avx2 else [])
                + ["MKL GFLOP/s", "native / MKL"],
            )
        )
    if "2" in args.parts:
        print("\n## 2. decode attention over the paged cache (llama-100m heads 12/4, head_dim 64, blocks of 16)")
        print(
            table(
                bench_attention([128] if args.quick else [128, 512], reps),
                ["sequences x keys", "K/V read", "native ms", "gather+SDPA ms", "native GB/s", "speedup"],
            )
        )
    if "3" in args.parts:
        print("\n## 3. one decode step of llama-100m at context 64 (weights read per second vs the read bandwidth)")
        print(table(bench_step(reps), ["path", "ms/step", "GB/s", "of bandwidth", "vs PyTorch ops"]))


if __name__ == "__main__":
    main()
