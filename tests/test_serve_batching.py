"""The server's batched path: a request's tokens do not depend on what it is batched with
(quantized weights, greedy and seeded sampling, through HTTP) and /metrics reports the
steps they shared (batch occupancy, time per step); the template-written SSE frames are
the bytes json.dumps writes; shared system prompts hit the prefix cache."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _infer_fixtures import TEXT, make_tokenizer, tiny_model
from _serve_helpers import BackgroundServer
from qkv.infer.engine import Engine
from qkv.quant import quantize_model
from qkv.serve.app import create_app
from qkv.serve.responses import ChatFormat, CompletionFormat

MODEL = "tiny-q"


@pytest.fixture(scope="module", params=["q8_0", "q4_0"])
def server(request):
    model = quantize_model(tiny_model(d_model=64, n_head=4, n_kv_head=2, max_seq_len=256), request.param)
    tok = make_tokenizer()
    engine = Engine(model, tok, block_size=16, num_blocks=256, max_num_seqs=16, max_batch_tokens=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy machine
    try:
        with BackgroundServer(create_app(engine, MODEL, max_queue=64)) as srv:
            yield srv, tok
    finally:
        torch.set_num_threads(threads)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name}(?:_total)?{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def completion(client: httpx.AsyncClient, body: dict) -> tuple[list[str], str]:
    """(token strings, text) of a completion; streamed requests are joined from their SSE frames."""
    body = {"model": MODEL, "ignore_eos": True, **body}
    if not body.get("stream"):
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return (choice["logprobs"] or {}).get("tokens", []), choice["text"]
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return [], text


def run(url: str, bodies: list[dict]) -> list[tuple[list[str], str]]:
    """Send every request at once; their results in order."""

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(completion(client, b) for b in bodies))

    return asyncio.run(go())


def test_tokens_are_the_same_alone_or_with_15_others(server):
    """A greedy and a seeded request, each alone, then both among 14 others (streamed, mixed
    sampling and lengths): the same tokens and text."""
    srv, tok = server
    prompt = tok.encode(TEXT[0][:40])
    targets = [
        {"prompt": prompt, "max_tokens": 20, "logprobs": 0, "temperature": 0.0},
        {"prompt": prompt, "max_tokens": 20, "logprobs": 0, "temperature": 1.0, "seed": 7},
    ]
    words = " ".join(TEXT).split()
    others = [
        {
            "prompt": " ".join(words[i : i + 3 + i % 7]),
            "max_tokens": 8 + i,
            "stream": True,
            **({"temperature": 0.0} if i % 2 else {"temperature": 0.9, "seed": i}),
        }
        for i in range(14)
    ]
    alone = [run(srv.url, [t])[0] for t in targets]
    steps, rows = metric(srv.url, "qkv_engine_steps"), metric(srv.url, "qkv_engine_step_rows")
    together = run(srv.url, targets + others)[:2]
    assert all(len(tokens) == 20 for tokens, _ in alone) and alone[0] != alone[1]
    assert together == alone
    # /metrics: the steps they shared, their rows, time and tokens, and the windowed gauges
    steps, rows = metric(srv.url, "qkv_engine_steps") - steps, metric(srv.url, "qkv_engine_step_rows") - rows
    assert rows / steps > 2, "the requests did not share steps"
    assert metric(srv.url, "qkv_engine_step_seconds") > 0
    assert metric(srv.url, "qkv_engine_step_tokens") >= metric(srv.url, "qkv_engine_step_rows")
    assert metric(srv.url, "qkv_tokens_per_second") > 0 and metric(srv.url, "qkv_step_seconds") > 0
    assert metric(srv.url, "qkv_batch_rows") >= 1 and 0 < metric(srv.url, "qkv_batch_occupancy") <= 1


def test_shared_system_prompt_hits_the_prefix_cache(server):
    srv, _ = server
    system = {"role": "system", "content": " ".join(TEXT)}  # several full KV blocks

    def chat(question: str) -> None:
        body = {"model": MODEL, "messages": [system, {"role": "user", "content": question}], "max_tokens": 4}
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).raise_for_status()

    chat("Who speaks first?")
    hits = metric(srv.url, "qkv_prefix_cache_hits")
    chat("And who answers?")
    assert metric(srv.url, "qkv_prefix_cache_hits") - hits >= 3


TEXTS = st.text(st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=50, deadline=None)
@given(text=TEXTS, index=st.integers(0, 20), finish=st.sampled_from([None, "stop", "length"]), name=TEXTS)
def test_template_frames_are_the_bytes_json_dumps_writes(text, index, finish, name):
    for fmt in (CompletionFormat(None, name, 1, ["r"]), ChatFormat(None, name, 1)):
        (choice,) = fmt.chunk_choices(index, text, None, finish, first=False)
        slow = f"data: {json.dumps(fmt.envelope(fmt.object_chunk, [choice]), ensure_ascii=False)}\n\n"
        assert fmt.plain_frame(index, text, finish) == slow
