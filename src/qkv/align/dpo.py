"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge / robust variants.

The reference model is the starting policy (normally the SFT model). Its sequence
log-probs of every chosen and rejected response are computed once, before training,
and stored with the pairs, so training holds only the policy in memory and a resumed
run reuses the same numbers. Then per batch, with h = beta * (chosen log-ratio -
rejected log-ratio), losses.dpo_loss gives -log sigmoid(h) (or the variants) and the
implicit rewards, their margin and accuracy, which are logged.
"""

from __future__ import annotations

import torch

from qkv.align.data import IndexSampler, Preference, check_same_vocab, epochs_to_steps, require_trained_tokens
from qkv.align.losses import dpo_loss
from qkv.align.policy import sequence_logprobs
from qkv.align.reward import encode_pairs, pair_batch
from qkv.lora import adapters_disabled, has_lora


@torch.no_grad()
def reference_logprobs(
    ref_model, pairs: list[tuple], pad_id: int, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """(N, 2): reference sequence log-probs of (chosen, rejected) for every pair (a progress
    bar when asked: for an imported 100M+ model this pass takes minutes on a CPU)."""
    from tqdm import tqdm

    was = ref_model.training
    ref_model.eval()
    dev = next(ref_model.parameters()).device
    out = []
    for s in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", unit="batch", disable=not progress):
        b = {k: v.to(dev) for k, v in pair_batch(pairs[s : s + batch_size], pad_id).items()}
        c, r = sequence_logprobs(ref_model, b).chunk(2)
        out.append(torch.stack([c, r], 1).cpu())
    ref_model.train(was)
    return torch.cat(out)


def make_dpo_loss(beta: float, loss_type: str, label_smoothing: float):
    def loss_fn(model, batch):
        lp = sequence_logprobs(model, batch)
        pc, pr = lp.chunk(2)
        n = batch["mask"][:, 1:].sum(1).float()
        nc, nr = n.chunk(2)
        out = dpo_loss(pc, pr, batch["ref"][:, 0], batch["ref"][:, 1], beta, loss_type, label_smoothing, nc, nr)
        return out.loss, {
            "tokens": int(batch["ids"].numel()),
            "rewards_chosen": out.chosen_rewards.mean().item(),
            "rewards_rejected": out.rejected_rewards.mean().item(),
            "rewards_margin": out.margin,
            "rewards_accuracy": out.accuracy,
            "logps_chosen": pc.mean().item(),
            "logps_rejected": pr.mean().item(),
        }

    return loss_fn


def run_dpo(
    model,
    tokenizer,
    prefs: list[Preference],
    cfg,
    ref_model=None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    heldout=None,
    resume: bool = False,
    epochs: float | None = None,
    max_steps_cap: int | None = None,
):
    """Train `model` in place with DPO against `ref_model` (default: a frozen copy of `model`
    as it is now; for a model with LoRA adapters, the model itself with its adapters off).
    cfg: qkv.train.TrainConfig. Returns the TrainResult. epochs: that many
    passes over the pairs instead of cfg.max_steps, but no more than max_steps_cap steps."""
    import copy

    from qkv.train import Trainer

    max_len = min(cfg.seq_len, model.cfg.max_seq_len)
    pairs = encode_pairs(tokenizer, prefs, max_len)
    require_trained_tokens(sum(any(p[1]) and any(p[3]) for p in pairs), len(pairs), max_len, "pairs")
    cfg = epochs_to_steps(cfg, epochs, len(pairs), max_steps_cap)
    pad_id = tokenizer.pad_id
    micro = cfg.batch_size // cfg.grad_accum
    sampler = IndexSampler(len(pairs), micro, cfg.grad_accum, cfg.seed)
    # the reference scores, once, up front, of the pairs the run's steps will draw (a short run
    # on a large file draws few: 40 steps of 4 from 2,000 pairs); the others are never read
    used = sorted({i for step in range(cfg.max_steps) for m in range(cfg.grad_accum) for i in sampler(step, m)})
    ref = torch.full((len(pairs), 2), float("nan"))
    if ref_model is None and has_lora(model):  # the frozen base is the reference: adapters off, no copy
        with adapters_disabled(model):
            ref[used] = reference_logprobs(model, [pairs[i] for i in used], pad_id, progress=cfg.progress)
    else:
        if ref_model is None:
            ref_model = copy.deepcopy(model)
        check_same_vocab(model, ref_model, "the policy", "the reference model")
        ref[used] = reference_logprobs(ref_model, [pairs[i] for i in used], pad_id, progress=cfg.progress)
        del ref_model

    def get_batch(step, m):
        idx = sampler(step, m)
        b = pair_batch([pairs[i] for i in idx], pad_id)
        b["ref"] = ref[idx]
        return b

    eval_batch = None
    if heldout:
        hp = encode_pairs(tokenizer, heldout, max_len)
        with adapters_disabled(model):  # policy == reference before training (a LoRA policy: adapters off)
            href = reference_logprobs(model, hp, pad_id)
        per = max(1, -(-len(hp) // cfg.eval_steps))

        def eval_batch(i):
            s = (i * per) % len(hp)
            b = pair_batch(hp[s : s + per], pad_id)
            b["ref"] = href[s : s + per]
            return b

    trainer = Trainer(
        model,
        cfg,
        make_dpo_loss(beta, loss_type, label_smoothing),
        get_batch,
        eval_batch=eval_batch,
        tokenizer=tokenizer,
        resume=resume,
        extra_state={"stage": "dpo", "beta": beta, "loss_type": loss_type, "pairs": len(pairs)},
    )
    return trainer.fit()
