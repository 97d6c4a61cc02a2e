"""Bad input, overload and disconnects against a live `qkv serve` (raw HTTP with httpx).

Every bad request must get the right status and an OpenAI error object, never a 500, and
the server must answer a normal request correctly after the whole barrage. A client that
drops a stream (or a plain request) halfway must have its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from _serve_helpers import BackgroundServer, free_port, make_tiny_checkpoint
from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.serve.app import create_app

MODEL = "tiny-chat"
KEY = "sk-errors-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_QUEUE = 3
MAX_BODY = 64 * 1024
CTX = 512


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve_err") / "ckpt", max_seq_len=CTX)


@pytest.fixture(scope="module")
def srv(ckpt):
    model, tok = load_for_serving(str(ckpt))
    engine = Engine(model, tok, block_size=16, num_blocks=64, max_num_seqs=8, max_batch_tokens=128)
    app = create_app(engine, MODEL, api_key=KEY, max_queue=MAX_QUEUE, max_body_bytes=MAX_BODY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy machine
    try:
        with BackgroundServer(app) as s:
            s.engine = engine
            yield s
    finally:
        torch.set_num_threads(threads)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def chat(**over) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "temperature": 0}
    body.update(over)
    return body


LONG = "word " * 1000  # far more than CTX tokens

# (name, method, path, kwargs for httpx, expected status, expected param or None)
BARRAGE = [
    (
        "malformed json",
        "POST",
        "/v1/chat/completions",
        dict(content=b'{"model": "tiny-chat", "messages": [', headers={**AUTH, "content-type": "application/json"}),
        400,
        None,
    ),
    ("body not an object", "POST", "/v1/chat/completions", dict(json=[1, 2], headers=AUTH), 400, None),
    (
        "messages wrong type",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(messages="hi"), headers=AUTH),
        400,
        "messages",
    ),
    (
        "max_tokens wrong type",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(max_tokens="ten"), headers=AUTH),
        400,
        "max_tokens",
    ),
    (
        "temperature wrong type",
        "POST",
        "/v1/completions",
        dict(json={"model": MODEL, "prompt": "x", "temperature": "hot"}, headers=AUTH),
        400,
        "temperature",
    ),
    ("stop wrong type", "POST", "/v1/chat/completions", dict(json=chat(stop=[1, 2]), headers=AUTH), 400, "stop"),
    ("missing messages", "POST", "/v1/chat/completions", dict(json={"model": MODEL}, headers=AUTH), 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", dict(json=chat(messages=[]), headers=AUTH), 400, "messages"),
    (
        "bad role",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(messages=[{"role": "wizard", "content": "x"}]), headers=AUTH),
        400,
        None,
    ),
    (
        "negative max_tokens",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(max_tokens=-5), headers=AUTH),
        400,
        "max_tokens",
    ),
    (
        "zero max_tokens",
        "POST",
        "/v1/completions",
        dict(json={"model": MODEL, "prompt": "x", "max_tokens": 0}, headers=AUTH),
        400,
        "max_tokens",
    ),
    (
        "temperature < 0",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(temperature=-0.5), headers=AUTH),
        400,
        "temperature",
    ),
    ("top_p = 0", "POST", "/v1/chat/completions", dict(json=chat(top_p=0), headers=AUTH), 400, "top_p"),
    (
        "presence_penalty > 2",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(presence_penalty=3), headers=AUTH),
        400,
        "presence_penalty",
    ),
    ("n above limit", "POST", "/v1/chat/completions", dict(json=chat(n=1000), headers=AUTH), 400, "n"),
    ("n = 0", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": "x", "n": 0}, headers=AUTH), 400, "n"),
    (
        "top_logprobs without logprobs",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(top_logprobs=2), headers=AUTH),
        400,
        "top_logprobs",
    ),
    (
        "top_logprobs too big",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(logprobs=True, top_logprobs=50), headers=AUTH),
        400,
        "top_logprobs",
    ),
    (
        "completion logprobs too big",
        "POST",
        "/v1/completions",
        dict(json={"model": MODEL, "prompt": "x", "logprobs": 99}, headers=AUTH),
        400,
        "logprobs",
    ),
    (
        "token id out of vocab",
        "POST",
        "/v1/completions",
        dict(json={"model": MODEL, "prompt": [1, 10**9]}, headers=AUTH),
        400,
        "prompt",
    ),
    ("empty prompt", "POST", "/v1/completions", dict(json={"model": MODEL, "prompt": ""}, headers=AUTH), 400, "prompt"),
    ("unknown model", "POST", "/v1/chat/completions", dict(json=chat(model="gpt-4o"), headers=AUTH), 404, "model"),
    ("unknown model (get)", "GET", "/v1/models/nope", dict(headers=AUTH), 404, "model"),
    (
        "context overflow (prompt)",
        "POST",
        "/v1/completions",
        dict(json={"model": MODEL, "prompt": LONG}, headers=AUTH),
        400,
        "prompt",
    ),
    (
        "context overflow (chat)",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(messages=[{"role": "user", "content": LONG}]), headers=AUTH),
        400,
        "messages",
    ),
    (
        "context overflow (max_tokens)",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(max_tokens=CTX), headers=AUTH),
        400,
        "max_tokens",
    ),
    (
        "oversized body",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(messages=[{"role": "user", "content": "x" * (2 * MAX_BODY)}]), headers=AUTH),
        413,
        None,
    ),
    (
        "oversized chunked body",
        "POST",
        "/v1/completions",
        dict(content=iter([b"{" + b" " * 8192] * 20), headers={**AUTH, "content-type": "application/json"}),
        413,
        None,
    ),
    (
        "body not labelled json",
        "POST",
        "/v1/chat/completions",
        dict(content=json.dumps(chat()).encode(), headers={**AUTH, "content-type": "text/plain"}),
        415,
        None,
    ),
    ("foreign host", "GET", "/v1/models", dict(headers={**AUTH, "host": "evil.example"}), 421, None),
    ("missing key", "POST", "/v1/chat/completions", dict(json=chat()), 401, None),
    (
        "wrong key",
        "POST",
        "/v1/chat/completions",
        dict(json=chat(), headers={"Authorization": "Bearer sk-wrong"}),
        401,
        None,
    ),
    ("wrong key scheme", "GET", "/v1/models", dict(headers={"Authorization": KEY}), 401, None),
    ("unknown route", "GET", "/v1/nothing-here", dict(headers=AUTH), 404, None),
    ("wrong method", "GET", "/v1/chat/completions", dict(headers=AUTH), 405, None),
]


def test_bad_input_barrage_then_still_serving(srv):
    before = httpx.post(srv.url + "/v1/chat/completions", json=chat(), headers=AUTH)
    assert before.status_code == 200
    for name, method, path, kwargs, status, param in BARRAGE:
        r = httpx.request(method, srv.url + path, timeout=30, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (name, body)
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], name
        if param is not None:
            assert body["error"]["param"] == param, (name, body)
    codes = {
        name: httpx.request(m, srv.url + p, timeout=30, **kw).json()["error"]["code"]
        for name, m, p, kw, _, _ in BARRAGE
        if name in ("context overflow (prompt)", "wrong key", "malformed json")
    }
    assert codes == {
        "context overflow (prompt)": "context_length_exceeded",
        "wrong key": "invalid_api_key",
        "malformed json": "invalid_json",
    }
    after = httpx.post(srv.url + "/v1/chat/completions", json=chat(), headers=AUTH)
    assert after.status_code == 200
    assert after.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]  # greedy: same answer
    assert httpx.get(srv.url + "/health").status_code == 200
    assert 'status="500"' not in httpx.get(srv.url + "/metrics").text


def test_queue_full_is_429_and_recovers(srv):
    """A burst of 12 long requests at a server that admits MAX_QUEUE: the rest get 429 at
    once (an error object; the openai client raises RateLimitError), none anything else."""
    body = chat(max_tokens=CTX - 40, ignore_eos=True, temperature=1.0)

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as h:
            raw = [h.post(srv.url + "/v1/chat/completions", json=body) for _ in range(6)]
            sdk = [
                aclient.chat.completions.create(
                    model=MODEL,
                    messages=body["messages"],
                    max_tokens=body["max_tokens"],
                    extra_body={"ignore_eos": True},
                )
                for _ in range(6)
            ]
            return await asyncio.gather(*raw, *sdk, return_exceptions=True)

    results = asyncio.run(burst())
    raw, sdk = results[:6], results[6:]
    assert all(isinstance(r, httpx.Response) for r in raw), raw
    assert {r.status_code for r in raw} <= {200, 429}
    for r in raw:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
    assert all(isinstance(r, (openai.types.chat.ChatCompletion, openai.RateLimitError)) for r in sdk), sdk
    ok = sum(r.status_code == 200 for r in raw) + sum(not isinstance(r, Exception) for r in sdk)
    assert MAX_QUEUE <= ok < 12  # every admitted request finished; the overflow was refused
    assert any(isinstance(r, openai.RateLimitError) for r in sdk) or any(r.status_code == 429 for r in raw)
    assert metric(srv.url, "qkv_requests_in_flight") == 0
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def _wait_idle(url: str, idle_blocks: float, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "qkv_kv_blocks_used") == idle_blocks and metric(url, "qkv_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV blocks used stayed at {metric(url, 'qkv_kv_blocks_used')} (idle {idle_blocks})")


def test_disconnect_mid_stream_frees_kv_blocks(srv):
    idle = metric(srv.url, "qkv_kv_blocks_used")
    generated0 = metric(srv.url, "qkv_generated_tokens_total")
    max_tokens = CTX - 20
    body = chat(max_tokens=max_tokens, stream=True, ignore_eos=True, temperature=1.0)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):  # a few tokens in: the request holds KV blocks now
                next(lines)
            assert metric(srv.url, "qkv_kv_blocks_used") > idle
        # leaving the block closes the connection halfway through the stream
    _wait_idle(srv.url, idle)
    assert metric(srv.url, "qkv_generated_tokens_total") - generated0 < max_tokens  # aborted, not finished


def test_disconnect_non_streaming_frees_kv_blocks(srv):
    """The client gives up while its reply is being generated. The engine is held after its
    first step (an event this test controls), so the reply cannot finish before the client
    leaves however fast the machine is; then it is released and must free the blocks."""
    idle = metric(srv.url, "qkv_kv_blocks_used")
    engine, step = srv.engine, srv.engine.step
    started, release = threading.Event(), threading.Event()

    def held_step():
        out = step()
        started.set()
        release.wait(timeout=30)
        return out

    engine.step = held_step
    try:
        body = json.dumps(chat(max_tokens=CTX - 20, ignore_eos=True, temperature=1.0)).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((srv.host, srv.port), timeout=30) as conn:
            conn.sendall(head.encode() + body)
            assert started.wait(timeout=30), "the request never reached the engine"
        # the connection is closed while the reply is still being generated
    finally:
        del engine.step  # the class's own step again
        release.set()
    _wait_idle(srv.url, idle)


def test_cli_serve_binds_loopback_with_env_key(ckpt):
    port = free_port()
    env = {**os.environ, "QKV_API_KEY": "sk-env"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qkv.cli",
            "serve",
            "--model",
            str(ckpt),
            "--port",
            str(port),
            "--served-model-name",
            "m",
            "--log-level",
            "warning",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() is not None else "timeout"
            )
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-env", max_retries=0)
        r = client.completions.create(model="m", prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert f"http://127.0.0.1:{port}" in out
