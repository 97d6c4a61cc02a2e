"""Causal self-attention with multi-head, grouped-query and multi-query variants.

Q comes from n_head heads, K and V from n_kv_head heads; each KV head serves a group
of n_head // n_kv_head query heads (MHA: groups of 1, MQA: one group). Two paths
compute the same thing:

- `math`: softmax(Q Kᵀ / √d + mask) V written out. GQA is a broadcast over a group
  axis (q: B, Hkv, G, T, D against k: B, Hkv, 1, S, D), so K/V are never copied.
  It can keep the attention probabilities for inspection.
- `sdpa`: torch's fused scaled_dot_product_attention (enable_gqa, no copies). For a
  single decode token, query heads of a group are folded into the query-length axis,
  which turns GQA decode into one plain attention call over the shared K/V.

Masks: `mask` is a boolean (B or 1, 1, T, S) tensor, True = may attend. None means
causal, aligned so the last query sees every key (the usual case with a KV cache).
Each layer applies its own sliding window (cfg.window_of: Gemma interleaves local and global
layers) on top: a band on the aligned positions, or, for a cache that pads its K/V (the
paged cache's `update`), the mask the cache builds for that window (`layer_mask`).
Soft-capping (cfg.attn_softcap, Gemma 2) squashes scores to cap * tanh(s / cap); sdpa has
no such hook, so a soft-capped model takes the math path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.model.layers import RMSNorm
from qkv.model.positions import apply_rope


class KVCacheLike(Protocol):
    """What attention needs from a KV cache: store this step's K/V for a layer and
    return all K/V the step's queries may see, shaped (B, n_kv_head, S, head_dim)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    # Optional: `attend(layer, q, k, v, scale) -> y (B, H, T, D)` stores k/v and computes the
    # attention itself (masks, windows and soft-capping included); used instead of `update`
    # when a cache defines it. Optional: `layer_mask(window) -> (B, 1, T, S)` bool, the mask
    # for `update`'s K/V when they are not aligned to the queries (padded rows).


def causal_mask(t_q: int, t_k: int, device=None, window: int | None = None) -> torch.Tensor:
    """(t_q, t_k) bool; query i sits at absolute position t_k - t_q + i."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def math_attention(q, k, v, mask, scale, keep_probs: bool = False, softcap: float | None = None):
    """q: (B, H, T, D), k/v: (B, Hkv, S, D), mask: bool broadcastable to (B, 1, T, S) or None."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.view(B, Hkv, H // Hkv, T, D)
    scores = (q @ k.unsqueeze(2).transpose(-1, -2)).float() * scale  # (B, Hkv, G, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(T, S, q.device)[None, None]
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs.to(v.dtype) @ v.unsqueeze(2)).reshape(B, H, T, D)
    return out, (probs.reshape(B, H, T, S) if keep_probs else None)


# (q, k, v, scale) -> causal attention (B, H, T, D), or None for inputs it does not take: a
# faster kernel for the causal case that the training side may install (the native one,
# kernels/causal_attention.py); the model itself stays plain PyTorch.
CausalKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], "torch.Tensor | None"]
_causal_kernel: CausalKernel | None = None


def install_causal_kernel(kernel: CausalKernel | None) -> CausalKernel | None:
    """Let `kernel` compute causal attention without a mask where it applies (None: SDPA);
    returns the kernel it replaces."""
    global _causal_kernel
    before, _causal_kernel = _causal_kernel, kernel
    return before


def fused_attention(q, k, v, mask, scale, dropout_p: float = 0.0):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    if T == 1 and mask is None:
        # decode: a group's query heads become G query "positions" over the shared K/V
        out = F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v, scale=scale)
        return out.view(B, H, 1, D)
    is_causal = mask is None and T == S
    if is_causal and dropout_p == 0.0 and _causal_kernel is not None:
        y = _causal_kernel(q, k, v, scale)
        if y is not None:
            return y
    if mask is None and not is_causal:
        mask = causal_mask(T, S, q.device)[None, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale, enable_gqa=G > 1
    )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
        self.window = cfg.window_of(layer_idx)
        self.softcap = cfg.attn_softcap
        self.scale = cfg.attn_scale
        self.keep_probs = False  # set by the inspector; forces the math path
        self.last_probs: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: (B or 1, T, 1, D)
        mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # norms and rotations run in the projections' contiguous (B, T, heads, D) layout
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cache is not None:
            attend = getattr(cache, "attend", None)
            if attend is not None and not self.keep_probs and self.cfg.attn_impl != "math":
                # a cache that does its own attention (the paged cache: reads K/V from its
                # blocks with the masks it built; a fused paged kernel would plug in here)
                y = attend(self.layer_idx, q, k, v, self.scale)
                return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
            k, v = cache.update(self.layer_idx, k, v)
            layer_mask = getattr(cache, "layer_mask", None)
            if layer_mask is not None:  # K/V padded per row: only the cache knows the positions
                mask = layer_mask(self.window)
        if self.window is not None and k.shape[2] > self.window and getattr(cache, "layer_mask", None) is None:
            band = causal_mask(T, k.shape[2], q.device, self.window)[None, None]
            mask = band if mask is None else mask & band

        if self.keep_probs or self.cfg.attn_impl == "math" or self.softcap is not None:
            y, self.last_probs = math_attention(q, k, v, mask, self.scale, self.keep_probs, self.softcap)
        else:
            p = self.cfg.dropout if self.training else 0.0
            y = fused_attention(q, k, v, mask, self.scale, p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
