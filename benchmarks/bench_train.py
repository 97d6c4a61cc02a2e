"""Pretraining throughput: qkv's training step vs transformers' GPT2LMHeadModel, side by side.

Config: 6 layers / 6 heads / d 384 / context 256 / batch 12, GPT-2 architecture
(learned positions, LayerNorm, GELU, biases, tied embeddings), vocab 8192. Both models do
forward + backward + AdamW (fused, same hyperparameters) on the same batches; steps are
interleaved so machine noise hits both alike. MFU = achieved training FLOP/s (6N + attention,
PaLM appendix B) over the matmul ceiling measured in this same run, per dtype.

    python benchmarks/bench_train.py [--reps 3] [--threads N] [--dtypes fp32,bf16] [--force-bf16] [--compile]

bf16 runs under autocast. On a CPU without native bf16 matmul (no AVX512-BF16/AMX) the bf16
ceiling is far below fp32's and a bf16 step would take minutes; it is then reported and
skipped unless --force-bf16.
"""

from __future__ import annotations

import argparse

import torch

from common import cpu_description, matmul_ceiling, table, time_interleaved
from qkv.config import ModelConfig
from qkv.kernels import causal_attention, cross_entropy, gelu
from qkv.model import attention as model_attention
from qkv.model import build_model
from qkv.model import layers as model_layers
from qkv.model import loss as model_loss
from qkv.train.trainer import flops_per_token

L, H, D, T, B, V = 6, 6, 384, 256, 12, 8192


def qkv_model() -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=V,
        n_layer=L,
        d_model=D,
        n_head=H,
        max_seq_len=T,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    )
    return build_model(cfg)


def hf_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=V,
        n_positions=T,
        n_embd=D,
        n_layer=L,
        n_head=H,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg)


def make_step(model, kind: str, batches, dtype, compile: bool = False):
    # fused: what qkv's Trainer uses on CPU; transformers gets the same (its Trainer's "adamw_torch_fused")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    state = {"i": 0}
    if kind == "qkv" and dtype == "bf16":  # as qkv's Trainer does for a bf16 run
        model_loss.install_row_kernel(cross_entropy.rows)
    if kind == "qkv":  # as qkv's Trainer does (transformers' GPT-2 never reaches these hooks)
        model_attention.install_causal_kernel(causal_attention.attention)
        model_layers.install_gelu_tanh_kernel(gelu.gelu_tanh)
    if compile:  # each transformer block through inductor, as `qkv train --compile` does
        for block in model.blocks if kind == "qkv" else model.transformer.h:
            block.compile()

    def step():
        w = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if kind == "qkv":
                loss = model.loss(w[:, :-1], w[:, 1:])
            else:
                loss = model(input_ids=w[:, :-1], labels=w[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--force-bf16", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile (fp32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [torch.randint(0, V, (B, T + 1)) for _ in range(4)]
    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16, n=512, reps=2)}
    if ceilings["bf16"] >= 0.5 * ceilings["fp32"]:  # native bf16: measure it as fp32's (512^3 under-reads it)
        ceilings["bf16"] = matmul_ceiling(torch.bfloat16)
    q = qkv_model()
    fpt = flops_per_token(q, T)
    print(f"cpu: {cpu_description()}")
    print(
        f"threads {torch.get_num_threads()}; config {L}L/{H}H/d{D}/T{T}/B{B}, vocab {V}; "
        f"{fpt / 1e6:.1f} MFLOP/token (6N + attention)"
    )
    print(f"matmul ceilings: fp32 {ceilings['fp32'] / 1e9:.1f} GFLOP/s, bf16 {ceilings['bf16'] / 1e9:.1f} GFLOP/s")
    rows, tps = [], {}
    for dtype in args.dtypes.split(","):
        if dtype == "bf16" and ceilings["bf16"] < 0.5 * ceilings["fp32"] and not args.force_bf16:
            print(
                f"bf16: skipped, this CPU has no fast bf16 matmul (ceiling {ceilings['bf16'] / 1e9:.2f} vs fp32 "
                f"{ceilings['fp32'] / 1e9:.1f} GFLOP/s); --force-bf16 to time it anyway"
            )
            continue
        torch.manual_seed(0)
        fns = {
            "qkv": make_step(qkv_model(), "qkv", batches, dtype),
            "transformers": make_step(hf_model(), "hf", batches, dtype),
        }
        times = time_interleaved(fns, reps=args.reps, warmup=1)
        for name, t in times.items():
            tok_s = B * T / t
            tps[(name, dtype)] = tok_s
            rows.append([name, dtype, f"{t * 1000:.0f}", f"{tok_s:,.0f}", f"{tok_s * fpt / ceilings[dtype]:.0%}"])
        rows.append(["qkv / transformers", dtype, "", f"{tps[('qkv', dtype)] / tps[('transformers', dtype)]:.2f}x", ""])
    if args.compile:
        torch.manual_seed(0)
        fns = {
            "qkv compiled": make_step(qkv_model(), "qkv", batches, "fp32", compile=True),
            "transformers compiled": make_step(hf_model(), "hf", batches, "fp32", compile=True),
        }
        for fn in fns.values():  # compile outside the timing
            fn()
        times = time_interleaved(fns, reps=args.reps, warmup=1)
        for name, t in times.items():
            tok_s = B * T / t
            tps[(name, "fp32")] = tok_s
            rows.append([name, "fp32", f"{t * 1000:.0f}", f"{tok_s:,.0f}", f"{tok_s * fpt / ceilings['fp32']:.0%}"])
        for a, b in (("qkv compiled", "transformers compiled"), ("qkv compiled", "transformers")):
            rows.append([f"{a} / {b}", "fp32", "", f"{tps[(a, 'fp32')] / tps[(b, 'fp32')]:.2f}x", ""])
    if ("qkv", "bf16") in tps and ("qkv", "fp32") in tps:
        rows.append(["qkv bf16 / fp32", "", "", f"{tps[('qkv', 'bf16')] / tps[('qkv', 'fp32')]:.2f}x", ""])
    print(table(rows, ["model", "dtype", "ms/step", "tokens/s", "MFU"]))


if __name__ == "__main__":
    main()
