"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay pulls weights toward zero. That is a sensible prior for projection matrices
but not for norm gains (their neutral value is 1), biases, or embeddings (rare tokens would
be decayed toward zero between their updates), so those go in a no-decay group.

Schedules (all start with a linear warmup from ~0 to lr):
- cosine: lr follows half a cosine down to lr * min_lr_ratio at max_steps.
- wsd (warmup-stable-decay): constant lr, then a linear decay over the last decay_frac of
  the run (MiniCPM / DeepSeek); a checkpoint before the decay can be continued cheaply.
- constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    no_decay_ids = set()
    for module in model.modules():
        is_norm_or_emb = isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if is_norm_or_emb or name.endswith("bias") or p.dim() < 2:
                no_decay_ids.add(id(p))
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (CUDA), else the multi-tensor foreach path."""
    device = next(model.parameters()).device
    is_dtensor = any(type(p).__name__ == "DTensor" for p in model.parameters())
    fused = device.type == "cuda" and not is_dtensor
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kw)


def lr_at(
    step: int,
    *,
    lr: float,
    max_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = int(round(decay_frac * max_steps))
        decay_start = max_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return lr
        t = min(1.0, (step - decay_start + 1) / decay_steps)
        return lr + (min_lr - lr) * t
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, wsd or constant")
