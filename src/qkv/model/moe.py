"""Sparse mixture of experts: a router picks top-k SwiGLU experts per token.

1. Router: logits = W_r x; probabilities = softmax in fp32; keep the top-k.
   Mixtral renormalises the k kept weights to sum to 1, OLMoE does not (config flag).
2. Dispatch: the (token, expert) pairs are sorted by expert so each expert's tokens
   are one contiguous segment; `torch._grouped_mm` runs all experts' matmuls in one
   call over those segments (a per-expert loop over the same segments is the
   fallback). Outputs are gathered back to token order and mixed by the router weights.
3. Training losses (returned, weighted by the config's coefficients):
   - Switch load balancing: E · Σ_i f_i · P_i, f_i = share of routed slots that went
     to expert i, P_i = mean router probability of expert i (1.0 when uniform).
   - ST-MoE router z-loss: mean(logsumexp(logits)²), keeps router logits small.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.config import ModelConfig

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_expert, self.top_k = cfg.n_expert, cfg.n_expert_per_token
        self.renormalize = cfg.moe_renormalize
        self.dispatch = cfg.moe_dispatch
        self.aux_coef, self.z_coef = cfg.router_aux_coef, cfg.router_z_coef
        d, f, E = cfg.d_model, cfg.moe_d_ff, cfg.n_expert
        self.router = nn.Linear(d, E, bias=False)
        # stacked expert weights, laid out (E, in, out) for grouped matmuls
        self.w_gate = nn.Parameter(torch.empty(E, d, f))
        self.w_up = nn.Parameter(torch.empty(E, d, f))
        self.w_down = nn.Parameter(torch.empty(E, f, d))
        self.last_experts: torch.Tensor | None = None  # (tokens, k) chosen experts, for inspection
        self.last_aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor):
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, weights, experts = self.route(x)
        self.last_experts = experts.detach()

        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_expert)
        x_sorted = x[token_of_slot]
        y_sorted = self._experts(x_sorted, counts)
        # un-sort with a gather (index_add is serial on CPU), then weight the k slots per token
        y = y_sorted[order.argsort()].view(-1, self.top_k, shape[-1])
        out = (weights.to(y.dtype).unsqueeze(1) @ y).squeeze(1)

        if self.training:
            share = counts.float() / flat_experts.numel()
            balance = self.n_expert * (share * probs.mean(dim=0)).sum()
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.last_aux_loss = self.aux_coef * balance + self.z_coef * z
        else:
            self.last_aux_loss = None
        return out.reshape(shape)

    def _experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w_gate, w_up, w_down = (w.to(x.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if self.dispatch == "grouped_mm" and _HAS_GROUPED_MM and x.dtype in (torch.float32, torch.bfloat16):
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x, w_gate, offs=offs)) * torch._grouped_mm(x, w_up, offs=offs)
            return torch._grouped_mm(h, w_down, offs=offs)
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                seg = x[start : start + n]
                out[start : start + n] = (F.silu(seg @ w_gate[e]) * (seg @ w_up[e])) @ w_down[e]
                start += n
        return out
