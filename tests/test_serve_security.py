"""A hostile or careless client against a live `qkv serve`: whatever one request sends, only
that request can fail, and the server keeps serving everyone else.

Numbers that pass a naive range check but break sampling (a temperature of 1e-300, a
penalty that overflows fp32, a seed that leaves torch's range) are either given a meaning
(a tiny temperature is greedy) or refused with a 400 naming the field; and a request whose
sampling still fails aborts alone, while the requests batched with it finish normally.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _serve_helpers import BackgroundServer, make_tiny_checkpoint
from qkv.commands.serve import load_for_serving
from qkv.infer import engine as engine_module
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingError, SamplingParams, sample_seed
from qkv.infer.stop_strings import StopStrings
from qkv.serve.app import create_app

MODEL = "tiny-chat"
KEY = "sk-security-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CTX = 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve_sec") / "ckpt", max_seq_len=CTX)


@pytest.fixture(scope="module")
def srv(ckpt):
    model, tok = load_for_serving(str(ckpt))
    engine = Engine(model, tok, block_size=16, num_blocks=64, max_num_seqs=8, max_batch_tokens=128)
    app = create_app(engine, MODEL, api_key=KEY, max_queue=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy machine
    try:
        with BackgroundServer(app) as s:
            s.engine, s.tokenizer = engine, tok
            yield s
    finally:
        torch.set_num_threads(threads)


def chat(**over) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6, "temperature": 0}
    body.update(over)
    return body


def post(srv, body: dict, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=AUTH, timeout=60, **kw)


# --- sampling numbers ------------------------------------------------------------------


def test_tiny_temperature_is_greedy(srv):
    greedy = post(srv, chat(temperature=0))
    tiny = post(srv, chat(temperature=1e-300, seed=3))
    assert greedy.status_code == 200 and tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize(
    "over, param",
    [
        (dict(temperature=1.0, repetition_penalty=1e-300), "repetition_penalty"),
        (dict(temperature=1.0, repetition_penalty=1e300), "repetition_penalty"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(temperature=1.0, seed=2**64), "seed"),
    ],
)
def test_numbers_that_would_break_sampling_are_400(srv, over, param):
    r = post(srv, chat(**over))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_non_finite_numbers_are_400(srv):
    """Python's json writes inf as `Infinity`, which pydantic accepts as a float."""
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
        body = json.dumps(chat(**{field: float("inf")})).encode()
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            content=body,
            headers={**AUTH, "content-type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field


def test_largest_seed_with_several_samples(srv):
    """The samples of a request are seeded seed, seed+1, ... modulo 2**64, so the last seed
    torch takes still works for n > 1, and each sample is reproducible."""
    body = chat(temperature=1.0, seed=2**64 - 1, n=2, max_tokens=8)
    first, again = post(srv, body), post(srv, body)
    assert first.status_code == 200, first.text
    texts = [c["message"]["content"] for c in first.json()["choices"]]
    assert len(texts) == 2 and texts == [c["message"]["content"] for c in again.json()["choices"]]


def test_sample_seeds_stay_in_torchs_range():
    assert sample_seed(2**64 - 1, 1) == 0
    assert sample_seed(-1, 0) == 2**64 - 1  # torch takes -1 as 2**64 - 1: same stream
    for seed in (0, 2**63, 2**64 - 1, -(2**63)):
        SamplingParams(seed=seed, n=64).validate()
        for i in (0, 63):
            torch.Generator().manual_seed(sample_seed(seed, i))
    with pytest.raises(SamplingError):
        SamplingParams(seed=2**64).validate()


# --- one poisoned request fails alone ------------------------------------------------------

POISON = 0.4321  # the temperature of the request whose sampling is made to fail


@pytest.fixture
def poisoned_sampling(monkeypatch):
    """Sampling raises for requests with temperature POISON: a stand-in for any numeric
    failure that validation did not foresee."""
    warp = engine_module.warp

    def failing_warp(logits, params):
        if params.temperature == POISON:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return warp(logits, params)

    monkeypatch.setattr(engine_module, "warp", failing_warp)


def test_sampling_failure_aborts_only_that_request_in_the_engine(poisoned_sampling):
    from _infer_fixtures import make_tokenizer, tiny_model

    tok = make_tokenizer()
    eng = Engine(tiny_model(vocab_size=tok.vocab_size), tok, block_size=8, num_blocks=64)
    prompt = tok.encode("To be, or not to be")
    healthy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = eng.generate([prompt], healthy)[0][0].token_ids
    good = eng.add_request(prompt, healthy)
    bad = eng.add_request(prompt, SamplingParams(max_tokens=10, temperature=POISON, n=2, ignore_eos=True))
    outs: dict[str, list] = {good: [], bad: []}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id].append(o)
    assert [t for o in outs[good] for t in o.new_token_ids] == alone
    assert outs[good][-1].finish_reason == "length" and outs[good][-1].error is None
    finals = [o for o in outs[bad] if o.finished]
    assert sorted(o.index for o in finals) == [0, 1]
    assert all(o.finish_reason == "abort" and "RuntimeError" in o.error for o in finals)
    assert eng.stats()["blocks_used"] == 0 and not eng.requests


def test_sampling_failure_is_500_for_that_request_only(srv, poisoned_sampling):
    body = chat(max_tokens=CTX - 40, ignore_eos=True, stream=True)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=AUTH) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            for _ in range(4):  # the healthy stream is running
                next(lines)
            bad = post(srv, chat(temperature=POISON, max_tokens=4))
            assert bad.status_code == 500, bad.text
            assert bad.json()["error"]["type"] == "server_error"
            events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert not any("error" in ch for ch in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert post(srv, chat()).status_code == 200


# --- cross-site requests and DNS rebinding -------------------------------------------------


def test_api_takes_only_json_bodies(srv):
    """A web page may POST text/plain (or a form, or a type-less Blob) to any site without a
    CORS preflight; the API refuses every body not labelled JSON, so no page can drive it."""
    body = json.dumps(chat()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**AUTH, "Origin": "https://evil.example"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers=headers, timeout=60)
        assert r.status_code == 415, (content_type, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    ok = httpx.post(
        srv.url + "/v1/chat/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


def test_unknown_host_is_refused(srv):
    """DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends its requests
    to this server with `Host: evil.example`. Only loopback names are served by default."""
    for path in ("/v1/models", "/", "/metrics"):
        r = httpx.get(srv.url + path, headers={**AUTH, "Host": f"evil.example:{srv.port}"}, timeout=30)
        assert r.status_code == 421, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]
    for host in ("localhost", f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "LOCALHOST"):
        r = httpx.get(srv.url + "/v1/models", headers={**AUTH, "Host": host}, timeout=30)
        assert r.status_code == 200, (host, r.text)


def test_allowed_hosts_list_and_wildcard(srv):
    from starlette.testclient import TestClient

    named = create_app(srv.engine, MODEL, allowed_hosts=["api.example"])
    assert TestClient(named, base_url="http://api.example:8000").get("/v1/models").status_code == 200
    assert TestClient(named, base_url="http://localhost").get("/v1/models").status_code == 421
    anyone = create_app(srv.engine, MODEL, allowed_hosts=["*"])
    assert TestClient(anyone, base_url="http://evil.example").get("/v1/models").status_code == 200


def test_cli_allowed_hosts():
    import argparse

    from qkv.commands.serve import add_arguments, allowed_hosts

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "m", "--allowed-hosts", "a.example, b.example"])
    assert allowed_hosts(args) == ["a.example", "b.example"]
    assert "localhost" in allowed_hosts(p.parse_args(["--model", "m"]))
    assert "10.0.0.5" in allowed_hosts(p.parse_args(["--model", "m", "--host", "10.0.0.5"]))
    assert allowed_hosts(p.parse_args(["--model", "m", "--allowed-hosts", "*"])) == ["*"]


# --- stop strings ----------------------------------------------------------------------------


def test_stop_lists_are_bounded(srv):
    from qkv.infer.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS

    many = post(srv, chat(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]))
    assert many.status_code == 400 and many.json()["error"]["param"] == "stop", many.text
    assert str(MAX_STOP_STRINGS) in many.json()["error"]["message"]
    long = post(srv, chat(stop=["x" * (MAX_STOP_CHARS + 1)]), path="/v1/chat/completions")
    assert long.status_code == 400 and long.json()["error"]["param"] == "stop", long.text
    limit = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    assert post(srv, chat(stop=limit)).status_code == 200


def _held_by_comparing_every_suffix(text: str, end: int, stops: list[str]) -> int:
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return hold


@given(
    text=st.text(alphabet="ab\ufffd", max_size=40),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=8), min_size=1, max_size=4),
    sent=st.integers(0, 40),
)
def test_stop_strings_match_the_plain_definition(text, stops, sent):
    """held() is the longest tail that is a proper prefix of a stop; first_hit() finds the
    earliest stop that does not lie entirely in text already sent."""
    ss = StopStrings(stops)
    for end in range(len(text) + 1):
        assert ss.held(text, end) == _held_by_comparing_every_suffix(text, end, stops)
    sent = min(sent, len(text))
    # text[:sent] went out only if no stop began in it: make it so
    while sent and any(text.find(s) != -1 and text.find(s) < sent for s in stops):
        sent -= 1
    hits = [text.find(s) for s in stops if s in text]
    assert ss.first_hit(text, sent) == (min(hits) if hits else None)


# --- the inside view ------------------------------------------------------------------------


def test_inside_view_runs_only_up_to_the_asked_layer():
    """The asked layer's map equals the full capture's (the oracle), and the blocks after
    it never run."""
    from _infer_fixtures import make_tokenizer, tiny_model
    from qkv.inspect.attention import capture_attention
    from qkv.serve.inside import inside_report

    tok = make_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, n_layer=4)
    ran: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: ran.append(i))
    text = "To be, or not to be, that is the question"
    report = inside_report(model, tok, text, layer=1, head=2)
    assert ran == [0, 1]
    ran.clear()
    want = capture_attention(model, tok.encode(text, add_special=True))[1, 2]
    assert ran == [0, 1, 2, 3]
    torch.testing.assert_close(torch.tensor(report["attention"]), want, atol=1e-4, rtol=0)


def test_inside_view_is_bounded_and_busy_is_429(srv, monkeypatch):
    import threading

    from qkv.serve import inside

    started, release = threading.Semaphore(0), threading.Event()
    report = inside.inside_report

    def held(*args):
        started.release()
        assert release.wait(30)
        return report(*args)

    monkeypatch.setattr(inside, "inside_report", held)
    body = {"text": "hello there", "layer": 0, "head": 0}
    results: list[httpx.Response] = []
    workers = [
        threading.Thread(target=lambda: results.append(post(srv, body, path="/v1/inside/attention")))
        for _ in range(inside.MAX_CONCURRENT)
    ]
    for w in workers:
        w.start()
    try:
        for _ in workers:
            assert started.acquire(timeout=30), "an inspection never started"
        busy = post(srv, body, path="/v1/inside/attention")
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        release.set()
        for w in workers:
            w.join(30)
    assert [r.status_code for r in results] == [200] * inside.MAX_CONCURRENT
    assert post(srv, body, path="/v1/inside/attention").status_code == 200


# --- tokenizing stays off the event loop -----------------------------------------------------


def test_long_prompt_list_is_refused_before_tokenizing(srv, monkeypatch):
    encoded: list[str] = []
    encode = srv.tokenizer.encode
    monkeypatch.setattr(srv.tokenizer, "encode", lambda text, **kw: encoded.append(text) or encode(text, **kw))
    r = post(srv, {"model": MODEL, "prompt": ["hello"] * 10_000, "max_tokens": 1}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "10000 prompts" in r.json()["error"]["message"]
    assert encoded == []
    ok = post(srv, {"model": MODEL, "prompt": ["hello", "there"], "max_tokens": 1}, path="/v1/completions")
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_tokenizing_does_not_freeze_the_event_loop(srv, monkeypatch):
    """While a request's chat template is tokenized, the event loop (which carries every
    stream) still answers: here the tokenizer itself asks the server for /health."""
    marker = "please hold this prompt"
    answers: list[object] = []
    encode_chat = srv.tokenizer.encode_chat

    def encode_and_probe(messages, **kw):
        if any(marker in m["content"] for m in messages):
            try:
                answers.append(httpx.get(srv.url + "/health", timeout=5).status_code)
            except httpx.TimeoutException as e:  # the loop is stuck in this very call
                answers.append(e)
        return encode_chat(messages, **kw)

    monkeypatch.setattr(srv.tokenizer, "encode_chat", encode_and_probe)
    r = post(srv, chat(messages=[{"role": "user", "content": marker}]))
    assert r.status_code == 200
    assert answers == [200]


# --- metrics, the page's headers, error text, a dead engine ----------------------------------


def test_metrics_public_by_default_or_behind_the_key(srv):
    from starlette.testclient import TestClient

    assert httpx.get(srv.url + "/metrics", timeout=30).status_code == 200
    locked = TestClient(create_app(srv.engine, MODEL, api_key=KEY, metrics_auth=True), base_url="http://localhost")
    assert locked.get("/metrics").status_code == 401
    assert locked.get("/metrics", headers=AUTH).status_code == 200
    with pytest.raises(ValueError, match="api_key"):
        create_app(srv.engine, MODEL, metrics_auth=True)


def test_page_responses_forbid_sniffing_framing_and_foreign_scripts(srv):
    for path in ("/", "/static/app.js", "/static/inside.js", "/v1/models"):
        r = httpx.get(srv.url + path, headers=AUTH, timeout=30)
        assert r.status_code == 200, path
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
        assert csp["frame-ancestors"] == ["'none'"] and csp["script-src"] == ["'self'"], csp
        assert csp["default-src"] == ["'self'"]


def test_page_scripts_never_put_data_into_innerhtml():
    """Model text is inserted with textContent: any innerHTML is a fixed string."""
    import re

    from qkv.serve.app import STATIC

    for js in STATIC.glob("*.js"):
        source = js.read_text()
        assert "insertAdjacentHTML" not in source and "outerHTML" not in source and "document.write" not in source
        for m in re.finditer(r"innerHTML\s*[+]?=\s*(`[^`]*`|[^;]*)", source):
            assert m.group(1).startswith("`") and "${" not in m.group(1), (js.name, m.group(0)[:80])


def test_stream_error_events_carry_no_exception_text(srv, poisoned_sampling):
    body = chat(temperature=POISON, max_tokens=4, stream=True)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "probability" not in error["message"], error


class _Dying(BaseException):
    """Not an Exception: gets past the engine loop's error handling and ends its thread."""


def test_dead_engine_fails_pending_requests_with_503(ckpt):
    import threading

    model, tok = load_for_serving(str(ckpt))
    engine = Engine(model, tok, block_size=16, num_blocks=32, max_num_seqs=4, max_batch_tokens=64)
    entered = threading.Event()

    def dying_step():
        entered.set()
        raise _Dying("the engine thread ends here")

    app = create_app(engine, MODEL)
    with BackgroundServer(app) as s:
        assert httpx.get(s.url + "/health", timeout=30).status_code == 200
        engine.step = dying_step
        r = httpx.post(s.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert entered.is_set()
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable"
        health = httpx.get(s.url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
        again = httpx.post(s.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert again.status_code == 503
