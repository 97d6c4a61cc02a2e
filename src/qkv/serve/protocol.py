"""OpenAI wire format: pydantic request models, response builders and error objects.

Requests are validated in two layers: pydantic checks JSON types here (a wrong type is a
400 naming the field), then `SamplingParams.validate` checks ranges with the engine's own
rules, so the server and the engine can never disagree about what is valid. Unknown
fields are ignored, as vLLM does, so clients that send newer OpenAI fields keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qkv.infer.sampling import DEFAULT_SAMPLING, SamplingDefaults, SamplingParams

MAX_N = 16  # samples per request; more would let one request fill the whole batch
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error the client caused (or an overload): becomes an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- requests ----------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingFields(_Request):
    """Fields shared by both endpoints (OpenAI's plus vLLM's extras)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, defaults: SamplingDefaults = DEFAULT_SAMPLING
    ) -> SamplingParams:
        """The request's sampling; a field it leaves out takes `defaults` (qkv's shared set, the
        same as `qkv generate` and the chat page), as vLLM takes a model's generation config."""
        d = defaults
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"invalid n: {self.n}; must be between 1 and {MAX_N}", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = SamplingParams(
            max_tokens=max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else 0 if self.top_k == -1 else self.top_k,  # vLLM: -1 = off
            min_p=d.min_p if self.min_p is None else self.min_p,
            repetition_penalty=d.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            n=self.n,
        )
        p.validate()  # SamplingError -> 400 with .param (see app.py)
        return p


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, defaults: SamplingDefaults = DEFAULT_SAMPLING
    ) -> SamplingParams:
        """echo with logprobs scores the prompt in the engine's prefill; echo with max_tokens=0
        means the prompt alone (scored, nothing generated)."""
        p = super().sampling_params(max(max_tokens, 1), logprobs, defaults)
        if self.echo and (logprobs is not None or max_tokens == 0):
            p.prompt_logprobs, p.max_tokens = logprobs or 0, max_tokens
            p.validate()
        return p


# --- responses ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "qkv", "max_model_len": max_model_len}
