"""Prompt-processing and decode speed in llama-bench's terms, with the roofline of the run.

- pp<p>: one prompt of p tokens in one forward (through an empty KV cache), tokens/s.
- tg<n>: n greedy decode steps, one token each, after a one-token prompt (timed alone,
  as llama-bench's tg test does), tokens/s.

Decode reads every weight once per token, so its ceiling is the machine's memory
bandwidth divided by the bytes a step reads (`decode_bytes_per_token`); `roofline` says
what fraction of that ceiling a measured decode speed reaches. The bandwidth is measured
in the same run, because a shared machine's bandwidth moves from minute to minute.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import KVCache, kv_bytes_per_token, new_kv_cache
from qkv.model.transformer import Transformer


@dataclass
class SpeedResult:
    test: str  # "pp128", "tg128"
    tokens_per_s: float  # best repetition
    stdev: float  # tokens/s across repetitions
    reps: int


def read_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """Bytes/s of reading a large buffer (a sum over it: reads only, like decode's weights)."""
    buf = torch.ones(mb * 2**20 // 4)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


def decode_bytes_per_token(model: Transformer, context: int = 0, kv_dtype: torch.dtype | None = None) -> int:
    """Bytes one decode step reads: every parameter and weight buffer once (a tied
    embedding in full, by the output head; an untied input embedding one row), plus the
    K/V of `context` earlier tokens (in a cache of `kv_dtype`; None: the weights' dtype)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(recurse=True)])
    cfg = model.cfg
    position_tables = ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin", "pos_table")
    tables = [b for n, b in model.named_buffers() if n in position_tables]
    total -= sum(b.numel() * b.element_size() for b in tables)  # position tables: one row read
    emb = model.tok_emb
    if not cfg.tie_embeddings:
        emb_bytes = sum(t.numel() * t.element_size() for t in [*emb.parameters(), *emb.buffers()])
        total -= emb_bytes - emb_bytes // cfg.vocab_size
    if kv_dtype is None:
        kv_dtype = torch.float32 if next(model.parameters()).dtype == torch.float32 else torch.bfloat16
    return total + context * kv_bytes_per_token(cfg, kv_dtype)


def _rates(setup: Callable[[], Any], timed: Callable[[Any], None], n_tokens: int, reps: int) -> tuple[float, float]:
    """Best tokens/s of `timed(setup())` (only `timed` is timed) over reps, and their stdev."""
    timed(setup())  # warm-up: kernels built, caches allocated, pages touched
    rates = []
    for _ in range(reps):
        state = setup()
        t = time.perf_counter()
        timed(state)
        rates.append(n_tokens / (time.perf_counter() - t))
    return max(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0


@torch.inference_mode()
def prompt_speed(
    model: Transformer, n_prompt: int, reps: int = 3, seed: int = 0, kv_dtype: torch.dtype | None = None
) -> SpeedResult:
    """pp<n_prompt>: one forward over a prompt of n_prompt random tokens."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt), generator=g)
    dtype = kv_dtype or next(model.parameters()).dtype

    def run(cache: KVCache) -> None:
        forward_step(model, cache, tokens, last_only=True)

    best, sd = _rates(lambda: new_kv_cache(cfg, n_prompt, dtype=dtype), run, n_prompt, reps)
    return SpeedResult(f"pp{n_prompt}", best, sd, reps)


@torch.inference_mode()
def decode_speed(
    model: Transformer, n_gen: int, reps: int = 3, seed: int = 0, depth: int = 0, kv_dtype: torch.dtype | None = None
) -> SpeedResult:
    """tg<n_gen>: n_gen greedy decode steps after a one-token prompt, or (depth > 0, as
    llama-bench's -d) after a prompt of `depth` random tokens, which is not timed."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, cfg.vocab_size, (1, max(depth, 1)), generator=g)
    dtype = kv_dtype or next(model.parameters()).dtype

    def prefill() -> tuple[KVCache, torch.Tensor]:
        cache = new_kv_cache(cfg, first.shape[1] + n_gen, dtype=dtype)
        return cache, forward_step(model, cache, first, last_only=True)

    def run(state: tuple[KVCache, torch.Tensor]) -> None:
        cache, logits = state
        for _ in range(n_gen):
            logits = forward_step(model, cache, logits[:, -1:].argmax(-1))

    best, sd = _rates(prefill, run, n_gen, reps)
    return SpeedResult(f"tg{n_gen}" + (f" @ d{depth}" if depth else ""), best, sd, reps)
