"""Supervised fine-tuning: next-token loss on assistant tokens only.

Conversations are rendered with the tokenizer's chat template; `Tokenizer.encode_chat`
marks the assistant replies (and the end-of-turn after each, so the model learns to
stop). Prompt, system and padding tokens carry no loss. Optional packing puts several
conversations in one row with a block-diagonal causal mask and positions restarting per
conversation, so a packed batch computes the same per-token losses as an unpacked one,
without padding. Training itself is the shared loop (qkv.train.Trainer): checkpoints,
exact resume, metrics.jsonl.
"""

from __future__ import annotations

import torch

from qkv.align.data import (
    IndexSampler,
    batch_sequences,
    epochs_to_steps,
    pack_sequences,
    pad,
    require_chat_template,
    require_trained_tokens,
)
from qkv.model.loss import fused_linear_cross_entropy


def encode_conversations(tokenizer, conversations: list[list[dict]], max_len: int) -> tuple[list, list]:
    require_chat_template(tokenizer)
    ids, masks = [], []
    for msgs in conversations:
        i, m = tokenizer.encode_chat(msgs)
        ids.append(i[:max_len])
        masks.append(m[:max_len])
    return ids, masks


def collate_packed(rows: list[dict], seq_len: int, pad_id: int) -> dict:
    ids = pad([r["ids"] for r in rows], pad_id, seq_len)
    mask = pad([[int(x) for x in r["mask"]] for r in rows], 0, seq_len).bool()
    doc = pad([r["doc"] for r in rows], -1, seq_len)
    return {"ids": ids, "mask": mask, "doc": doc}


def _packed_positions_and_mask(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = doc.shape
    t = torch.arange(T, device=doc.device).expand(B, T)
    new = torch.ones_like(doc, dtype=torch.bool)
    new[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start = torch.where(new, t, torch.zeros_like(t)).cummax(1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    same = doc[:, :, None] == doc[:, None, :]
    return t - start, (same & causal)[:, None]


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the masked (assistant) tokens of a batch."""
    ids = batch["ids"]
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(~batch["mask"][:, 1:], -100)
    if "doc" in batch:
        positions, mask = _packed_positions_and_mask(batch["doc"][:, :-1])
        h = model.hidden(x, positions=positions, mask=mask)
    else:
        h = model.hidden(x, key_padding=batch["key_padding"][:, :-1])
    loss = fused_linear_cross_entropy(h, model.loss_weight(), y)
    aux = model.aux_loss() if model.training and hasattr(model, "aux_loss") else None
    if aux is not None:
        loss = loss + aux
    return loss, {"tokens": int(ids.numel()), "trained_tokens": float((y != -100).sum())}


@torch.no_grad()
def assistant_loss(
    model, tokenizer, conversations: list[list[dict]], batch_size: int = 32, max_len: int = 256
) -> float:
    """Mean per-token loss on assistant tokens (token-weighted over all conversations)."""
    ids, masks = encode_conversations(tokenizer, conversations, min(max_len, model.cfg.max_seq_len))
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(ids), batch_size):
        b = batch_sequences(ids[s : s + batch_size], masks[s : s + batch_size], tokenizer.pad_id)
        b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
        n = int(b["mask"][:, 1:].sum())
        loss, _ = sft_loss(model, b)
        total += loss.item() * n
        count += n
    model.train(was)
    return total / max(count, 1)


def run_sft(
    model,
    tokenizer,
    conversations: list[list[dict]],
    cfg,
    eval_conversations=None,
    packing: bool = False,
    resume: bool = False,
    epochs: float | None = None,
    max_steps_cap: int | None = None,
):
    """Fine-tune `model` in place on `conversations` with the shared Trainer; returns its TrainResult.
    cfg is a qkv.train.TrainConfig (seq_len = the maximum conversation length in tokens).
    epochs: train for that many passes over the data (rows when packing) instead of
    cfg.max_steps, but no more than max_steps_cap steps."""
    from qkv.train import Trainer

    max_len = min(cfg.seq_len, model.cfg.max_seq_len)
    ids, masks = encode_conversations(tokenizer, conversations, max_len)
    require_trained_tokens(sum(any(m[1:]) for m in masks), len(masks), max_len, "conversations")
    micro = cfg.batch_size // cfg.grad_accum
    pad_id = tokenizer.pad_id
    if packing:
        rows = pack_sequences(ids, masks, max_len, pad_id)
        cfg = epochs_to_steps(cfg, epochs, len(rows), max_steps_cap)
        sampler = IndexSampler(len(rows), micro, cfg.grad_accum, cfg.seed)

        def get_batch(step, m):
            return collate_packed([rows[i] for i in sampler(step, m)], max_len, pad_id)
    else:
        cfg = epochs_to_steps(cfg, epochs, len(ids), max_steps_cap)
        sampler = IndexSampler(len(ids), micro, cfg.grad_accum, cfg.seed)

        def get_batch(step, m):
            idx = sampler(step, m)
            return batch_sequences([ids[i] for i in idx], [masks[i] for i in idx], pad_id)

    eval_batch = None
    if eval_conversations:
        eids, emasks = encode_conversations(tokenizer, eval_conversations, max_len)
        per = max(1, -(-len(eids) // cfg.eval_steps))

        def eval_batch(i):
            s = (i * per) % len(eids)
            return batch_sequences(eids[s : s + per], emasks[s : s + per], pad_id)

    trainer = Trainer(
        model,
        cfg,
        sft_loss,
        get_batch,
        eval_batch=eval_batch,
        tokenizer=tokenizer,
        extra_state={"stage": "sft", "packing": packing, "examples": len(ids)},
        resume=resume,
    )
    return trainer.fit()
