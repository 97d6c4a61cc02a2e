"""Constrained decoding: every output a grammar allows parses and validates, masks never
leak between batched rows, and bad constraints are refused before any generation.

Oracle: `jsonschema` validates each JSON output against the schema it was generated under;
regexes are checked with Python's `re`.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _infer_fixtures import tiny_model
from _serve_helpers import BackgroundServer, make_tiny_checkpoint, tiny_tokenizer
from qkv.infer.constraints import Constraint, ConstraintError
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(tiny_model(vocab_size=tok.vocab_size, max_seq_len=512), tok, max_num_seqs=16)


# --- hypothesis: random schemas, a random model at temperature 1 --------------------------------

NAMES = st.sampled_from(["a", "b", "id", "name", "x_1", "tags"])
LEAF = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(
        lambda lo, w: {"type": "integer", "minimum": lo, "maximum": lo + w}, st.integers(-50, 50), st.integers(0, 99)
    ),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 5)),
    st.lists(st.sampled_from(["red", "green", "blue", "x"]), min_size=1, max_size=3, unique=True).map(
        lambda v: {"enum": v}
    ),
    st.just({"type": "null"}),
)


def _objects(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req, "additionalProperties": False}
        )
    )


def _arrays(children):
    return children.map(lambda item: {"type": "array", "items": item, "maxItems": 2})


SCHEMAS = _objects(st.recursive(LEAF, lambda c: st.one_of(_objects(c), _arrays(c)), max_leaves=5))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**32))
def test_random_schemas_give_valid_json_at_temperature_one(engine, tok, schema, seed):
    params = SamplingParams(
        max_tokens=300, temperature=1.0, seed=seed, n=2, constraint=Constraint("json_schema", schema)
    )
    for r in engine.generate([tok.encode("Data:")], params)[0]:
        assert r.finish_reason == "stop", (schema, r.text)
        jsonschema.validate(json.loads(r.text), schema)


# --- the engine ---------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_constrained_row_batched_with_free_rows_matches_alone(engine, tok):
    prompts = [tok.encode(t) for t in ("The fox", "Numbers like", "Hello!")]
    constrained = SamplingParams(max_tokens=20, temperature=0, constraint=Constraint("json_schema", SCHEMA))
    free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone_c = engine.generate([prompts[0]], constrained)[0][0]
    alone_f = [engine.generate([p], free)[0][0].token_ids for p in prompts[1:]]
    batched = engine.generate(prompts, [constrained, free, free])
    assert batched[0][0].token_ids == alone_c.token_ids
    assert [b[0].token_ids for b in batched[1:]] == alone_f
    jsonschema.validate(json.loads(alone_c.text), SCHEMA)


def test_sampled_n_and_logprobs_under_a_regex(engine, tok):
    pattern = r"[a-c]{2,4}-[0-9]{1,3}"
    params = SamplingParams(
        max_tokens=20, temperature=1.0, seed=3, n=3, logprobs=2, constraint=Constraint("regex", pattern)
    )
    for r in engine.generate([tok.encode("Code:")], params)[0]:
        assert re.fullmatch(pattern, r.text), r.text
        assert len(r.logprobs) == len(r.token_ids)
        assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in r.logprobs)  # the model's own, finite


def test_choice_under_preemption(tok):
    # 8 blocks of 4 tokens: the three sequences cannot all stay resident, so some are preempted and recomputed
    eng = Engine(tiny_model(vocab_size=tok.vocab_size), tok, block_size=4, num_blocks=8, max_num_seqs=3)
    choices = ["the quick brown fox jumps over the lazy dog", "to be or not to be that is the question"]
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1, constraint=Constraint("choice", choices))
    outs = eng.generate([tok.encode("Pick one") for _ in range(3)], params)
    assert eng.scheduler.preemptions_total > 0
    assert all(o[0].text in choices for o in outs)


def test_a_grammar_that_cannot_finish_ends_on_length(engine, tok):
    r = engine.generate(
        [tok.encode("x")], SamplingParams(max_tokens=3, temperature=0, constraint=Constraint("regex", "a{10}"))
    )
    assert r[0][0].finish_reason == "length" and r[0][0].text == "aaa"


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("regex", "a(b", "guided_regex"),
        Constraint("json_schema", {"type": "nonsense"}, "guided_json"),
        Constraint("choice", [], "guided_choice"),
        Constraint("grammar", "start: undefined_rule", "guided_grammar"),
    ],
)
def test_bad_constraints_are_refused_before_queueing(engine, tok, constraint):
    with pytest.raises(ConstraintError) as e:
        engine.add_request(tok.encode("x"), SamplingParams(constraint=constraint))
    assert e.value.param == constraint.param
    assert not engine.has_unfinished()


def test_speculative_decoding_refuses_a_constraint(tok):
    from qkv.infer.speculative import speculative_generate

    m = tiny_model(vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="grammar"):
        speculative_generate(m, m, [1, 2], SamplingParams(constraint=Constraint("choice", ["a"])))


# --- the API (tiny server: checks of the wire format and of bad input) ------------------------

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from qkv.commands.serve import load_for_serving
    from qkv.serve.app import create_app

    model, tk = load_for_serving(str(make_tiny_checkpoint(tmp_path_factory.mktemp("structured") / "ckpt")))
    with BackgroundServer(create_app(Engine(model, tk, max_num_seqs=8), MODEL)) as srv:
        yield srv


def post(srv, path: str, **body):
    return httpx.post(srv.url + path, json={"model": MODEL, **body}, timeout=60)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_and_guided_fields_on_both_endpoints(server, stream):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    texts = []
    for kwargs in (dict(response_format=fmt), dict(extra_body={"guided_json": SCHEMA})):
        r = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=30, temperature=1.0, stream=stream, **kwargs
        )
        texts.append(
            "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            if stream
            else r.choices[0].message.content
        )
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=30, stream=stream, extra_body={"guided_json": SCHEMA}
    )
    texts.append("".join(c.choices[0].text for c in r) if stream else r.choices[0].text)
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":  # a random model may write one long string instead
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10, extra_body={"guided_regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", r.choices[0].text)
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=10, extra_body={"guided_grammar": 'start: "yes" | "no"'}
    )
    assert r.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(
    "body, param",
    [
        (dict(messages=USER, logit_bias={"1": 2}), "logit_bias"),
        (dict(messages=[{"role": "user"}]), "messages"),
        (dict(messages=USER, guided_regex="a(b"), "guided_regex"),
        (
            dict(
                messages=USER,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 3}}},
            ),
            "response_format",
        ),
        (dict(messages=USER, guided_choice=["a"], guided_regex="a"), "guided_choice"),
        (dict(messages=USER, tools=[{"type": "function", "function": {"parameters": {}}}]), "tools"),
        (
            dict(
                messages=USER
                + [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                    }
                ],
            ),
            "messages",
        ),
        (dict(messages=USER, tool_choice="required"), "tool_choice"),
    ],
)
def test_bad_structured_requests_are_400_naming_the_field(server, body, param):
    r = post(server, "/v1/chat/completions", max_tokens=4, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_unknown_completion_field_is_400(server):
    r = post(server, "/v1/completions", prompt="x", max_tokens=2, frobnicate=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    assert "frobnicate" in r.json()["error"]["message"]


def test_length_finish_when_the_grammar_cannot_end(server):
    import openai
    from pydantic import BaseModel

    r = post(server, "/v1/completions", prompt="x", max_tokens=2, guided_regex="[a-z]{10}")
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"

    class Many(BaseModel):
        numbers: list[int]
        label: str

    # the official client's parse helper turns that finish into its own error, not a bad parse
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=MODEL, messages=USER, response_format=Many, max_tokens=3)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=3, stream=True, extra_body={"guided_regex": "[a-z]{10}"}
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_masks_leave_unconstrained_logits_alone(engine, tok):
    """A free request's sampled tokens under temperature 1 do not depend on a constrained one."""
    free = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    alone = engine.generate([tok.encode("Hello")], free)[0][0].token_ids
    c = SamplingParams(max_tokens=8, temperature=1.0, seed=6, constraint=Constraint("regex", "[0-9]+"))
    both = engine.generate([tok.encode("Hello"), tok.encode("Hello")], [free, c])
    assert both[0][0].token_ids == alone


def test_generate_command_options(tmp_path, capsys):
    from qkv.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", "--model", str(ckpt), "--prompt", "hi", "--max-tokens", "30", "--seed", "1"]
    assert main(base + ["--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert main(base + ["--choice", "yes,no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert main(base + ["--regex", "a(b"]) != 0
    assert "--regex" in capsys.readouterr().err
    assert main(base + ["--regex", "[a-z]{10}", "--max-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip()) < 10 and "--regex: cut before the grammar ended" in err


def test_chat_page_serves_the_schema_box(server):
    """Without a browser (tests/test_serve_browser.py drives it in one): the page has the
    schema box and its script sends the schema as response_format json_schema."""
    html = httpx.get(server.url + "/").text
    js = httpx.get(server.url + "/static/app.js").text
    assert 'id="schema_on"' in html and 'id="schema"' in html
    assert 'type: "json_schema", json_schema: { name: "page_schema", schema, strict: true }' in js
    assert "request.response_format = format" in js and "JSON.parse(box.value)" in js


def test_serving_docs_give_every_request_field_an_example():
    """docs/serving.md's field table names every field the two generation endpoints accept."""
    from pathlib import Path

    from qkv.serve.protocol import ChatCompletionRequest, CompletionRequest

    doc = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    table = doc.split("### Request fields", 1)[1].split("\n#", 1)[0]
    documented = set()
    for row in table.splitlines():
        cells = row.split(" | ")
        if row.startswith("| `") and len(cells) >= 3 and '"' in cells[2]:  # a field with an example
            documented |= set(re.findall(r"`(\w+)`", cells[0]))
    accepted = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    assert accepted - documented == set()
