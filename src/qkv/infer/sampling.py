"""Per-request sampling parameters and the logits -> token step.

`SamplingParams` is the contract shared by the engine, the server and alignment code.
Sampling itself is written per request (one row of logits, one torch.Generator) so a
seeded request gives the same tokens whatever else is batched with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qkv.infer.constraints import Constraint

# Below this temperature sampling is greedy (vLLM's rule): dividing logits by a tinier
# number overflows fp32 and leaves nothing to sample from.
GREEDY_BELOW = 1e-5
# A repetition penalty outside this range divides or multiplies logits out of fp32's range
# (1e-300 turns every seen logit into inf); useful values are around 1.0-2.0.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# torch.Generator.manual_seed takes seeds in [-2**63, 2**64) (a negative seed is its
# two's complement): the seeds a request may give.
SEED_RANGE = (-(2**63), 2**64)
# Every stop string is checked against each new token's text: bound the work one request
# can ask for. OpenAI allows 4 stop strings, vLLM any number; 16 covers chat templates'
# end markers with room to spare, and 256 characters covers any sensible marker.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling a request gets for what it leaves unset. One set is shared by `qkv generate`,
    `qkv chat`, the server and the chat page; a model that carries its own (a Hugging Face
    `generation_config.json`, a GGUF's `general.sampling.*` keys) overrides it field by field.

    Pure temperature sampling over the whole vocabulary lets a small model wander into its long
    tail of junk tokens; llama.cpp's well-tested top-k 40 / top-p 0.95 / min-p 0.05 cut that
    tail while keeping the answers varied."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repetition_penalty: float = 1.0

    def merged(self, overrides: dict) -> SamplingDefaults:
        """These defaults with a model's own values (unknown keys ignored) in their place."""
        from dataclasses import fields, replace

        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in names and v is not None})


DEFAULT_SAMPLING = SamplingDefaults()


class SamplingError(ValueError):
    """A bad sampling parameter; `.param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # makes the request reproducible whatever else is batched
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's logprob + top-k alternatives
    n: int = 1  # parallel samples sharing the prompt (copy-on-write blocks)
    # None = off; k >= 0 = each prompt token's logprob + top-k alternatives, computed in the
    # prefill (the prompt's cached prefix is not reused: it has no logits). With it on,
    # max_tokens may be 0: score the prompt only.
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None  # grammar the output must match (infer/constraints.py)
    adapter: str | None = None  # LoRA adapter this request runs with (qkv serve --lora); None: the base model

    def validate(self) -> None:
        """Raise SamplingError (a ValueError) naming the field and the fix."""

        def bad(param: str, msg: str) -> None:
            raise SamplingError(param, f"invalid {param}: {msg}")

        scoring = self.prompt_logprobs is not None  # scoring a prompt alone needs no new token
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1 - scoring:
            bad("max_tokens", f"{self.max_tokens!r}; must be an integer >= 1 (0 only with prompt_logprobs)")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", f"{self.temperature!r}; must be a finite number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"{self.top_p!r}; must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"{self.top_k!r}; must be an integer >= 0 (0 = off)")
        if not _is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad("min_p", f"{self.min_p!r}; must be in [0, 1]")
        lo, hi = REPETITION_PENALTY_RANGE
        if not _is_num(self.repetition_penalty) or not (lo <= self.repetition_penalty <= hi):
            bad("repetition_penalty", f"{self.repetition_penalty!r}; must be in [{lo:g}, {hi:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not (-2.0 <= v <= 2.0):
                bad(name, f"{v!r}; must be in [-2, 2]")
        if isinstance(self.stop, str):  # accept a single string, as OpenAI does
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            bad("stop", f"{self.stop!r}; must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            bad("stop", "empty stop string; remove it")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"{len(self.stop)} stop strings; send at most {MAX_STOP_STRINGS}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"a stop string of {max(map(len, self.stop))} characters; keep each under {MAX_STOP_CHARS + 1}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", f"{self.stop_token_ids!r}; must be a list of token ids (ints >= 0)")
        lo, hi = SEED_RANGE
        if self.seed is not None and not (_is_int(self.seed) and lo <= self.seed < hi):
            bad("seed", f"{self.seed!r}; must be None or an integer in [-2**63, 2**64)")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not (0 <= self.logprobs <= 20)
        ):
            bad("logprobs", f"{self.logprobs!r}; must be None or an integer in [0, 20]")
        k = self.prompt_logprobs
        if k is not None and (not _is_int(k) or not 0 <= k <= 20):
            bad("prompt_logprobs", f"{self.prompt_logprobs!r}; must be None or an integer in [0, 20]")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not (1 <= self.n <= 64):
            bad("n", f"{self.n!r}; must be an integer in [1, 64]")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            bad("constraint", f"{self.constraint!r}; must be None or a qkv.infer.constraints.Constraint")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded `seed`: seed + index, wrapped into
    [0, 2**64) so that n samples of any valid seed stay in torch's range. Wrapping keeps
    every stream torch would have given (it reads a negative seed as its two's complement)."""
    return (seed + index) % 2**64


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    """A real, finite number: NaN and inf would poison every logit they touch."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- logits -> token ---------------------------------------------------------------------
# Order (as transformers' logits processors): penalties, temperature, top-k, top-p, min-p.
# Everything works on one request's row so batching never changes a seeded request.


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids) -> torch.Tensor:
    """Repetition penalty over prompt + output (CTRL / transformers rule: divide positive
    logits, multiply negative ones); presence and frequency penalties over the output
    (OpenAI rule: logit -= presence * [count > 0] + frequency * count)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=logits.device)
        if seen.numel():
            seen = seen.unique()
            x = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(x > 0, x / params.repetition_penalty, x * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        counts = torch.bincount(
            torch.tensor(list(output_ids), dtype=torch.long, device=logits.device), minlength=logits.shape[-1]
        ).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p: returns fp32 logits with removed tokens at -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def token_probs(logits: torch.Tensor, params: SamplingParams, prompt_ids=(), output_ids=()) -> torch.Tensor:
    """The distribution a request samples from (greedy: one-hot on the argmax)."""
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return warp(logits, params).softmax(-1)


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prompt_ids=(),
    output_ids=(),
) -> int:
    """One token from one row of logits (V,)."""
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return int(logits.argmax())
    probs = warp(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
