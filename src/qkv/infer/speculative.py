"""Speculative decoding: a small draft model proposes k tokens, the target model checks
them all in one forward pass (Leviathan et al. 2023; Chen et al. 2023).

For each drafted token d_i (drawn from the draft's distribution q_i) the target's
distribution p_i decides: accept with probability min(1, p_i(d_i) / q_i(d_i)); on the
first rejection draw a replacement from normalize(max(0, p_i - q_i)) and stop; if all k
are accepted, draw one bonus token from p_{k+1}. Every emitted token is then
distributed exactly as the target alone would sample it. With greedy decoding p and q
are one-hot, so a draft token is kept iff it is the target's argmax: the output is
identical to the target's own greedy output, only faster when the draft agrees often.

Both models keep a contiguous KV cache; rejected tokens are dropped by moving the
cache position back.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from qkv.infer.generate import end_set, forward_step
from qkv.infer.kv_cache import KVCache
from qkv.infer.sampling import SamplingParams, make_generator, token_probs


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.drafted)


def accept_reject(
    drafts: list[int], qs: list[torch.Tensor], ps: list[torch.Tensor], generator: torch.Generator | None
) -> tuple[list[int], int]:
    """The accept/reject rule. ps has one more row than drafts (the bonus position).
    Returns (accepted drafts, the extra token sampled from the target)."""
    for i, d in enumerate(drafts):
        p, q = ps[i], qs[i]
        u = torch.rand((), generator=generator)
        if u * q[d] <= p[d]:  # u < p/q without dividing by a tiny q
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:  # p == q numerically: any draw from p is right
            residual = p
        return drafts[:i], int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return drafts, int(torch.multinomial(ps[len(drafts)], 1, generator=generator))


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    prompt_ids: list[int],
    params: SamplingParams,
    k: int = 4,
    eos_id: int | Collection[int] | None = None,
) -> tuple[list[int], SpecStats]:
    """Generate with the target's distribution, proposing k tokens at a time with the draft."""
    params.validate()
    if params.constraint is not None:
        raise ValueError(
            "speculative decoding does not verify drafts under a grammar; drop the draft model "
            "or the constraint (--json-schema/--regex/--choice)"
        )
    if k < 1:
        raise ValueError(f"k={k}: the draft must propose at least one token")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(
            f"draft vocab {draft.cfg.vocab_size} != target vocab {target.cfg.vocab_size}; "
            "the draft must share the target's tokenizer"
        )
    max_len = min(target.cfg.max_seq_len, draft.cfg.max_seq_len, len(prompt_ids) + params.max_tokens)
    if not prompt_ids or len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context; shorten it")
    dev = next(target.parameters()).device
    tc = KVCache(target.cfg, max_len + k, device=dev, dtype=next(target.parameters()).dtype)
    dc = KVCache(draft.cfg, max_len + k, device=dev, dtype=next(draft.parameters()).dtype)
    gen = make_generator(params.seed if params.seed is not None else int(torch.randint(2**62, (1,))), dev)
    stops = set(params.stop_token_ids) | (end_set(eos_id) if not params.ignore_eos else set())
    ids = list(prompt_ids)
    n0 = len(ids)
    stats = SpecStats()

    def probs(logits, out):
        return token_probs(logits.float(), params, prompt_ids, out)

    while True:
        kk = min(k, max_len - len(ids) - 1)  # room for kk drafts + 1 target token
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        if kk > 0:
            logits = forward_step(draft, dc, torch.tensor([ids[dc.pos :]], device=dev), last_only=True)[0, -1]
            for i in range(kk):
                q = probs(logits, ids[n0:] + drafts)
                d = int(torch.multinomial(q, 1, generator=gen)) if not params.greedy else int(q.argmax())
                drafts.append(d)
                qs.append(q)
                if i < kk - 1:
                    logits = forward_step(draft, dc, torch.tensor([[d]], device=dev))[0, -1]
        logits = forward_step(target, tc, torch.tensor([ids[tc.pos :] + drafts], device=dev))[0, -(kk + 1) :]
        ps = [probs(logits[i], ids[n0:] + drafts[:i]) for i in range(kk + 1)]
        accepted, extra = accept_reject(drafts, qs, ps, gen)
        stats.rounds += 1
        stats.drafted += kk
        stats.accepted += len(accepted)
        new = accepted + [extra]
        for j, t in enumerate(new):  # cut at a stop token or the token limit
            if t in stops or len(ids) + j + 1 - n0 >= params.max_tokens or len(ids) + j + 1 >= max_len:
                ids += new[: j + 1]
                return ids[n0:], stats
        ids += new
        tc.truncate(len(ids) - 1)  # keep K/V only for tokens that are really in the text
        dc.truncate(len(ids) - 1)
