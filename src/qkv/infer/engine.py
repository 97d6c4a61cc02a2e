"""Serving engine: paged KV cache + continuous-batching scheduler + per-request sampling."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """One increment for one sample of one request."""

    request_id: str
    index: int  # which of the n samples
    new_token_ids: list[int]
    new_text: str  # detokenized increment (holds back partial UTF-8 / possible stop-string prefixes)
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationResult:
    """A finished sample: what `Engine.generate` returns."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
