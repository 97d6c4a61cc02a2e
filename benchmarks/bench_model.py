"""Model speed: forward+backward of a Llama-style ~100M model (qkv vs transformers), and
the MoE block (qkv grouped matmuls vs transformers' Mixtral block vs a dense SwiGLU MLP
with the same active parameters). CPU fp32, same config, same inputs, one run.

    python benchmarks/bench_model.py [--batch 4 --seq 256 --reps 3] [--compile]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import matmul_ceiling, table, time_interleaved
from qkv import build_model, count_params, preset
from qkv.model.layers import SwiGLU
from qkv.model.moe import MoE


def bench_llama(batch: int, seq: int, reps: int, ceiling: float, compile: bool = False) -> list[list]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = preset("llama-100m", max_seq_len=seq)
    qkv_model = build_model(cfg).train()
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=seq,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )
    hf_model = LlamaForCausalLM(hf_cfg).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step_qkv():  # qkv's training path: fused linear + cross-entropy
        qkv_model.loss(x, y).backward()
        qkv_model.zero_grad(set_to_none=True)

    def step_qkv_logits():  # the same model through full logits + F.cross_entropy
        logits = qkv_model(x)
        F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
        qkv_model.zero_grad(set_to_none=True)

    def step_hf():
        logits = hf_model(input_ids=x).logits
        F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
        hf_model.zero_grad(set_to_none=True)

    contenders = {"qkv": step_qkv, "qkv-logits": step_qkv_logits, "hf": step_hf}
    if compile:  # both sides compiled by inductor (elementwise fusion; the matmuls stay BLAS)
        qkv_loss, hf_fwd = torch.compile(qkv_model.loss), torch.compile(hf_model)

        def step_qkv_compiled():
            qkv_loss(x, y).backward()
            qkv_model.zero_grad(set_to_none=True)

        def step_hf_compiled():
            logits = hf_fwd(input_ids=x).logits
            F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
            hf_model.zero_grad(set_to_none=True)

        for warm in (step_qkv_compiled, step_hf_compiled):  # compile outside the timing
            warm()
        contenders |= {"qkv-compiled": step_qkv_compiled, "hf-compiled": step_hf_compiled}
    t = time_interleaved(contenders, reps=reps)
    n = count_params(qkv_model).total
    attn_flops = 12 * cfg.n_layer * seq * cfg.d_model  # per token, fwd+bwd (PaLM appendix B)
    flops = (6 * n + attn_flops) * batch * seq
    rows = []
    for name, label in (
        ("qkv", "qkv Transformer.loss (fused linear+CE)"),
        ("qkv-logits", "qkv Transformer -> logits -> F.cross_entropy"),
        ("hf", "transformers LlamaForCausalLM -> logits -> F.cross_entropy"),
        ("qkv-compiled", "qkv Transformer.loss, torch.compile"),
        ("hf-compiled", "transformers LlamaForCausalLM, torch.compile"),
    ):
        if name not in t:
            continue
        rows.append(
            [
                f"llama-100m fwd+bwd ({n / 1e6:.0f}M, {batch}x{seq})",
                label,
                f"{t[name] * 1e3:.0f} ms",
                f"{batch * seq / t[name]:.0f}",
                f"{flops / t[name] / ceiling:.0%}",
                f"{t['hf'] / t[name]:.2f}x",
            ]
        )
    return rows


def bench_moe(tokens: int, d: int, ff: int, reps: int, ceiling: float) -> list[list]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = preset("tiny", d_model=d, n_head=8, n_expert=8, n_expert_per_token=2, moe_d_ff=ff)
    ours = MoE(cfg).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = SwiGLU(d, 2 * ff).eval()  # same active parameters as top-2 of 8
    x = torch.randn(tokens, d)
    rows = []
    contenders = {"qkv": lambda: ours(x), "dense": lambda: dense(x)}
    for impl in ("eager", "grouped_mm"):
        hf_cfg = MixtralConfig(hidden_size=d, intermediate_size=ff, num_local_experts=8, num_experts_per_tok=2)
        hf_cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(hf_cfg).eval()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        contenders[f"hf-{impl}"] = (lambda b: lambda: b(x[None]))(block)
    with torch.no_grad():
        t = time_interleaved(contenders, reps=reps)
    flops = 2 * tokens * 3 * d * (2 * ff)  # active expert matmuls (router negligible)
    labels = {
        "qkv": "qkv MoE (sorted dispatch, torch._grouped_mm)",
        "hf-eager": "transformers MixtralSparseMoeBlock (eager experts)",
        "hf-grouped_mm": "transformers MixtralSparseMoeBlock (grouped_mm experts)",
        "dense": "dense SwiGLU, same active params",
    }
    for k, label in labels.items():
        rows.append(
            [
                f"MoE 8e top-2, {tokens} tok, d={d}, ff={ff} (fwd)",
                label,
                f"{t[k] * 1e3:.1f} ms",
                f"{tokens / t[k]:.0f}",
                f"{flops / t[k] / ceiling:.0%}",
                f"{t[k] / t['qkv']:.2f}x",
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows for both models (~2 min)")
    args = ap.parse_args()
    torch.manual_seed(0)
    ceiling = matmul_ceiling(torch.float32)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s"
    )
    rows = []
    if not args.skip_llama:
        rows += bench_llama(args.batch, args.seq, args.reps, ceiling, args.compile)
    rows += bench_moe(4096, 512, 1024, max(args.reps, 5), ceiling)
    print(table(rows, ["workload", "implementation", "time", "tokens/s", "MFU", "speed vs peer"]))
    print(
        "speed vs peer: transformers' time / this time for the Llama rows; "
        "this time / qkv's time for the MoE rows (qkv = 1.00x; >1 means slower than qkv)"
    )


if __name__ == "__main__":
    main()
