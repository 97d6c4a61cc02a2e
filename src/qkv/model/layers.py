"""Norms and feed-forward blocks: RMSNorm, LayerNorm, SwiGLU and GELU MLPs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.kernels import decode_ops, linear, linears


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose few-row inference products,
    the bulk of a decode step, go to qkv's native kernel (kernels/cpu_linear.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_ops.applies(x, self.weight, rows=x.numel() // x.shape[-1]):
            return decode_ops.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) — the Llama/Mistral/Qwen feed-forward."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=bias)
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, [self.gate_proj.weight, self.up_proj.weight], [self.gate_proj.bias, self.up_proj.bias])
        return self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — the GPT-2 feed-forward."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, approximate: str = "tanh"):
        super().__init__()
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d_model, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


def make_mlp(cfg: ModelConfig) -> nn.Module | None:
    """The block's MLP, or None for an attention-only model (cfg.mlp == "none")."""
    if cfg.mlp == "none":
        return None
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.d_model, cfg.d_ff, cfg.mlp_bias)
    return GeluMLP(cfg.d_model, cfg.d_ff, cfg.mlp_bias, cfg.gelu_approx)
