"""Single-stream generation with the contiguous KV cache: prefill, then decode.

The simplest correct loop (gpt-fast's generate.py is the model): one forward over the
prompt fills the cache and gives the first token's logits; each further step feeds
one token at position `cache.pos` and reads back all keys/values. Decode reads every
weight once per token, so it is bound by memory bandwidth, not FLOPs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch

from qkv.infer import backend
from qkv.infer.kv_cache import KVCache
from qkv.infer.sampling import SamplingParams, make_generator, sample_token
from qkv.model.attention import causal_mask


def window_mask(cfg, start: int, T: int, device) -> torch.Tensor | None:
    """The causal mask with a window every layer shares (Mistral). Not needed by the model, which
    narrows each layer to its own window (cfg.window_of); kept for callers that pass a mask."""
    if cfg.sliding_window is None or start + T <= cfg.sliding_window:
        return None
    return causal_mask(T, start + T, device, cfg.sliding_window)[None, None]


@torch.inference_mode()
def forward_step(model, cache: KVCache, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Feed tokens (B, T) at cache.pos; returns logits (B, T, V), or (B, 1, V) for the
    last position only, and advances the cache."""
    T = tokens.shape[1]
    positions = torch.arange(cache.pos, cache.pos + T, device=tokens.device)
    backend.prepare_for_inference(model)
    h = backend.hidden(model, tokens, positions, cache)  # each layer applies its own window
    cache.advance(T)
    return backend.logits(model, h[:, -1:] if last_only else h)


@torch.inference_mode()
def generate_stream(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_id: int | Collection[int] | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yield generated token ids one at a time (stops at max_tokens, a stop token id or an end
    token: `eos_id` is one id or a set, such as the tokenizer's `end_ids`)."""
    params.validate()
    cfg = model.cfg
    device = next(model.parameters()).device
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt; give at least one token")
    if len(prompt_ids) >= cfg.max_seq_len:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context of {cfg.max_seq_len}; shorten it"
        )
    max_len = min(cfg.max_seq_len, len(prompt_ids) + params.max_tokens)
    dtype = next(model.parameters()).dtype
    cache = cache or KVCache(cfg, max_len, device=device, dtype=dtype)
    gen = make_generator(params.seed if params.seed is not None else int(torch.randint(2**62, (1,))), device)
    stops = set(params.stop_token_ids) | (end_set(eos_id) if not params.ignore_eos else set())
    out: list[int] = []
    logits = forward_step(model, cache, torch.tensor([prompt_ids], device=device), last_only=True)[0, -1]
    while True:
        tok = sample_token(logits, params, gen, prompt_ids, out)
        out.append(tok)
        yield tok
        if tok in stops or len(out) >= params.max_tokens or len(prompt_ids) + len(out) >= max_len:
            return
        logits = forward_step(model, cache, torch.tensor([[tok]], device=device))[0, -1]


def generate(
    model, prompt_ids: list[int], params: SamplingParams, eos_id: int | Collection[int] | None = None
) -> list[int]:
    return list(generate_stream(model, prompt_ids, params, eos_id))


def end_set(eos_id: int | Collection[int] | None) -> set[int]:
    """The end-token ids as a set: none, one id or a collection of them."""
    if eos_id is None:
        return set()
    return {eos_id} if isinstance(eos_id, int) else set(eos_id)


@torch.inference_mode()
def generate_no_cache(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (the oracle and the
    baseline the cache is measured against)."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=device), last_only=True)[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]
