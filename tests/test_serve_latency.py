"""What a new request waits for: the engine thread admits it as soon as it is queued (no timer
tick), and a step never feeds more than its token budget, every decoding sequence getting its
token while a long prompt is prefilled in chunks (so a prefill cannot stall the decoders for
longer than one budget's worth). Behaviour only: nothing here depends on the machine's speed."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _infer_fixtures import make_tokenizer, tiny_model
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams
from qkv.serve.async_engine import AsyncEngine

TOK = make_tokenizer()
MODEL = tiny_model(n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=128)


pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_an_idle_engine_admits_a_request_without_waiting_for_a_tick():
    """The idle engine thread waits on its command queue for an hour per tick here: a request
    that had to wait for the tick would time out; each of two requests, the second after the
    thread went idle again, is answered at once."""
    aengine = AsyncEngine(Engine(MODEL, TOK, block_size=8, num_blocks=32), idle_wait_s=3600.0)
    aengine.start()

    async def one(prompt: list[int]) -> list[int]:
        rid, q, accepted = aengine.submit(prompt, greedy(3))
        await accepted
        ids = []
        async for batch in aengine.results([rid], q):
            ids += [t for out in batch for t in out.new_token_ids]
        return ids

    async def both():
        first = await asyncio.wait_for(one([5, 6, 7]), timeout=120)
        await asyncio.sleep(0.05)  # the thread is back waiting on its queue
        second = await asyncio.wait_for(one([8, 9]), timeout=120)
        return first, second

    thread = aengine._thread
    try:
        first, second = asyncio.run(both())
    finally:
        aengine.shutdown(timeout=120)  # it wakes on the shutdown command, not the tick
    assert len(first) == 3 and len(second) == 3
    assert not thread.is_alive()


@settings(max_examples=15, deadline=None)
@given(
    budget=st.integers(4, 24),
    decoders=st.integers(1, 3),
    prompt_len=st.integers(20, 70),
)
def test_a_step_never_feeds_more_than_its_budget_and_decoders_keep_decoding(budget, decoders, prompt_len):
    eng = Engine(MODEL, TOK, block_size=4, num_blocks=128, max_batch_tokens=budget, max_num_seqs=decoders + 1)
    running = [eng.add_request([10 + i, 11 + i], greedy(100)) for i in range(decoders)]
    for _ in range(3):  # every two-token prompt is in: each sequence decodes one token a step
        eng.step()
    assert all(s.num_pending == 1 for s in eng.scheduler.running)
    long = eng.add_request(list(range(30, 30 + prompt_len)), greedy(2))
    steps_with_prefill = 0
    while True:
        before = eng.stats()["step_tokens_total"]
        outs = eng.step()
        fed = eng.stats()["step_tokens_total"] - before
        assert fed <= budget
        got = {o.request_id for o in outs if o.new_token_ids}
        assert set(running) <= got  # no decoder skipped a step for the prompt
        steps_with_prefill += 1
        if long in got:
            break
    room = budget - decoders  # what each step leaves for the prompt
    assert steps_with_prefill == -(-prompt_len // room)
