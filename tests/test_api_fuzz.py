"""Fuzz the HTTP API from its own OpenAPI schema with schemathesis, against a live server.

Every operation the schema lists gets a few generated requests (valid and invalid bodies,
query strings, path parameters); each answer must be below 500 and, when it is an error,
an OpenAI error object. The schema's `model` field is pinned to the served name so most
generated bodies get past the model check and reach the tokenizer, the sampler and the
engine. Bounded: few examples per operation, derandomized, a tiny random model with a
short context.
"""

from __future__ import annotations

import copy
import os

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from _serve_helpers import BackgroundServer, make_tiny_checkpoint
from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.serve.app import create_app

MODEL = "tiny-fuzz"
# per operation and mode; QKV_FUZZ_EXAMPLES=500 for a longer hunt
EXAMPLES = int(os.environ.get("QKV_FUZZ_EXAMPLES", "12"))
CTX = 32  # short context: a generated request without max_tokens still finishes quickly


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt", max_seq_len=CTX)
    model, tok = load_for_serving(str(ckpt))
    engine = Engine(model, tok, block_size=16, num_blocks=32, max_num_seqs=8, max_batch_tokens=64)
    app = create_app(engine, MODEL, max_queue=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy machine
    try:
        with BackgroundServer(app) as srv:
            srv.app = app
            yield srv
    finally:
        torch.set_num_threads(threads)


def served_schema(app) -> dict:
    """The app's OpenAPI document with `model` pinned to the served name (a wrong name is a
    404 before anything interesting runs; tests/test_serve_errors.py covers that case)."""
    doc = copy.deepcopy(app.openapi())
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        doc["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [MODEL]}
    return doc


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_dict(served_schema(fuzz_server.app))


def check_answer(response) -> None:
    """No 5xx; every error an OpenAI error object."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
        err = body["error"]
        assert isinstance(err.get("message"), str) and err["message"], body
        assert isinstance(err.get("type"), str) and err["type"], body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_api_fuzz(fuzz_server, api_schema, mode):
    """Each operation of the schema, `EXAMPLES` generated requests in `mode` (bodies that
    match the schema, or ones that break it)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not op.body:
            continue  # nothing to break: the GET routes' only input is a free-form path string

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its request as it came
        )
        def answers_well(case):
            response = case.call(base_url=fuzz_server.url, timeout=30)
            try:
                check_answer(response)
            except AssertionError as e:
                raise AssertionError(f"{case.operation.label}: {case.as_curl_command()}\n{e}") from None

        answers_well()
