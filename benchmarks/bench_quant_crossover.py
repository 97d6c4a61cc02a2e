"""Where a prompt chunk should leave the int8 row kernel for the tiled GEMM.

A quantized layer computes few rows with `quant_linear.linear` (the decode kernel: x rounded
to int8, weights read once for all rows) and many with `quant_linear.tiled_linear` (weights
dequantized a tile at a time, then an fp32 GEMM). The row kernel's cost grows with the rows;
the GEMM's barely does until its tiles fill. This times both over one transformer layer's
matrices of a GGUF model as qkv loads it (repacked rows where the format has them), at each
row count, alternating the two in every repetition, with the threads a server uses.

    python benchmarks/bench_quant_crossover.py ~/.cache/qkv-bench/smollm2-135m-instruct-q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import qkv
from qkv.kernels import quant_linear as ql
from qkv.quant.modules import QuantLinear

sys.path.insert(0, str(Path(__file__).parent))
from common import table, time_interleaved  # noqa: E402 (after the sys.path line above)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="GGUF files")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 12, 16, 24, 32, 48, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for path in args.models:
        model, _ = qkv.load(path)
        layer = model.blocks[0]
        mats = [m for m in layer.modules() if isinstance(m, QuantLinear)]
        fmt = sorted({m.qtype for m in mats})
        with torch.inference_mode():
            for n in args.rows:
                xs = [torch.randn(1, n, m.in_features) for m in mats]

                def rows(xs=xs, mats=mats) -> None:
                    for m, x in zip(mats, xs):
                        ql.linear(x, m.blocks, m.kernel_type, m.bias)

                def gemm(xs=xs, mats=mats) -> None:
                    for m, x in zip(mats, xs):
                        ql.tiled_linear(x, m.blocks, m.kernel_type, m.bias)

                t = time_interleaved({"rows": rows, "gemm": gemm}, reps=args.reps, stat=min)
                out.append(
                    [
                        Path(path).name,
                        "/".join(fmt),
                        n,
                        f"{1e3 * t['rows']:.2f}",
                        f"{1e3 * t['gemm']:.2f}",
                        f"{t['rows'] / t['gemm']:.2f}",
                    ]
                )
                print(out[-1], flush=True)
    print(f"\n{args.threads} threads, one layer's {len(mats)} matrices, best of {args.reps} alternating rounds\n")
    print(table(out, ["model", "format", "rows", "row kernel (ms)", "tiled GEMM (ms)", "row / GEMM"]))


if __name__ == "__main__":
    main()
