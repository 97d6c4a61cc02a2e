"""Reward model: the transformer + a scalar head, trained with the Bradley-Terry loss.

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m)  (+ c * (r_w + r_l)^2 to centre)

on {"prompt", "chosen", "rejected"} pairs (a per-pair "margin" field is used when
present, as in TRL). The reward is read at the last token of prompt + response, which
for every response is its end-of-turn token, exactly as in a sampled rollout. Reports
held-out pairwise accuracy and mean margin (saved next to the weights in head.json).
"""

from __future__ import annotations

import torch

from qkv.align.data import (
    IndexSampler,
    Preference,
    batch_sequences,
    encode_response,
    epochs_to_steps,
    require_chat_template,
    require_trained_tokens,
)
from qkv.align.losses import reward_loss
from qkv.align.policy import RewardModel


def encode_pairs(tokenizer, prefs: list[Preference], max_len: int) -> list[tuple]:
    """Per pair: (chosen ids, chosen mask, rejected ids, rejected mask)."""
    require_chat_template(tokenizer)
    out = []
    for p in prefs:
        ci, cm = encode_response(tokenizer, p.prompt, p.chosen, max_len)
        ri, rm = encode_response(tokenizer, p.prompt, p.rejected, max_len)
        out.append((ci, cm, ri, rm))
    return out


def pair_batch(pairs: list[tuple], pad_id: int, margins: list[float] | None = None) -> dict:
    """Chosen rows first, then rejected rows, in one right-padded batch."""
    ids = [p[0] for p in pairs] + [p[2] for p in pairs]
    masks = [p[1] for p in pairs] + [p[3] for p in pairs]
    b = batch_sequences(ids, masks, pad_id)
    if margins is not None:
        b["margin"] = torch.tensor(margins, dtype=torch.float32)
    return b


def make_reward_loss(center_coef: float | None = None, margin: float = 0.0):
    def loss_fn(model, batch):
        r = model.rewards(batch["ids"], batch["key_padding"])
        rc, rr = r.chunk(2)
        m = batch.get("margin", margin if margin else None)
        loss = reward_loss(rc, rr, m, center_coef)
        return loss, {
            "tokens": int(batch["ids"].numel()),
            "accuracy": (rc > rr).float().mean().item(),
            "margin": (rc - rr).mean().item(),
        }

    return loss_fn


@torch.no_grad()
def evaluate_pairs(model: RewardModel, tokenizer, prefs: list[Preference], batch_size: int = 64) -> dict:
    """Held-out pairwise accuracy (ties count half) and mean margin r_w - r_l."""
    was = model.training
    model.eval()
    pairs = encode_pairs(tokenizer, prefs, model.cfg.max_seq_len)
    dev = next(model.parameters()).device
    acc, margin = 0.0, 0.0
    for s in range(0, len(pairs), batch_size):
        b = pair_batch(pairs[s : s + batch_size], tokenizer.pad_id)
        rc, rr = model.rewards(b["ids"].to(dev), b["key_padding"].to(dev)).chunk(2)
        acc += ((rc > rr).float() + 0.5 * (rc == rr).float()).sum().item()
        margin += (rc - rr).sum().item()
    model.train(was)
    return {"accuracy": acc / len(pairs), "margin": margin / len(pairs), "pairs": len(pairs)}


@torch.no_grad()
def score(
    model: RewardModel, tokenizer, prompts: list[list[dict]], responses: list[str], batch_size: int = 64
) -> torch.Tensor:
    pairs = [
        encode_response(tokenizer, p, [{"role": "assistant", "content": r}], model.cfg.max_seq_len)
        for p, r in zip(prompts, responses)
    ]
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(pairs), batch_size):
        b = batch_sequences(
            [p[0] for p in pairs[s : s + batch_size]], [p[1] for p in pairs[s : s + batch_size]], tokenizer.pad_id
        )
        out.append(model.rewards(b["ids"].to(dev), b["key_padding"].to(dev)).cpu())
    return torch.cat(out)


def run_reward(
    model: RewardModel,
    tokenizer,
    prefs: list[Preference],
    cfg,
    heldout: list[Preference] | None = None,
    margins: list[float] | None = None,
    margin: float = 0.0,
    center_coef: float | None = None,
    resume: bool = False,
    epochs: float | None = None,
    max_steps_cap: int | None = None,
):
    """Train `model` (a RewardModel, e.g. policy.from_transformer(RewardModel, sft_model)) in
    place; returns (TrainResult, held-out metrics or None). cfg: qkv.train.TrainConfig.
    epochs: that many passes over the pairs instead of cfg.max_steps, at most max_steps_cap."""
    from qkv.train import Trainer

    max_len = min(cfg.seq_len, model.cfg.max_seq_len)
    pairs = encode_pairs(tokenizer, prefs, max_len)
    require_trained_tokens(sum(any(p[1]) and any(p[3]) for p in pairs), len(pairs), max_len, "pairs")
    cfg = epochs_to_steps(cfg, epochs, len(pairs), max_steps_cap)
    micro = cfg.batch_size // cfg.grad_accum
    sampler = IndexSampler(len(pairs), micro, cfg.grad_accum, cfg.seed)
    pad_id = tokenizer.pad_id

    def get_batch(step, m):
        idx = sampler(step, m)
        return pair_batch([pairs[i] for i in idx], pad_id, None if margins is None else [margins[i] for i in idx])

    eval_batch = None
    if heldout:
        hp = encode_pairs(tokenizer, heldout, max_len)
        per = max(1, -(-len(hp) // cfg.eval_steps))

        def eval_batch(i):
            s = (i * per) % len(hp)
            return pair_batch(hp[s : s + per], pad_id)

    loss_fn = make_reward_loss(center_coef, margin)
    trainer = Trainer(
        model,
        cfg,
        loss_fn,
        get_batch,
        eval_batch=eval_batch,
        tokenizer=tokenizer,
        extra_state={"stage": "reward", "pairs": len(pairs)},
        resume=resume,
    )
    result = trainer.fit()
    metrics = evaluate_pairs(model, tokenizer, heldout) if heldout else None
    from qkv.align.policy import save_reward_model

    # the trainer's final save wrote these weights (score head included) once; add the head marker
    save_reward_model(cfg.out_dir, model, tokenizer, {"heldout": metrics} if metrics else None, weights=False)
    return result, metrics
