"""Log-likelihood of continuations given contexts, the way lm-evaluation-harness computes it,
with each context run once however many continuations it has.

Tokenization follows the harness (HFLM._encode_pair): trailing spaces of the context move to
the continuation, context and continuation are tokenized together, and the continuation's
tokens are what follows the context's own token count. An empty context is the end-of-text
token. The model reads context tokens then continuation tokens; a continuation's
log-likelihood is the sum of its tokens' log-probabilities (log-softmax in fp32), and it is
"greedy" when every token is the argmax.

The shared-prefix forward: all requests of one question are packed into one row, each
distinct context once, followed by the continuations that score against it. A token of a
continuation attends to its context and to its own earlier tokens, never to a sibling
continuation, and positions restart where the harness's would (context then continuation),
so each log-likelihood equals scoring that (context, continuation) alone. A continuation's
last token enters the row only as a target (no position reads the trunk at it, as in the
harness, which feeds context + continuation minus its last token). Rows of several
questions are batched with padding; only the positions that predict a continuation token
go through the output head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qkv.infer.backend import prepare_for_inference


@dataclass
class Scored:
    loglik: float  # sum of the continuation tokens' log-probabilities (nats)
    is_greedy: bool  # every continuation token was the model's argmax
    n_tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as the harness splits them. The BOS token leads
    the context when the tokenizer adds one by default (Gemma's does, SmolLM2's does not), as
    the harness's `hf` backend encodes."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special=True)
    ctx = tokenizer.encode(context, add_special=True)
    return ctx, whole[len(ctx) :]


@dataclass
class _Unit:
    """One context and the continuations scored against it (indices into the request list)."""

    context: list[int]
    continuations: list[list[int]]
    requests: list[int]


def _units(encoded: Sequence[tuple[list[int], list[int]]], indices: Sequence[int], max_len: int) -> list[_Unit]:
    """Group a question's requests by identical context; left-truncate to the model's context."""
    by_context: dict[tuple[int, ...], _Unit] = {}
    for i in indices:
        ctx, cont = encoded[i]
        unit = by_context.setdefault(tuple(ctx), _Unit(list(ctx), [], []))
        unit.continuations.append(list(cont))
        unit.requests.append(i)
    for unit in by_context.values():
        longest = max(len(c) for c in unit.continuations)
        if longest >= max_len:
            raise ValueError(f"a continuation of {longest} tokens does not fit the model's context of {max_len}")
        unit.context = unit.context[-(max_len - longest) :]
    return list(by_context.values())


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    unit: list[int]  # which unit each token belongs to (-1: padding)
    branch: list[int]  # -1: the unit's context, else which continuation
    predict_at: list[int]  # row index whose output predicts target[j]
    target: list[int]
    target_request: list[int]


def _pack(units: list[_Unit]) -> _Row:
    row = _Row([], [], [], [], [], [], [])
    for u_id, unit in enumerate(units):
        start = len(row.tokens)
        n_ctx = len(unit.context)
        row.tokens += unit.context
        row.positions += range(n_ctx)
        row.unit += [u_id] * n_ctx
        row.branch += [-1] * n_ctx
        last_ctx = start + n_ctx - 1
        for b, (cont, req) in enumerate(zip(unit.continuations, unit.requests)):
            # a continuation's last token is only a target: nothing reads the trunk at it
            inputs = cont[:-1]
            at = len(row.tokens)
            row.tokens += inputs
            row.positions += range(n_ctx, n_ctx + len(inputs))
            row.unit += [u_id] * len(inputs)
            row.branch += [b] * len(inputs)
            row.predict_at += [last_ctx] + list(range(at, at + len(inputs)))
            row.target += cont
            row.target_request += [req] * len(cont)
    return row


def _batch_tensors(rows: list[_Row], pad_id: int):
    T = max(len(r.tokens) for r in rows)

    def padded(xs: list[int], fill: int) -> list[int]:
        return xs + [fill] * (T - len(xs))

    tokens = torch.tensor([padded(r.tokens, pad_id) for r in rows])
    positions = torch.tensor([padded(r.positions, 0) for r in rows])
    unit = torch.tensor([padded(r.unit, -1) for r in rows])
    branch = torch.tensor([padded(r.branch, -1) for r in rows])
    same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, None, :] >= 0)
    earlier = positions[:, None, :] <= positions[:, :, None]
    visible_branch = (branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None])
    mask = same_unit & earlier & visible_branch
    mask |= torch.eye(T, dtype=torch.bool)[None]  # a padding query sees itself (no empty softmax row)
    return tokens, positions, mask[:, None]


VOCAB_TILE = 2048  # head rows per tile: a tile's logits for a batch's positions stay in cache


def target_logprobs(model, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's log-probability of its target (fp32) and whether the target is the
    model's argmax (the first maximum, as torch.argmax picks it), from the output head a tile
    of vocabulary rows at a time: a running log-sum-exp, the best logit so far and the target's
    logit. The whole (positions, vocab) logits are never held: at SmolLM2's 49,152 entries and
    a batch's ~900 positions they are 177 MB, written by the product and read back by each
    softmax pass (a tile's are 7 MB). On 900 positions of SmolLM2 on an AMD EPYC this took
    468-502 ms against 542-671 for the whole logits and a log_softmax."""
    weight = model.loss_weight()  # a tensor, or quantized blocks lent a tile of rows at a time

    def tile_rows(start: int, stop: int) -> torch.Tensor:
        return weight[start:stop] if isinstance(weight, torch.Tensor) else weight.rows(start, stop)

    vocab, group = weight.shape[0], 1 if isinstance(weight, torch.Tensor) else max(1, weight.group)
    tile = max(group, VOCAB_TILE // group * group)
    n = h.shape[0]
    positions = torch.arange(n)
    lse = torch.full((n,), float("-inf"))
    best = torch.full((n,), float("-inf"))
    best_id = torch.zeros(n, dtype=torch.long)
    target_logit = torch.zeros(n)
    for start in range(0, vocab, tile):
        stop = min(start + tile, vocab)
        logits = model.softcap(F.linear(h, tile_rows(start, stop).to(h.dtype))).float()
        lse = torch.logaddexp(lse, torch.logsumexp(logits, 1))
        tile_best, tile_id = logits.max(1)
        better = tile_best > best  # strictly: an earlier tile keeps a tie, as argmax does
        best = torch.where(better, tile_best, best)
        best_id = torch.where(better, tile_id + start, best_id)
        here = (target >= start) & (target < stop)
        target_logit[here] = logits[positions[here], target[here] - start]
    return target_logit - lse, best_id == target


@torch.inference_mode()
def score_rows(model, rows: list[_Row], pad_id: int) -> dict[int, Scored]:
    """One batched forward over packed rows: {request index: its score}."""
    tokens, positions, mask = _batch_tensors(rows, pad_id)
    h = model.hidden(tokens, positions=positions, mask=mask)
    row_idx = torch.cat([torch.full((len(r.predict_at),), b) for b, r in enumerate(rows)])
    col_idx = torch.tensor([c for r in rows for c in r.predict_at])
    target = torch.tensor([t for r in rows for t in r.target])
    requests, local = torch.unique(torch.tensor([q for r in rows for q in r.target_request]), return_inverse=True)
    token_lp, greedy = target_logprobs(model, h[row_idx, col_idx], target)
    token_lp = token_lp.double()
    miss = (~greedy).long()
    n = len(requests)
    loglik = torch.zeros(n, dtype=torch.float64).index_add_(0, local, token_lp)
    misses = torch.zeros(n, dtype=torch.long).index_add_(0, local, miss)
    count = torch.zeros(n, dtype=torch.long).index_add_(0, local, torch.ones_like(local))
    return {
        int(q): Scored(float(loglik[i]), int(misses[i]) == 0, int(count[i])) for i, q in enumerate(requests.tolist())
    }


def loglikelihoods(
    model,
    tokenizer,
    questions: Sequence[Sequence[tuple[str, str]]],
    batch_size: int = 8,
    on_question: Callable[[int], None] | None = None,
) -> list[list[Scored]]:
    """Score every (context, continuation) of every question (text in, harness tokenization)."""
    eot = tokenizer.eos_id if tokenizer.eos_id is not None else (tokenizer.bos_id or 0)
    encoded = []
    for pairs in questions:
        enc = []
        for context, continuation in pairs:
            ctx, cont = encode_pair(tokenizer, context, continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens; nothing to score")
            enc.append((ctx or [eot], cont))
        encoded.append(enc)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else eot
    return score_token_ids(model, encoded, batch_size, pad_id, on_question)


def score_token_ids(
    model,
    questions: Sequence[Sequence[tuple[list[int], list[int]]]],
    batch_size: int = 8,
    pad_id: int = 0,
    on_question: Callable[[int], None] | None = None,
) -> list[list[Scored]]:
    """Score (context ids, continuation ids) pairs: one packed row per question, `batch_size`
    questions per forward (rows of similar length batched together)."""
    prepare_for_inference(model.eval())
    flat = [pair for pairs in questions for pair in pairs]
    owner = [q for q, pairs in enumerate(questions) for _ in pairs]
    by_question: list[list[int]] = [[] for _ in questions]
    for i, q in enumerate(owner):
        by_question[q].append(i)
    rows = [_pack(_units(flat, idx, model.cfg.max_seq_len)) for idx in by_question]
    order = sorted(range(len(rows)), key=lambda q: len(rows[q].tokens))
    results: list[Scored | None] = [None] * len(flat)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, s in score_rows(model, [rows[q] for q in batch], pad_id).items():
            results[i] = s
        if on_question is not None:
            on_question(len(batch))
    out: list[list[Scored]] = [[] for _ in questions]
    for i, q in enumerate(owner):
        out[q].append(results[i])
    return out
