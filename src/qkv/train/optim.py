"""The optimizers (AdamW; Muon for hidden matrices with AdamW for the rest) and the learning-rate schedules.

AdamW: decoupled weight decay on matrices only.

Weight decay pulls weights toward zero. That is a sensible prior for projection matrices
but not for norm gains (their neutral value is 1), biases, or embeddings (rare tokens would
be decayed toward zero between their updates), so those go in a no-decay group.

Muon (Keller Jordan, 2024; modded-nanogpt, nanochat): SGD momentum whose update, for each
hidden weight matrix, is replaced by the nearest semi-orthogonal matrix (all singular values ~1),
computed by five Newton-Schulz iterations. Every direction of the matrix moves by the same amount,
so rare directions are not drowned by dominant ones. It is meant for the 2-D weights inside the
blocks only: embeddings (a lookup, not a linear map of a dense input), the LM head (tied or not:
its rows are per-token logits) and the MoE router (a small classifier whose logits feed a softmax)
keep AdamW, as do norms and biases (not matrices). `muon_groups` is the one place that decides.

torch 2.13's torch.optim.Muon implements the same update, but we write it here because it
(a) always runs Newton-Schulz in bfloat16, which on CPUs without bf16 matmul units is 3-5x slower
than fp32 and less accurate, and (b) accepts 2-D parameters only, so MoE expert stacks (E, in, out)
could not be orthogonalised per expert. We keep its constants and conventions: the quintic
coefficients (3.4445, -4.7750, 2.0315), 5 steps, momentum as an EMA (lerp) with Nesterov, decoupled
weight decay lr * wd, and the learning-rate adjustment sqrt(max(1, fan_out / fan_in)).

Schedules (all start with a linear warmup from ~0 to lr):
- cosine: lr follows half a cosine down to lr * min_lr_ratio at max_steps.
- wsd (warmup-stable-decay): constant lr, then a linear decay over the last decay_frac of
  the run (MiniCPM / DeepSeek); a checkpoint before the decay can be continued cheaply.
- constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # maximise the slope at 0; torch.optim.Muon's and Keller Jordan's
# Newton-Schulz acts on each singular value s (of g / ||g||_F) alone, as s -> a s + b s^3 + c s^5.
# Five steps map every s >= NS_FLOOR into NS_BAND (not to 1: the quintic trades exact convergence
# for speed); smaller ones (directions with ~no gradient) stay below it.
NS_FLOOR = 3e-3
NS_BAND = (0.68, 1.21)


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


def _adamw(groups: list[dict], model: nn.Module, lr: float, betas: tuple[float, float], eps: float):
    """AdamW, fused (one kernel over all tensors) on CPU and CUDA, else the multi-tensor foreach
    path (sharded DTensor parameters, other devices). On 2 CPU cores the fused step over
    bench_train's GPT-2-style model (16.8M parameters) took 11 ms against foreach's 56 ms, the
    same values to within one fp32 rounding."""
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda") and not _has_dtensor(model)
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def _has_dtensor(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def muon_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(Linear weights, expert stacks, everything else) of `model`: the first two get Muon
    (expert stacks (E, in, out) per expert), the rest AdamW. Muon takes the >= 2-D weights of
    modules other than embeddings, the LM head and MoE routers."""
    adam_ids: set[int] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or leaf in ("lm_head", "router"):
            adam_ids.update(id(p) for p in module.parameters(recurse=False))
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "tok_emb"):  # a tied head is the embedding, already AdamW's
        adam_ids.update(id(p) for p in model.tok_emb.parameters())
    linear, experts, rest, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in adam_ids or p.dim() < 2:  # norms and biases are vectors
            rest.append(p)
        elif p.dim() == 2:
            linear.append(p)
        elif p.dim() == 3:
            experts.append(p)
        else:
            rest.append(p)
    return linear, experts, rest


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
    *,
    optimizer: str = "adamw",
    muon: dict | None = None,
) -> torch.optim.Optimizer | Optimizers:
    """AdamW on everything, or (optimizer="muon") Muon on the hidden matrices, with the options in
    `muon` (lr, momentum, nesterov, weight_decay, ns_steps), and AdamW at `lr` on the rest."""
    if optimizer == "adamw":
        return _adamw(param_groups(model, weight_decay), model, lr, betas, eps)
    if optimizer != "muon":
        raise ValueError(f"unknown optimizer {optimizer!r}; choose adamw or muon")
    if _has_dtensor(model):
        raise ValueError(
            "optimizer=muon needs each weight matrix whole for Newton-Schulz, but parallel=fsdp shards them; "
            "use parallel=ddp, or optimizer=adamw with fsdp"
        )
    linear, experts, rest = muon_groups(model)
    opts = dict(muon or {})
    groups = [{"params": linear, "fan_in_dim": -1}, {"params": experts, "fan_in_dim": -2}]
    muon_opt = Muon([g for g in groups if g["params"]], **opts)
    rest_ids = {id(p) for p in rest}
    adam_groups = [
        {**g, "params": [p for p in g["params"] if id(p) in rest_ids]} for g in param_groups(model, weight_decay)
    ]
    # no empty groups (e.g. no decayed matrix left when the head is tied): torch's checkpoint
    # state_dict cannot split several optimizers' state when one holds an empty group
    adam_groups = [g for g in adam_groups if g["params"]]
    return Optimizers([muon_opt, _adamw(adam_groups, model, lr, betas, eps)])


def muon_options(cfg) -> dict:
    """Muon's settings from a TrainConfig's muon_* knobs."""
    return dict(
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        weight_decay=cfg.muon_weight_decay,
        ns_steps=cfg.muon_ns_steps,
    )


class Optimizers:
    """Several optimizers stepped as one: the trainer sees one `param_groups` list (each group's
    `peak_lr` is its schedule's peak), and checkpoints save them together
    (torch.distributed.checkpoint.state_dict takes the list in `optimizers`)."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with g's singular vectors: U S' V^T where g = U S V^T
    and S' lies in NS_BAND for every singular value at least NS_FLOOR of g's Frobenius norm. Works on
    the last two dims (a batch of matrices). bfloat16 on GPUs (as in torch.optim.Muon), float32 on
    CPUs (bf16 matmul is slow there)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for >= 2-D parameters (the last two dims are one matrix; leading dims a batch of them).

    Per step: buf = lerp(buf, grad, 1 - momentum); u = lerp(grad, buf, momentum) if nesterov else buf;
    p *= 1 - lr * weight_decay; p -= lr * sqrt(max(1, fan_out / fan_in)) * newton_schulz(u).
    A group's `fan_in_dim` says which of the last two dims is the input (-1 for nn.Linear's
    (out, in); -2 for expert stacks laid out (E, in, out))."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or not 1 <= ns_steps < 100:
            raise ValueError(
                f"bad Muon settings lr={lr} momentum={momentum} weight_decay={weight_decay} ns_steps={ns_steps}: "
                "need lr > 0, 0 <= momentum < 1, weight_decay >= 0, 1 <= ns_steps < 100"
            )
        defaults = dict(lr=lr, peak_lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        defaults |= dict(ns_steps=ns_steps, fan_in_dim=-1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices, not a parameter of shape {tuple(p.shape)}; use AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                u = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                fan_in = p.size(group["fan_in_dim"])
                fan_out = p.size(-2 if group["fan_in_dim"] == -1 else -1)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(newton_schulz(u, group["ns_steps"]).to(p.dtype), alpha=-lr * max(1.0, fan_out / fan_in) ** 0.5)
        return loss


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
