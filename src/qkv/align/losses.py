"""Alignment losses and the PPO/GRPO arithmetic, as plain tensor functions.

Everything here works on per-sequence or per-token tensors that the stages compute from
a model (see align/policy.py); nothing here calls a model. Conventions:

- Per-token tensors are (B, T) over *response* positions; `mask` is 1 on real response
  tokens and 0 on padding (prompts are never in these tensors, or are masked out).
- Sequence log-prob = sum over response tokens of log pi(token) (`masked_sum`).
- Formulas and defaults follow the papers (Rafailov et al. 2023 for DPO, Azar et al. 2023
  for IPO, Ziegler et al. 2019 and Huang et al. 2024 for PPO, Shao et al. 2024 for GRPO)
  and match TRL's implementations where TRL has one (tests check parity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


# --- masked reductions ----------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, denom: float | None = None
) -> torch.Tensor:
    """Mean of x over mask. `denom` overrides the count: pass the token count of the whole
    batch when accumulating gradients over micro-batches, so that the summed micro-batch
    losses equal the full-batch token mean exactly."""
    if denom is not None:
        return masked_sum(x, mask, dim) / denom
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:  # Bessel's correction, as TRL's masked_var
        n = mask.sum()
        if n < 2:
            raise ValueError("whitening needs at least 2 unmasked values; use a larger batch")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries (Bessel-corrected variance, as TRL's
    masked_whiten). shift_mean=False keeps the original mean (used for rewards). Masked
    entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --- token log-probs ------------------------------------------------------------------
def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets], computed in fp32. logits (..., V), targets (...).
    Dividing by the sampling temperature makes these the log-probs of the distribution the
    engine actually sampled from (TRL's PPO does the same)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --- reward model (Bradley-Terry) -----------------------------------------------------
def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float | None = None,
) -> torch.Tensor:
    """-log sigmoid(r_w - r_l - m), batch mean; + c * mean((r_w + r_l)^2) when center_coef
    is set (TRL's center_rewards_coefficient)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# --- DPO and variants -----------------------------------------------------------------
@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, batch mean
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # beta * (log pi - log pi_ref), detached, (B,)
    rejected_rewards: torch.Tensor

    @property
    def margin(self) -> float:
        return (self.chosen_rewards - self.rejected_rewards).mean().item()

    @property
    def accuracy(self) -> float:
        return (self.chosen_rewards > self.rejected_rewards).float().mean().item()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO-family losses on sequence log-probs (B,) of chosen and rejected responses.

    h = beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]
      sigmoid: -log sigmoid(h)                          (Rafailov et al.)
      hinge:   max(0, 1 - h)                            (SLiC)
      robust:  [-(1-e) log sigmoid(h) + e log sigmoid(-h)] / (1 - 2e)   (label smoothing e)
      ipo:     (d - 1/(2 beta))^2 with d the log-ratio difference. qkv uses TRL's
               length-normalised d (each log-ratio divided by its response's token count)
               when chosen_len/rejected_len are given -- the DPO stage always passes them --
               and the paper's unnormalised d otherwise.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        if chosen_len is not None and rejected_len is not None:
            delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose sigmoid, ipo, hinge or robust")
    return DPOOutput(losses.mean(), losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# --- KL estimators and controllers ----------------------------------------------------
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log pi - log pi_ref: unbiased for KL(pi||ref) under samples from pi,
    negative on some samples."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (exp(-r) - 1) + r with r = log pi - log pi_ref: unbiased, always >= 0,
    lower variance (Schulman's estimator, used by GRPO)."""
    log_ratio = logp - ref_logp
    return torch.expm1(-log_ratio) + log_ratio


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1 or k3")


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController:
    def __init__(self, kl_coef: float = 0.05):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# --- PPO ------------------------------------------------------------------------------
def apply_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of responses that never emitted EOS (TRL's
    missing_eos_penalty): truncated rambling must not out-score a finished answer."""
    if penalty is None:
        return scores
    return torch.where(has_eos.bool(), scores, scores - penalty)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * kl_t on response tokens, plus the sequence score on the last one.
    Returns (rewards (B, T), non-score rewards (B, T))."""
    non_score = -kl_coef * kl * mask
    last = (mask.cumsum(1) * mask).argmax(1)  # index of the last response token
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (B, T), right-padded.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lam)^l delta_{t+l},  R_t = A_t + V_t.
    V after the last response token is 0 (no bootstrap, as TRL). Returns (advantages, returns),
    zero on padding."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    clip_frac: torch.Tensor  # fraction of tokens where the clipped branch was taken
    approx_kl: torch.Tensor  # 0.5 * mean (log pi - log pi_old)^2 (TRL's approxkl)
    ratio_mean: torch.Tensor


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    denom: float | None = None,
) -> PolicyLossOutput:
    """Token mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = exp(log pi - log pi_old)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(loss1, loss2), mask, denom=denom)
    with torch.no_grad():
        clip_frac = masked_mean((loss2 > loss1).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, clip_frac, approx_kl, ratio_mean)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    denom: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * token mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2); returns (loss, clip_frac)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask, denom=denom)
    with torch.no_grad():
        clip_frac = masked_mean((l2 > l1).float(), mask)
    return loss, clip_frac


# --- GRPO -----------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps) for rewards laid out as consecutive
    groups of `group_size` samples of the same prompt (std unbiased, eps = 1e-4, as TRL)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
) -> tuple[torch.Tensor, dict]:
    """Clipped-ratio objective with the sequence advantage on every token, plus beta * k3 KL
    to the reference. Normalised per token over the batch (TRL's loss_type "bnpo"/DAPO style),
    so long and short responses weigh by their token count."""
    adv = advantages[:, None].expand_as(logp)
    pol = ppo_policy_loss(logp, old_logp, adv, mask, clip)
    loss, kl = pol.loss, torch.zeros(())
    if ref_logp is not None and beta:
        kl = masked_mean(kl_k3(logp, ref_logp), mask)
        loss = loss + beta * kl
    return loss, {"clip_frac": pol.clip_frac.item(), "approx_kl": pol.approx_kl.item(), "kl": float(kl.detach())}
