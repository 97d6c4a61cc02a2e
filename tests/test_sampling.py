"""Sampling: parameter validation, and the logits warpers against transformers' processors."""

import pytest
import torch

from qkv.infer.sampling import SamplingError, SamplingParams, apply_penalties, make_generator, sample_token, warp


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("min_p", 1.2),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("stop", 5),
        ("stop", [1, 2]),
        ("stop", [""]),
        ("stop", {"a": 1}),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["x"]),
        ("seed", "abc"),
        ("logprobs", -1),
        ("logprobs", 21),
        ("n", 0),
    ],
)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.param == field and field in str(e.value)
    assert isinstance(e.value, ValueError)


def test_good_params_and_single_stop_string():
    p = SamplingParams(stop="\n", top_p=1.0, temperature=0, logprobs=0, seed=1, n=3)
    p.validate()
    assert p.stop == ["\n"] and p.greedy


def _hf_processors():
    pytest.importorskip("transformers")
    from transformers import generation as g

    return g


def test_warpers_match_transformers():
    g = _hf_processors()
    torch.manual_seed(0)
    logits = torch.randn(1, 200) * 3
    ids = torch.tensor([[3, 7, 7, 150]])
    for kw, procs in [
        (dict(temperature=0.7), [g.TemperatureLogitsWarper(0.7)]),
        (dict(top_k=13), [g.TopKLogitsWarper(13)]),
        (dict(top_p=0.8), [g.TopPLogitsWarper(0.8)]),
        (dict(min_p=0.05), [g.MinPLogitsWarper(0.05)]),
        (
            dict(temperature=1.3, top_k=40, top_p=0.9),
            [g.TemperatureLogitsWarper(1.3), g.TopKLogitsWarper(40), g.TopPLogitsWarper(0.9)],
        ),
    ]:
        ours = warp(logits[0], SamplingParams(**kw))
        theirs = logits.clone()
        for proc in procs:
            theirs = proc(ids, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0])), kw
        torch.testing.assert_close(ours.softmax(-1), theirs[0].softmax(-1)), kw

    rep = apply_penalties(logits[0], SamplingParams(repetition_penalty=1.7), [3, 7], [7, 150])
    torch.testing.assert_close(rep, g.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())[0])


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.zeros(10)
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 2], [4, 4, 4, 6])
    expected = torch.zeros(10)
    expected[4] = -(0.5 + 3 * 0.25)
    expected[6] = -(0.5 + 0.25)
    torch.testing.assert_close(out, expected)  # prompt tokens 1, 2 are not penalised


def test_greedy_top_k_1_and_seeded_draws():
    torch.manual_seed(1)
    logits = torch.randn(50)
    assert sample_token(logits, SamplingParams(temperature=0), None) == int(logits.argmax())
    assert sample_token(logits, SamplingParams(top_k=1), make_generator(5)) == int(logits.argmax())
    p = SamplingParams(temperature=1.0)
    a = [sample_token(logits, p, g) for g in [make_generator(9)] for _ in range(20)]
    b = [sample_token(logits, p, g) for g in [make_generator(9)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_draws_follow_the_warped_distribution():
    torch.manual_seed(2)
    logits = torch.randn(8) * 2
    p = SamplingParams(temperature=0.8, top_p=0.9)
    probs = warp(logits, p).softmax(-1)
    g = make_generator(0)
    n = 4000
    counts = torch.bincount(torch.tensor([sample_token(logits, p, g) for _ in range(n)]), minlength=8).float()
    assert counts[probs == 0].sum() == 0  # never a token top-p removed
    se = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * se + 1e-9).all()
