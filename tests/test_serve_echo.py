"""`/v1/completions` with echo=true (prompt log-probabilities), the tokenizer routes and
`/v1/embeddings`, against a live uvicorn server on loopback serving a tiny random model.

Oracles: prompt logprobs are recomputed by one plain full-sequence forward of the same
model (no cache, no engine); embeddings by transformers' LlamaModel on the same weights
(mean of last_hidden_state, which is after the final norm); token ids by the tokenizer.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from _serve_helpers import BackgroundServer, make_tiny_checkpoint
from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.serve.app import create_app

MODEL = "tiny-echo"
CTX = 64
PROMPT = "The quick brown fox jumps over the lazy dog while the cat"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("serve_echo") / "ckpt", max_seq_len=CTX, init_std=0.08)
    model, tok = load_for_serving(str(ckpt))
    # small chunks: a prompt is scored across several prefill steps
    engine = Engine(model, tok, block_size=4, num_blocks=256, max_num_seqs=8, max_batch_tokens=8)
    app = create_app(engine, MODEL, max_queue=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client, model, tok
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of one full forward: row p scores token p + 1."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


def completion(client, **body) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})


def check_prompt_part(lp: dict, ids: list[int], model, tok, k: int) -> None:
    ref = prompt_logprobs(model, ids)
    P = len(ids)
    assert lp["tokens"][:P] == [tok.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [ref[p - 1, ids[p]].item() for p in range(1, P)]
    assert lp["token_logprobs"][1:P] == pytest.approx(want, abs=1e-4)
    for p in range(1, P):
        top = lp["top_logprobs"][p]
        if k:  # the best alternative is there (keys are token texts, so two ids may share one)
            assert max(top.values()) == pytest.approx(ref[p - 1].max().item(), abs=1e-4)
        assert top[tok.decode([ids[p]])] == pytest.approx(want[p - 1], abs=1e-4)  # the prompt's own token
        assert 1 <= len(top) <= k + 1
    offsets = lp["text_offset"][:P]
    assert offsets == [sum(len(t) for t in lp["tokens"][:p]) for p in range(P)]


def test_echo_scores_the_prompt_and_appends_the_completion(served):
    client, model, tok = served
    r = completion(client, prompt=PROMPT, max_tokens=1, logprobs=2, echo=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = tok.encode(PROMPT, add_special=True)
    assert len(ids) > 8  # scored over several prefill chunks
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    check_prompt_part(lp, ids, model, tok, k=2)
    gen = prompt_logprobs(model, ids)[-1]
    assert lp["token_logprobs"][-1] == pytest.approx(gen.max().item(), abs=1e-4)  # greedy
    assert lp["text_offset"][-1] == len(PROMPT)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    # again: the prompt's blocks are in the prefix cache now, and scoring must not use them
    again = completion(client, prompt=PROMPT, max_tokens=1, logprobs=2, echo=True).json()["choices"][0]
    assert again["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)


def test_echo_token_id_prompts_with_max_tokens_zero(served):
    client, model, tok = served
    prompts = [tok.encode("To be, or not to be"), tok.encode("Hello! How are you today?")]
    r = completion(client, prompt=prompts, max_tokens=0, logprobs=0, echo=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for ids, choice in zip(prompts, body["choices"]):
        assert choice["text"] == tok.decode(ids)
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
        check_prompt_part(choice["logprobs"], ids, model, tok, k=0)
    assert body["usage"]["completion_tokens"] == 0


def test_echo_without_logprobs_and_a_one_token_prompt(served):
    client, _, tok = served
    ids = tok.encode("fox")[:1]
    r = completion(client, prompt=ids, max_tokens=2, logprobs=1, echo=True)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == 3
    r = completion(client, prompt=PROMPT, max_tokens=3, echo=True)
    choice = r.json()["choices"][0]
    plain = completion(client, prompt=PROMPT, max_tokens=3).json()["choices"][0]
    assert choice["logprobs"] is None and choice["text"] == PROMPT + plain["text"]


def test_prompt_at_the_context_limit(served):
    client, model, tok = served
    ids = (tok.encode(PROMPT) * 8)[:CTX]
    r = completion(client, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    assert r.status_code == 200, r.text
    check_prompt_part(r.json()["choices"][0]["logprobs"], ids, model, tok, k=1)
    for body, param in [
        (dict(prompt=ids, max_tokens=1, echo=True), "prompt"),  # no room for the reply
        (dict(prompt=ids + ids[:1], max_tokens=0, echo=True), "prompt"),
        (dict(prompt=ids[:8], max_tokens=0), "max_tokens"),  # 0 only with echo
        (dict(prompt=ids[:8], max_tokens=-1, echo=True), "max_tokens"),
    ]:
        r = completion(client, **body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param


def test_echo_with_n_samples_and_with_stream(served):
    client, model, tok = served
    ids = tok.encode(PROMPT)
    r = client.post(
        "/v1/completions",
        json=dict(model=MODEL, prompt=PROMPT, max_tokens=3, n=2, seed=7, logprobs=1, echo=True, temperature=1.0),
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for c in choices:
        assert c["text"].startswith(PROMPT)
        check_prompt_part(c["logprobs"], ids, model, tok, k=1)

    whole = completion(client, prompt=PROMPT, max_tokens=4, logprobs=1, echo=True).json()["choices"][0]
    text, token_logprobs = "", []
    with client.stream(
        "POST",
        "/v1/completions",
        json=dict(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1, echo=True, temperature=0, stream=True),
    ) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        c = json.loads(e)["choices"][0]
        text += c["text"]
        token_logprobs += c["logprobs"]["token_logprobs"] if c["logprobs"] else []
    first = json.loads(events[0])["choices"][0]
    assert first["text"].startswith(PROMPT)
    assert text == whole["text"]
    assert token_logprobs == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)


def test_tokenizer_routes(served):
    client, _, tok = served
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == CTX
    r = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True})
    body = r.json()
    assert body["tokens"] == tok.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == CTX and "".join(body["token_strs"]) == PROMPT
    assert client.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [tok.eos_id]
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    assert chat == tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": PROMPT}
    for path, payload, param in [
        ("/detokenize", {"tokens": [tok.vocab_size]}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
    ]:
        r = client.post(path, json=payload)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text


def test_embeddings_match_transformers_hidden_states(served):
    from qkv.interop.hf import to_transformers

    client, model, tok = served
    texts = [PROMPT, "To be, or not to be"]
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    hf = to_transformers(model, "llama").eval()
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special=True)
        with torch.no_grad():
            want = hf.model(torch.tensor([ids])).last_hidden_state[0].float().mean(0)
        got = body["data"][i]
        assert got["index"] == i and got["object"] == "embedding"
        assert got["embedding"] == pytest.approx(want.tolist(), abs=1e-4)
    n = sum(len(tok.encode(t, add_special=True)) for t in texts)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}

    ids = tok.encode(PROMPT, add_special=True)
    b64 = client.post("/v1/embeddings", json={"model": MODEL, "input": ids, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(body["data"][0]["embedding"], abs=1e-6)
    card = client.get("/v1/models").json()["data"][0]
    assert card["embeddings"]["pooling"] == "mean" and card["embeddings"]["dimensions"] == len(decoded)
    for payload, param in [
        ({"input": []}, "input"),
        ({"input": [""]}, "input"),
        ({"input": [tok.vocab_size]}, "input"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
        ({"input": ids * 8}, "input"),  # longer than the context
    ]:
        r = client.post("/v1/embeddings", json={"model": MODEL, **payload})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
