"""Norms and feed-forward blocks: RMSNorm, LayerNorm, gated (SwiGLU, GeGLU) and GELU MLPs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.config import ModelConfig

# x -> F.gelu(x, approximate="tanh"), or None for tensors it does not take: a faster kernel
# the training side may install (the native one, kernels/gelu.py); the model stays plain PyTorch.
GeluKernel = Callable[[torch.Tensor], "torch.Tensor | None"]
_gelu_tanh_kernel: GeluKernel | None = None


def install_gelu_tanh_kernel(kernel: GeluKernel | None) -> GeluKernel | None:
    """Let `kernel` compute the tanh-approximated GELU where it applies (None: F.gelu); returns
    the kernel it replaces."""
    global _gelu_tanh_kernel
    before, _gelu_tanh_kernel = _gelu_tanh_kernel, kernel
    return before


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """F.gelu(x, approximate=...), through the installed kernel for the tanh form where it applies."""
    if approximate == "tanh" and _gelu_tanh_kernel is not None:
        y = _gelu_tanh_kernel(x)
        if y is not None:
            return y
    return F.gelu(x, approximate=approximate)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (offset + weight), computed in fp32 as Llama and Gemma do.

    Llama: offset 0, weight initialised to 1. Gemma: offset 1, weight stored as scale - 1
    (initialised to 0). The offset is added in fp32 at run time, not folded into the weight,
    so a bf16 Gemma weight keeps its precision near 0 and checkpoints keep Gemma's values."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def scale(self) -> torch.Tensor:
        """The fp32 factor each normalised feature is multiplied by."""
        return self.weight.float() + self.offset if self.offset else self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale(), self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) — the Llama/Mistral/Qwen feed-forward."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def act(self, gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeGLU(SwiGLU):
    """down(gelu(gate(x)) * up(x)) — the Gemma feed-forward (GELU with the tanh approximation)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, approximate: str = "tanh"):
        super().__init__(d_model, d_ff, bias)
        self.approximate = approximate

    def act(self, gate: torch.Tensor) -> torch.Tensor:
        return gelu(gate, self.approximate)


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — the GPT-2 feed-forward."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, approximate: str = "tanh"):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.up_proj(x), self.approximate))


def make_mlp(cfg: ModelConfig) -> nn.Module | None:
    """The block's MLP, or None for an attention-only model (cfg.mlp == "none")."""
    if cfg.mlp == "none":
        return None
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.d_model, cfg.d_ff, cfg.mlp_bias)
    if cfg.mlp == "geglu":
        return GeGLU(cfg.d_model, cfg.d_ff, cfg.mlp_bias, cfg.gelu_approx)
    return GeluMLP(cfg.d_model, cfg.d_ff, cfg.mlp_bias, cfg.gelu_approx)
