"""The native matvec over GGUF blocks (qkv.kernels.quant_linear) beside qkv's fp32 kernel
(qkv.kernels.linear) on SmolLM2-135M's matrix shapes at 1, 2, 4, 16 and 64 rows, and the
machine's read bandwidth, all measured in this run. Q8_0 and Q4_0 run twice: in the file's
layout (label q8_0) and repacked sixteen rows at a time as prepared models hold them (label
q8_0/x16, qkv.quant.repack); --no-repack leaves the second out.

Each sample multiplies x by `copies` distinct matrices of one shape, enough that every
format's weights (even Q4) overflow the last-level cache, so each weight comes from
memory as in decode. Reported: GB/s of weight bytes read, GFLOP/s (2 * rows * n_in * n_out
per matrix) and the speedup over fp32 on the same shape and rows. K-quant weights are
random bytes (gguf cannot quantize to them); the speed does not depend on the values.
K-quants need n_in to be a multiple of 256, so of these shapes they only fit down_proj
(llama.cpp stores SmolLM2's 576-wide matrices as Q5_0 / Q8_0 in its K mixes).

    python benchmarks/bench_quant_kernels.py [--threads 2] [--reps 5] [--paths avx2 avx512]
        [--rows 1 2 4 8 16 32 64] [--formats q8_0 q4_0] [--shapes gate/up_proj down_proj] [--no-repack]

With --models F.gguf ..., instead: each file loaded once and prepared for native inference,
then decode (tg<--n-gen>, batch 1) timed with its Q8_0 / Q4_0 / Q5_0 rows repacked and in the
file's layout alternately (unpacked and repacked in place between samples, untimed), --reps
samples of each; the best of each and their ratio. (`qkv bench` takes QKV_REPACK=0 for the
same A/B across processes.)
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch

from common import table, time_interleaved
from qkv.kernels import linear
from qkv.kernels import quant_linear as ql
from qkv.quant import repack

SHAPES = [  # (n_out, n_in, what) of SmolLM2-135M
    (576, 576, "q/o_proj"),
    (192, 576, "k/v_proj"),
    (1536, 576, "gate/up_proj"),
    (576, 1536, "down_proj"),
    (49152, 576, "lm_head"),
]
FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
CACHE_BYTES = 36 * 2**20  # this machine's L3; each sample reads >= 3x that


def read_ceiling() -> tuple[int, callable]:
    big = torch.ones(512 * 2**20 // 4)
    return big.nbytes, big.sum


def blocks_for(qt: str, w: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    from gguf import quants

    q = ql.qtype_of(qt)
    if q.name.endswith("_K"):
        b = rng.integers(0, 256, (w.shape[0], ql.row_bytes(w.shape[1], q)), dtype=np.uint8)
        return torch.from_numpy(b)  # K speed does not depend on the bytes; fp16 NaN scales would not slow it
    return torch.from_numpy(quants.quantize(w.numpy(), q))


def runner(name: str, x: torch.Tensor, mats: list[torch.Tensor], isa: str | None):
    """x times each matrix: qkv's fp32 kernel, or the quantized one for a GGUF format."""
    if name == "fp32":
        return lambda: [linear(x, m) for m in mats]
    if name.endswith("/x16"):
        code = ql.kernel_type(name.removesuffix("/x16"), repacked=True)
        return lambda: [ql._run(x, m, code, None, isa) for m in mats]
    return lambda: [ql._run(x, m, name, None, isa) for m in mats]


def decode_ab(paths: list[str], n_gen: int, reps: int) -> None:
    """Decode tokens/s of each GGUF file with its rows repacked vs in the file's layout, interleaved."""
    import os

    from qkv.infer import speed
    from qkv.infer.backend import prepare_for_inference
    from qkv.interop.load import load_for_inference
    from qkv.quant.modules import QuantEmbedding, QuantLinear

    out = []
    for path in paths:
        os.environ["QKV_REPACK"] = "1"
        model = prepare_for_inference(load_for_inference(path, "auto")[0].eval(), "native")
        quant = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
        share = sum(m.blocks.nbytes for m in quant if m.repacked) / max(1, sum(m.blocks.nbytes for m in quant))
        best = {"repacked": 0.0, "file layout": 0.0}
        for _ in range(reps):
            for label in best:
                for m in quant:
                    if label == "repacked":
                        m.repack()
                    else:
                        m.unpack()
                rate = speed.decode_speed(model, n_gen, reps=1).tokens_per_s
                best[label] = max(best[label], rate)
        name = os.path.basename(path)
        out.append([name, f"{share:.0%}", f"{best['file layout']:.1f}", f"{best['repacked']:.1f}"])
        out[-1].append(f"{best['repacked'] / best['file layout']:.2f}x")
        del model, quant
    print(f"tg{n_gen} tokens/s, batch 1, threads {torch.get_num_threads()}, best of {reps} interleaved samples\n")
    print(table(out, ["file", "bytes repacked", "file layout", "repacked", "ratio"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--paths", nargs="+", default=[None], help="paths side by side: portable, avx2, avx512, avx512vnni")
    ap.add_argument("--shapes", nargs="+", default=[w for _, _, w in SHAPES], help="matrices by name, e.g. down_proj")
    ap.add_argument("--no-repack", action="store_true", help="only the file's layout for Q8_0 / Q4_0")
    ap.add_argument("--models", nargs="+", help="GGUF files: decode with repacked rows vs the file's layout")
    ap.add_argument("--n-gen", type=int, default=64, help="decode steps per --models sample")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if ql.isa() == "off":
        sys.exit("the native kernels are off here (QKV_NATIVE=0, no compiler or no AVX2)")
    if args.models:
        decode_ab(args.models, args.n_gen, args.reps)
        return
    rng = np.random.default_rng(0)
    nbytes, read = read_ceiling()
    out, ratios = [], {}
    for n_out, n_in, what in [s for s in SHAPES if s[2] in args.shapes]:
        w = torch.randn(n_out, n_in)
        # the fewest copies that make the smallest format (Q4_0: 0.14 of fp32) overflow the cache
        copies = max(1, -(-3 * CACHE_BYTES // (w.nbytes * 18 // 128)))
        mats = {"fp32": [w.clone() for _ in range(copies)]}
        for qt in args.formats:
            if n_in % ql.GGML_QUANT_SIZES[ql.qtype_of(qt)][0] == 0:  # K-quants need n_in % 256 == 0
                b = blocks_for(qt, w, rng)
                mats[qt] = [b.clone() for _ in range(copies)]
                if not args.no_repack and repack.repackable(qt, n_out):
                    mats[qt + "/x16"] = [repack.repack_(b.clone(), qt) for _ in range(copies)]
        # contenders: (label, format, path)
        runs = [("fp32", "fp32", None)]
        runs += [(f"{f}/{p}" if len(args.paths) > 1 else f, f, p) for f in mats if f != "fp32" for p in args.paths]
        for rows in args.rows:
            x = torch.randn(rows, n_in)
            fns = {name: runner(fmt, x, mats[fmt], path) for name, fmt, path in runs} | {"read": read}
            with torch.inference_mode():
                t = time_interleaved(fns, args.reps, stat=min)
            flop = 2 * rows * n_in * n_out * copies
            for name, fmt, _ in runs:
                wb = sum(m.nbytes for m in mats[fmt])
                speedup = t["fp32"] / t[name]
                ratios.setdefault((name, rows), []).append(speedup)
                out.append(
                    [
                        f"{what} {n_out}x{n_in} x{copies}",
                        rows,
                        name,
                        f"{mats['fp32'][0].nbytes / mats[fmt][0].nbytes:.2f}x",
                        f"{wb / t[name] / 1e9:.1f}",
                        f"{flop / t[name] / 1e9:.1f}",
                        f"{speedup:.2f}x",
                        f"{nbytes / t['read'] / 1e9:.1f}",
                    ]
                )
    paths = ", ".join(p or ql.isa() for p in args.paths)
    print(f"threads {args.threads}, path {paths}, min of {args.reps} interleaved samples\n")
    header = ["matrix", "rows", "format", "fewer bytes", "GB/s", "GFLOP/s", "vs fp32", "read GB/s"]
    print(table(out, header))
    print("\ngeometric mean speedup over fp32 across the shapes (K-quants: down_proj only):\n")
    names = [k for k in dict.fromkeys(n for n, _ in ratios) if k != "fp32"]
    summary = [[n, *[f"{statistics.geometric_mean(ratios[(n, r)]):.2f}x" for r in args.rows]] for n in names]
    print(table(summary, ["format", *[f"{r} rows" for r in args.rows]]))


if __name__ == "__main__":
    main()
