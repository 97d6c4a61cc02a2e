"""Continuous batching under random workloads: no leaks, refcounts never negative, and
every request (preempted or not) produces exactly what it produces alone."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from _infer_fixtures import make_tokenizer, tiny_model
from qkv.infer.engine import Engine
from qkv.infer.generate import generate
from qkv.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


TOK = make_tokenizer()
MODEL = tiny_model(n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=64)
_REF: dict = {}


def reference(prompt: list[int], p: SamplingParams) -> list[list[int]]:
    """Each sample alone with the contiguous cache (sample i uses seed + i)."""
    key = (tuple(prompt), repr(p))
    if key not in _REF:
        outs = []
        for i in range(p.n):
            q = SamplingParams(**{**p.__dict__, "n": 1, "seed": None if p.seed is None else p.seed + i})
            outs.append(generate(MODEL, prompt, q, eos_id=None if p.ignore_eos else TOK.end_ids))
        _REF[key] = outs
    return _REF[key]


request = st.fixed_dictionaries(
    dict(
        prompt=st.lists(st.integers(0, 319), min_size=1, max_size=28),
        max_tokens=st.integers(1, 20),
        sampled=st.booleans(),
        seed=st.integers(0, 1000),
        n=st.sampled_from([1, 1, 2, 3]),
        abort_at=st.one_of(st.none(), st.integers(0, 30)),
    )
)


def run_workload(eng: Engine, reqs: list[dict]) -> dict:
    params = {}
    for i, r in enumerate(reqs):
        p = SamplingParams(
            max_tokens=r["max_tokens"],
            temperature=1.0 if r["sampled"] else 0.0,
            seed=r["seed"],
            n=r["n"],
            ignore_eos=True,
        )
        params[eng.add_request(r["prompt"], p, request_id=str(i))] = p
    got = {rid: [[] for _ in range(p.n)] for rid, p in params.items()}
    reasons: dict = {}
    step = 0
    while eng.has_unfinished():
        for i, r in enumerate(reqs):
            if r["abort_at"] == step:
                eng.abort(str(i))
        for o in eng.step():
            got[o.request_id][o.index] += o.new_token_ids
            if o.finished:
                reasons[(o.request_id, o.index)] = o.finish_reason
        eng.allocator.check()  # refcounts >= 0, every block free, cached or owned
        step += 1
        assert step < 5000
    return dict(params=params, got=got, reasons=reasons)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(request, min_size=1, max_size=7),
    num_blocks=st.integers(13, 30),
    max_batch_tokens=st.integers(1, 48),
    max_num_seqs=st.integers(1, 8),
    prefix_caching=st.booleans(),
)
def test_random_workloads_finish_exactly_and_leak_nothing(
    reqs, num_blocks, max_batch_tokens, max_num_seqs, prefix_caching
):
    eng = Engine(
        MODEL,
        TOK,
        block_size=4,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_num_seqs=max_num_seqs,
        prefix_caching=prefix_caching,
    )
    res = run_workload(eng, reqs)
    for rid, p in res["params"].items():
        for i in range(p.n):
            reason = res["reasons"][(rid, i)]
            if reason == "abort":
                assert res["got"][rid][i] == reference(reqs[int(rid)]["prompt"], p)[i][: len(res["got"][rid][i])]
                continue
            assert reason == "length"
            assert res["got"][rid][i] == reference(reqs[int(rid)]["prompt"], p)[i]
    s = eng.stats()
    event(f"preempted: {s['preemptions_total'] > 0}")
    assert s["blocks_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0


def test_preempted_requests_finish_with_the_same_output():
    reqs = [
        dict(prompt=list(range(7 * i, 7 * i + 12)), max_tokens=30, sampled=i % 2 == 1, seed=i, n=1, abort_at=None)
        for i in range(6)
    ]
    eng = Engine(MODEL, TOK, block_size=4, num_blocks=14, max_batch_tokens=64)
    res = run_workload(eng, reqs)
    assert eng.stats()["preemptions_total"] > 0
    for rid, p in res["params"].items():
        assert res["got"][rid][0] == reference(reqs[int(rid)]["prompt"], p)[0]
    assert eng.stats()["blocks_used"] == 0


def test_fcfs_and_chunked_prefill_keeps_decoding():
    eng = Engine(MODEL, TOK, block_size=4, num_blocks=64, max_batch_tokens=8, max_num_seqs=2)
    a = eng.add_request([1, 2, 3], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    eng.step()  # a is decoding
    b = eng.add_request(list(range(50, 90)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    c = eng.add_request([4], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # waits: 2 seqs max
    a_tokens_during_prefill = 0
    for _ in range(6):  # b's 40-token prompt takes 6 chunks of <= 7 while a keeps decoding
        outs = eng.step()
        a_tokens_during_prefill += sum(len(o.new_token_ids) for o in outs if o.request_id == a)
        assert eng.stats()["num_waiting"] == 1  # c waits its turn
    assert a_tokens_during_prefill == 6
    finished = []
    while eng.has_unfinished():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == [b, c, a]
    assert eng.stats()["blocks_used"] == 0


def test_prompt_filling_the_pool_does_not_crash():
    eng = Engine(MODEL, TOK, block_size=4, num_blocks=5)  # 20 token slots
    with pytest.raises(ValueError, match="too long"):
        eng.add_request(list(range(20)), SamplingParams(max_tokens=5))
    r = eng.generate([list(range(18)), [1, 2]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(r[0][0].token_ids) == 2 and r[0][0].finish_reason == "length"  # the pool is the limit
    assert len(r[1][0].token_ids) == 5
    assert eng.stats()["blocks_used"] == 0
