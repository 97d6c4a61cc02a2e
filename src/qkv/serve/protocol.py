"""OpenAI wire format: pydantic request models, response builders and error objects.

Requests are validated in two layers: pydantic checks JSON types here (a wrong type is a
400 naming the field), then `SamplingParams.validate` checks ranges with the engine's own
rules, so the server and the engine can never disagree about what is valid. Unknown
fields of the two request bodies are refused with a 400 naming the field: a field the
server does not implement must not be silently ignored (a client asking for `logit_bias`
would otherwise get output it did not ask for).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qkv.infer.constraints import Constraint
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


class ToolCallFunction(_Request):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's wire format)


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


# --- structured output and tools ----------------------------------------------------------


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    # "schema" shadows a BaseModel attribute: stored as schema_, sent and read as "schema"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: _FunctionName


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
    # structured output (vLLM's guided_* fields and OpenAI's response_format)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> Constraint | None:
        """The one output constraint this request asks for, if any (400 if several)."""
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(Constraint("json_object", None, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(
                    400,
                    "response_format of type json_schema needs json_schema.schema (a JSON schema object)",
                    param="response_format",
                )
            found.append(Constraint("json_schema", rf.json_schema.schema_, "response_format"))
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise APIError(400, "invalid guided_json: not a JSON schema", param="guided_json") from None
            found.append(Constraint("json_schema", schema, "guided_json"))
        if self.guided_regex is not None:
            found.append(Constraint("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(Constraint("choice", self.guided_choice, "guided_choice"))
        if self.guided_grammar is not None:
            found.append(Constraint("grammar", self.guided_grammar, "guided_grammar"))
        if len(found) > 1:
            names = ", ".join(c.param for c in found)
            raise APIError(400, f"several output constraints given ({names}); send one", param=found[1].param)
        return found[0] if found else None

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
    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(extra="forbid")
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
