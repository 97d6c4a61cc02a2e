"""Inference engine speed, CPU fp32, one run, same weights and prompts for every contender.

1. KV cache vs recomputing the whole sequence each step (128 / 512 / 1024 new tokens).
2. Batch-1 decode, qkv (contiguous cache; with its native CPU kernels and with PyTorch ops
   only) vs transformers `generate`, for a Llama-style ~100M model and SmolLM2-135M,
   beside the roofline: memory bandwidth (a 512 MiB read timed in turn with the runs) /
   bytes read per token (every weight once + the K/V of the context).
3. 64 requests of mixed prompt/output lengths: qkv's continuous batching (paged cache)
   vs transformers batched `generate` with padding vs one request at a time.
4. MHA vs GQA vs MQA variants of the ~100M model: cache bytes and batched decode tok/s.

    python benchmarks/bench_infer.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from common import table, time_interleaved
from qkv.config import preset
from qkv.infer.engine import Engine
from qkv.infer.generate import forward_step, generate, generate_no_cache
from qkv.infer.kv_cache import KVCache, kv_bytes_per_token
from qkv.infer.sampling import SamplingParams
from qkv.kernels import native
from qkv.model import build_model


def best_of(fns: dict, reps: int) -> dict[str, float]:
    """Best time of each contender, alternating them so machine noise hits all alike."""
    return time_interleaved(fns, reps, warmup=0, stat=min)


def to_hf(model):
    """The same weights in transformers' LlamaForCausalLM."""
    from qkv.interop.hf import to_transformers

    return to_transformers(model, "llama")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding is
    read in full by the output head; the input lookup reads one row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


GREEDY = dict(temperature=0.0, ignore_eos=True)


# --- 1. cache vs recompute ---------------------------------------------------------------
def bench_cache_vs_recompute(lengths: list[int]) -> list[list]:
    # a small model keeps the quadratic recompute baseline affordable on 2 shared cores
    cfg = preset("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=max(lengths) + 64)
    m = build_model(cfg).eval()
    prompt = list(range(1, 17))
    rows = []
    for n in lengths:
        t = best_of(
            {
                "cache": lambda n=n: generate(m, prompt, SamplingParams(max_tokens=n, **GREEDY)),
                "recompute": lambda n=n: generate_no_cache(m, prompt, n),
            },
            reps=1,
        )
        rows.append(
            [
                f"tiny ({sum(p.numel() for p in m.parameters()) / 1e6:.1f}M)",
                n,
                f"{n / t['cache']:.0f}",
                f"{n / t['recompute']:.0f}",
                f"{t['recompute'] / t['cache']:.1f}x",
            ]
        )
    return rows


# --- 2. batch-1 decode -------------------------------------------------------------------
def bench_decode(name: str, m, hf, prompt_len: int, new: int, reps: int) -> list:
    """tok/s of qkv (native kernels, and PyTorch ops only) and transformers, each run
    `reps` times in turn with a 512 MiB read (the bandwidth for the roofline) between."""
    prompt = list(range(100, 100 + prompt_len))
    ids = torch.tensor([prompt])
    big = torch.ones(512 * 2**20 // 4)

    def ours():
        return generate(m, prompt, SamplingParams(max_tokens=new, **GREEDY))

    def ours_pytorch_ops():
        with native.disabled():
            return ours()

    def theirs():
        with torch.inference_mode():
            return hf.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
            )

    a, b = ours(), theirs()[0, prompt_len:].tolist()
    agree = sum(x == y for x, y in zip(a, b))
    t = best_of({"qkv": ours, "ops": ours_pytorch_ops, "hf": theirs, "read": big.sum}, reps)
    bw = big.nbytes / t["read"]
    kv_read = kv_bytes_per_token(m.cfg) * (prompt_len + new / 2)
    per_tok = weight_bytes_per_token(m) + kv_read
    roof = bw / per_tok
    q, o, h = new / t["qkv"], new / t["ops"], new / t["hf"]
    return [
        name,
        f"{per_tok / 1e6:.0f} MB",
        f"{q:.1f}",
        f"{o:.1f}",
        f"{h:.1f}",
        f"{q / h:.2f}x",
        f"{bw / 1e9:.1f} GB/s",
        f"{roof:.1f}",
        f"{q / roof:.0%}",
        f"{h / roof:.0%}",
        f"{agree}/{new}",
    ]


def load_smollm2():
    """SmolLM2-135M-Instruct from the bundled GGUF via qkv.interop; transformers gets the
    same (dequantised) weights through the Llama mapping."""
    import qkv.interop

    gguf = qkv.interop.bundled_smollm2()
    if gguf is None:
        return None
    m, _ = qkv.interop.load(str(gguf))
    m = m.eval()
    return m, to_hf(m)


# --- 3. 64 mixed requests ----------------------------------------------------------------
def bench_batching(n_req: int, seed: int, with_sequential: bool) -> list[list]:
    cfg = preset("small", vocab_size=8192, max_seq_len=512)
    m = build_model(cfg).eval()
    hf = to_hf(m)
    rng = random.Random(seed)
    reqs = [([rng.randrange(10, 8000) for _ in range(rng.randint(8, 96))], rng.randint(8, 96)) for _ in range(n_req)]
    useful = sum(n for _, n in reqs)
    eng = Engine(m, None, max_num_seqs=n_req, max_batch_tokens=1024)

    def ours():
        return eng.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, **GREEDY) for _, n in reqs])

    def theirs():
        L = max(len(p) for p, _ in reqs)
        ids = torch.tensor([[0] * (L - len(p)) + p for p, _ in reqs])
        att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _ in reqs])
        with torch.inference_mode():
            return hf.generate(
                ids,
                attention_mask=att,
                max_new_tokens=max(n for _, n in reqs),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    def sequential():
        return [generate(m, p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in reqs]

    def ours_pytorch_ops():
        with native.disabled():
            return ours()

    fns = {"qkv": ours, "ops": ours_pytorch_ops, "hf": theirs}
    if with_sequential:
        fns["seq"] = sequential
    res = ours()
    t = best_of(fns, reps=1)
    # correctness next to speed: continuous batching gives each request its solo output
    solo = [generate(m, p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in reqs[:4]]
    assert [r[0].token_ids for r in res[:4]] == solo, "batched output differs from solo output"
    rows = [
        ["qkv continuous batching (paged)", f"{useful / t['qkv']:.0f}", f"{t['hf'] / t['qkv']:.2f}x"],
        ["qkv continuous batching, PyTorch ops only", f"{useful / t['ops']:.0f}", f"{t['hf'] / t['ops']:.2f}x"],
        ["transformers batched generate (padded)", f"{useful / t['hf']:.0f}", "1.00x"],
    ]
    if with_sequential:
        rows.append(
            ["qkv one request at a time (contiguous)", f"{useful / t['seq']:.0f}", f"{t['hf'] / t['seq']:.2f}x"]
        )
    stats = eng.stats()
    return rows, dict(useful=useful, params=sum(p.numel() for p in m.parameters()), preempt=stats["preemptions_total"])


# --- 4. MHA / GQA / MQA --------------------------------------------------------------------
def bench_kv_heads(batch: int, context: int, steps: int, reps: int) -> list[list]:
    rows = []
    timers, configs = {}, {}
    for label, kv in (("MHA", 12), ("GQA", 4), ("MQA", 1)):
        cfg = preset("llama-100m", n_kv_head=kv, max_seq_len=context + steps + 8)
        m = build_model(cfg).eval()
        cache = KVCache(cfg, context + steps + 1, batch=batch)
        cache.k.normal_()  # decode speed does not depend on the values: skip the prefill
        cache.v.normal_()
        tok = torch.randint(0, cfg.vocab_size, (batch, 1))

        def run(m=m, cache=cache, tok=tok):
            cache.pos = context
            for _ in range(steps):
                forward_step(m, cache, tok)

        timers[label], configs[label] = run, cfg
    t = best_of(timers, reps)
    base = kv_bytes_per_token(configs["MHA"])
    for label, cfg in configs.items():
        kvb = kv_bytes_per_token(cfg)
        rows.append(
            [
                label,
                f"{cfg.n_head}/{cfg.n_kv_head}",
                f"{kvb / 1024:.0f} KiB",
                f"{base / kvb:.0f}x",
                f"{kvb * context * batch / 2**20:.0f} MiB",
                f"{batch * steps / t[label]:.1f}",
                f"{t['MHA'] / t[label]:.2f}x",
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    ap.add_argument("--parts", default="1234", help="which parts to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"threads={args.threads}  native kernels: {'on' if native.enabled() else 'off'}\n")

    if "1" in args.parts:
        lengths = [32, 64] if args.quick else [128, 512, 1024]
        print("## 1. KV cache vs recompute (greedy, 16-token prompt)")
        print(
            table(
                bench_cache_vs_recompute(lengths), ["model", "new tokens", "cache tok/s", "recompute tok/s", "speedup"]
            )
        )
        print()
    if "2" in args.parts:
        new = 16 if args.quick else 128
        print(
            f"## 2. batch-1 decode (32-token prompt, {new} new tokens, best of 3) vs roofline = "
            "bandwidth (read in turn with the runs) / bytes per token"
        )
        rows = []
        m = build_model(preset("llama-100m")).eval()
        rows.append(bench_decode("llama-100m (GQA 12/4)", m, to_hf(m), 32, new, 3))
        del m
        sm = load_smollm2()
        if sm is not None:
            rows.append(bench_decode("SmolLM2-135M (GQA 9/3)", sm[0], sm[1], 32, new, 3))
            del sm
        print(
            table(
                rows,
                [
                    "model",
                    "bytes/token",
                    "qkv tok/s",
                    "qkv PyTorch ops",
                    "HF tok/s",
                    "qkv/HF",
                    "bandwidth",
                    "roofline tok/s",
                    "qkv % roof",
                    "HF % roof",
                    "same tokens",
                ],
            )
        )
        print()
    if "3" in args.parts:
        n_req = 16 if args.quick else 64
        rows, info = bench_batching(n_req, 0, with_sequential=True)
        print(
            f"## 3. {n_req} requests, prompts 8-96 and outputs 8-96 tokens (greedy), 'small' preset "
            f"({info['params'] / 1e6:.0f}M): {info['useful']} useful output tokens"
        )
        print(table(rows, ["method", "output tok/s", "vs HF batched"]))
        print()
    if "4" in args.parts:
        batch, ctx = (4, 128) if args.quick else (8, 512)
        print(f"## 4. MHA vs GQA vs MQA (llama-100m shape, batch {batch} decoding at context {ctx}, fp32 cache)")
        print(
            table(
                bench_kv_heads(batch, ctx, 4, 2),
                [
                    "variant",
                    "heads q/kv",
                    "KV/token",
                    "smaller",
                    f"KV for {batch}x{ctx}",
                    "decode tok/s",
                    "speed vs MHA",
                ],
            )
        )
        print()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
