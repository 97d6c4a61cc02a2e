"""Perplexity of a model on a text, the way llama.cpp's `llama-perplexity` reports it.

The token stream is cut into non-overlapping windows of `ctx` tokens; each window is one
forward from an empty cache, and every token of a window but its first is scored by the
log-probability the model gave it from the tokens before it in the window. Perplexity is
exp(mean negative log-likelihood) over all scored tokens, with the standard error of
that mean carried through exp (to first order: ppl * stderr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from qkv.infer.backend import prepare_for_inference
from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import new_kv_cache


@dataclass
class Perplexity:
    ppl: float
    ppl_stderr: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    windows: int


@torch.inference_mode()
def window_nll(model: nn.Module, tokens: list[int], kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Negative log-likelihood of tokens[1:] given the tokens before each, in one forward
    (attending through a cache of `kv_dtype`: None, the weights' dtype)."""
    dtype = kv_dtype or next(model.parameters()).dtype
    cache = new_kv_cache(model.cfg, len(tokens), dtype=dtype)
    ids = torch.tensor([tokens])
    logits = forward_step(model, cache, ids[:, :-1]).float()[0]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


def perplexity(
    model: nn.Module,
    tokens: list[int],
    ctx: int = 512,
    progress: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> Perplexity:
    """Perplexity over non-overlapping windows of `ctx` tokens (a last partial window of
    at least 2 tokens counts too), keys and values stored as `kv_dtype` (None: the weights')."""
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens, got {ctx}")
    if ctx > model.cfg.max_seq_len:
        raise ValueError(f"--ctx {ctx} is longer than the model's context of {model.cfg.max_seq_len}; lower it")
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    from tqdm import tqdm

    prepare_for_inference(model.eval())
    starts = [s for s in range(0, len(tokens), ctx) if len(tokens) - s >= 2]
    windows = tqdm(starts, desc="perplexity", disable=not progress)
    nlls = [window_nll(model, tokens[s : s + ctx], kv_dtype) for s in windows]
    nll = torch.cat(nlls).double()
    mean = float(nll.mean())
    stderr = float(nll.std() / math.sqrt(nll.numel())) if nll.numel() > 1 else 0.0
    ppl = math.exp(mean)
    return Perplexity(ppl=ppl, ppl_stderr=ppl * stderr, nll=mean, tokens_scored=nll.numel(), windows=len(starts))
