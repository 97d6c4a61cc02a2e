"""Prefill over quantized weights: QuantLinear's tiled product (qkv.kernels.quant_linear.
tiled_linear: a tile of weight rows dequantized natively, then torch.mm into the output's
columns) at several tile sizes, beside the torch path it replaces (formats.dequantize of the
whole matrix, then F.linear) and beside torch.mm on the already-dequantized fp32 weight (the
ceiling: the tiled product cannot beat the GEMM it calls), on SmolLM2-135M's shapes, all
measured in this run.

Also the dequantization alone, native against torch, in weights per second; and with
--model, the prompt speed (qkv.infer.speed.prompt_speed, pp<rows>) of that GGUF model and of
its Q8_0 and Q4_0 requantizations (quantize_model on the dequantized load, in memory) with the
tiled product ("after") and without it ("before": QuantLinear dequantizing the whole matrix in
torch, as it did), on both backends, beside the sum of torch.mm over the model's matrix
shapes at that many rows (the GEMM ceiling), all in alternating rounds.

    python benchmarks/bench_quant_prefill.py [--rows 128] [--tiles 128 256 512 1024] [--reps 5]
    python benchmarks/bench_quant_prefill.py --model smollm2 [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import table, time_interleaved  # noqa: E402 (after the sys.path line above)
from qkv.kernels import quant_linear as ql  # noqa: E402 (after the sys.path line above)
from qkv.quant.formats import dequantize  # noqa: E402 (after the sys.path line above)

SHAPES = [  # (n_out, n_in, what) of SmolLM2-135M
    (576, 576, "q/o_proj"),
    (192, 576, "k/v_proj"),
    (1536, 576, "gate/up_proj"),
    (576, 1536, "down_proj"),
    (49152, 576, "lm_head"),
]
FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")


def blocks_for(qt: str, n_out: int, n_in: int, rng: np.random.Generator) -> torch.Tensor:
    """gguf's quantization of random weights, or random bytes with small finite fp16 scales
    for the K-quants (gguf cannot quantize to them; the speed does not depend on the values)."""
    from gguf import GGML_QUANT_SIZES, quants

    q = ql.qtype_of(qt)
    if not q.name.endswith("_K"):
        return torch.from_numpy(quants.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), q))
    block, size = GGML_QUANT_SIZES[q]
    b = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    d_at = 208 if q.name == "Q6_K" else 0
    b[..., d_at : d_at + 2] = rng.uniform(-0.01, 0.01, b.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    if q.name != "Q6_K":
        b[..., 2:4] = rng.uniform(0, 0.01, b.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return torch.from_numpy(b.reshape(n_out, -1))


TORCH = "torch (dequantize all + F.linear)"


def contenders(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, qt: str, tiles: list[int]) -> dict:
    """The products of x with one matrix (blocks b, their fp32 values w), and its dequantization alone."""
    n_in = x.shape[-1]
    fns = {TORCH: lambda: F.linear(x, dequantize(b, qt, n_in)), "mm on fp32 (ceiling)": lambda: torch.mm(x, w.t())}
    fns |= {f"tiled {t}": (lambda t=t: ql.tiled_linear(x, b, qt, tile_rows=t)) for t in tiles}
    return fns | {"deq torch": lambda: dequantize(b, qt, n_in), "deq native": lambda: ql.dequantize(b, qt, n_in)}


@contextlib.contextmanager
def before():
    """QuantLinear as it was: no tiled product, whole-matrix dequantization in torch."""
    from qkv.quant import formats, modules

    with mock.patch.object(ql, "tiled_linear", lambda *a, **k: None):
        with mock.patch.object(modules, "_dequantize_all", formats.dequantize):
            yield


def end_to_end(model_path: str, rows: int, reps: int) -> None:
    from qkv.infer import speed
    from qkv.infer.backend import prepare_for_inference
    from qkv.interop import bundled_smollm2, load
    from qkv.quant import QuantLinear, quantize_model

    path = bundled_smollm2() if model_path == "smollm2" else model_path
    models = {"file": load(path)[0].eval()}
    for qt in ("q8_0", "q4_0"):
        models[qt] = quantize_model(load(path, dequantize=True)[0].eval(), qt, exclude=["tok_emb"])
    shapes = [(m.out_features, m.in_features) for m in models["file"].modules() if isinstance(m, QuantLinear)]
    mats = [(torch.randn(rows, n_in), torch.randn(n_out, n_in)) for n_out, n_in in shapes]
    results: dict[str, list[float]] = {}
    for _ in range(reps):  # alternating rounds: the shared machine's noise hits every contender alike
        with torch.inference_mode():
            t = time.perf_counter()
            for x, w in mats:
                torch.mm(x, w.t())
            results.setdefault("torch.mm over the same shapes (ceiling)", []).append(rows / (time.perf_counter() - t))
        for name, model in models.items():
            for backend in ("native", "torch"):
                prepare_for_inference(model, backend)
                for when in ("before", "after"):
                    with before() if when == "before" else contextlib.nullcontext():
                        r = speed.prompt_speed(model, rows, reps=1)
                    results.setdefault(f"{name} {backend} {when}", []).append(r.tokens_per_s)
    best = {k: max(v) for k, v in results.items()}
    print(f"\npp{rows} of {Path(path).name} (file) and its requantizations, tokens/s, best of {reps} rounds\n")
    out = [[k, f"{v:.1f}"] for k, v in best.items()]
    for name in models:
        for backend in ("native", "torch"):
            a, b = best[f"{name} {backend} after"], best[f"{name} {backend} before"]
            out.append([f"{name} {backend}: after / before", f"{a / b:.2f}x"])
    print(table(out, ["contender", "tokens/s"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--tiles", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--model", help="a GGUF file or 'smollm2' (the bundled one): time its prefill end to end instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if ql.isa() == "off":
        sys.exit("the native kernels are off here (QKV_NATIVE=0, no compiler or no AVX2)")
    if args.model:
        return end_to_end(args.model, args.rows, args.reps)
    rng = np.random.default_rng(0)
    out, deq_rows, speed = [], [], {}
    for qt in args.formats:
        for n_out, n_in, what in SHAPES:
            if n_in % ql.GGML_QUANT_SIZES[ql.qtype_of(qt)][0]:
                continue  # K-quants need n_in % 256 == 0: down_proj only
            b = blocks_for(qt, n_out, n_in, rng)
            w = dequantize(b, qt, n_in)
            x = torch.randn(args.rows, n_in)
            fns = contenders(x, b, w, qt, args.tiles)
            with torch.inference_mode():
                t = time_interleaved(fns, args.reps, stat=min)
            flop = 2 * args.rows * n_in * n_out
            ceiling = t["mm on fp32 (ceiling)"]
            for name in [k for k in fns if not k.startswith("deq")]:
                speed.setdefault((qt, name), []).append(ceiling / t[name])
                row = [qt, f"{what} {n_out}x{n_in}", name, f"{t[name] * 1e3:.2f}", f"{flop / t[name] / 1e9:.1f}"]
                out.append(
                    row + [f"{ceiling / t[name]:.2f}", f"{t['torch (dequantize all + F.linear)'] / t[name]:.2f}x"]
                )
            nw = n_in * n_out
            deq_rows.append([qt, what, f"{nw / t['deq torch'] / 1e9:.2f}", f"{nw / t['deq native'] / 1e9:.2f}"])
    print(f"threads {args.threads}, {args.rows} rows of x, path {ql.isa()}, min of {args.reps} interleaved samples\n")
    header = ["format", "matrix", "product", "ms", "GFLOP/s", "of mm", "vs torch path"]
    print(table(out, header))
    print("\ngeometric mean across the shapes of the fraction of torch.mm's speed reached:\n")
    names = list(dict.fromkeys(n for _, n in speed))
    summary = [[n, *[f"{statistics.geometric_mean(speed[(f, n)]):.2f}" for f in args.formats]] for n in names]
    print(table(summary, ["product", *args.formats]))
    print("\ndequantization alone, G weights/s:\n")
    print(table(deq_rows, ["format", "matrix", "torch", "native"]))


if __name__ == "__main__":
    main()
