"""Measuring a policy: gold reward, win-rate, KL to a reference, and the alignment tax.

- `sample_policy`: responses to fixed prompts through the engine, seeded (reproducible).
- `gold_scores` / `win_rate`: the programmatic judge's mean and the fraction of prompts
  where a policy's response beats another's (ties count half), as in Gao et al. 2022.
- `kl_to_reference`: E_{y~pi}[sum_t log pi(y_t) - log ref(y_t)] (k1, on the policy's own
  samples at the sampling temperature; a negative value would mean the samples were not
  from pi).
- `text_loss`: next-token loss and bits per byte on held-out pretraining text, the tax.
- `judge_policy`: sample and score in one call: gold mean, exact answers, length, EOS rate.

Every measurement runs the models in eval mode without autograd and leaves each model in
the mode it was in (a policy being trained stays in training mode).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from qkv.align.data import as_messages
from qkv.align.policy import Rollout, response_logprobs, rollout


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd inside; each model's own mode restored after."""
    modes = [m.training for m in models]
    try:
        with torch.no_grad():
            for m in models:
                m.eval()
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def sample_policy(
    model, tokenizer, prompts: list, max_new_tokens: int = 24, temperature: float = 0.7, seed: int = 1234, n: int = 1
) -> Rollout:
    with evaluating(model):
        return rollout(
            model,
            tokenizer,
            [as_messages(p) for p in prompts],
            max_new_tokens,
            temperature,
            seed,
            n=n,
            max_num_seqs=min(128, len(prompts) * n),
        )


def gold_scores(ro: Rollout, gold_fn: Callable[[list[dict], str], float]) -> list[float]:
    return [gold_fn(p, t) for p, t in zip(ro.prompts, ro.texts)]


def win_rate(scores_a: list[float], scores_b: list[float]) -> float:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b))
    return wins / len(scores_a)


def kl_to_reference(model, ref_model, tokenizer, ro: Rollout, temperature: float = 0.7, batch_size: int = 64) -> float:
    dev = next(model.parameters()).device
    b = {k: v.to(dev) for k, v in ro.batch(tokenizer.pad_id, model.cfg.max_seq_len).items()}
    total = 0.0
    with evaluating(model, ref_model):
        for s in range(0, len(b["ids"]), batch_size):
            ids, kp, mask = (
                b["ids"][s : s + batch_size],
                b["key_padding"][s : s + batch_size],
                b["mask"][s : s + batch_size, 1:],
            )
            lp = response_logprobs(model, ids, kp, temperature)
            rlp = response_logprobs(ref_model, ids, kp, temperature)
            total += ((lp - rlp) * mask).sum().item()
    return total / len(b["ids"])


def text_loss(
    model, tokens: torch.Tensor, seq_len: int = 128, max_windows: int = 64, bytes_per_token: float | None = None
) -> dict:
    """Mean next-token loss over consecutive windows of `tokens` (1-D), and bits per byte."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"held-out text has {len(tokens)} tokens; need more than seq_len={seq_len}")
    x = tokens[: n * seq_len + 1]
    dev = next(model.parameters()).device
    losses = []
    with evaluating(model):
        for s in range(0, n, 16):
            k = min(16, n - s)
            chunk = torch.stack([x[(s + i) * seq_len : (s + i + 1) * seq_len + 1] for i in range(k)]).to(dev)
            losses.append(model.loss(chunk[:, :-1], chunk[:, 1:]).item() * k)
    loss = sum(losses) / n
    out = {"loss": loss}
    if bytes_per_token:
        out["bpb"] = loss / math.log(2) / bytes_per_token
    return out


def judge_policy(
    model,
    tokenizer,
    prompts: list,
    gold_fn: Callable[[list[dict], str], float],
    max_new_tokens: int = 16,
    temperature: float = 0.7,
    seed: int = 99,
    n: int = 1,
) -> tuple[Rollout, dict]:
    """(rollout, summary) of `n` sampled responses per prompt scored by `gold_fn`: the gold
    mean, the fraction of perfect answers (score 1), mean response length in tokens, the
    fraction that ended with EOS, the raw scores and a few (prompt, response) examples."""
    ro = sample_policy(model, tokenizer, prompts, max_new_tokens, temperature, seed=seed, n=n)
    g = gold_scores(ro, gold_fn)
    return ro, {
        "gold": sum(g) / len(g),
        "exact": sum(x == 1.0 for x in g) / len(g),
        "length": sum(map(len, ro.response_ids)) / len(ro.response_ids),
        "eos_rate": sum(ro.finished) / len(ro.finished),
        "scores": g,
        "examples": [(p, t) for p, t in list(zip(ro.prompts, ro.texts))[::n][:4]],
    }
