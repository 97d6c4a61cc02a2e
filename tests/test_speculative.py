"""Speculative decoding: greedy output identical to the target alone; sampled output
distributed exactly as the target's (analytically for the rule, statistically end to end)."""

import pytest
import torch
from scipy.stats import chisquare

from _infer_fixtures import tiny_model
from qkv.infer.generate import generate
from qkv.infer.sampling import SamplingParams, make_generator
from qkv.infer.speculative import accept_reject, speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_identical_to_target_alone(k):
    target = tiny_model(seed=0)
    draft = tiny_model(seed=1, n_layer=1)
    for prompt in ([5, 6, 7], list(range(20, 45))):
        P = SamplingParams(max_tokens=30, temperature=0)
        out, stats = speculative_generate(target, draft, prompt, P, k=k)
        assert out == generate(target, prompt, P)
        assert stats.drafted > 0
    # a draft that is the target itself is always accepted
    out, stats = speculative_generate(target, target, [5, 6, 7], P, k=k)
    assert out == generate(target, [5, 6, 7], P) and stats.acceptance_rate == 1.0


def test_accept_reject_rule_gives_exactly_p():
    torch.manual_seed(0)
    V = 5
    p = torch.rand(V).softmax(-1)
    q = (torch.rand(V) * 3).softmax(-1)
    # analytic: P(x) = q(x) min(1, p(x)/q(x)) + P(reject) * residual(x)
    accept = torch.minimum(q, p)
    residual = (p - q).clamp(min=0)
    total = accept + (1 - accept.sum()) * residual / residual.sum()
    torch.testing.assert_close(total, p)
    # the implementation: one draft from q, first emitted token counted
    g = make_generator(1)
    n = 6000
    counts = torch.zeros(V)
    bonus = torch.full((V,), 1.0 / V)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        acc, extra = accept_reject([d], [q], [p, bonus], g)
        counts[acc[0] if acc else extra] += 1
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3


def test_sampled_speculative_output_follows_the_target_distribution():
    V = 6
    target = tiny_model(vocab_size=V, seed=0, n_layer=1, d_model=16, n_head=2, n_kv_head=1, init_std=0.5)
    draft = tiny_model(vocab_size=V, seed=3, n_layer=1, d_model=16, n_head=2, n_kv_head=1, init_std=0.5)
    prompt = [1, 2]
    P = SamplingParams(max_tokens=2, temperature=1.0)
    # exact target probability of every 2-token continuation
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        pairs = torch.tensor([prompt + [a] for a in range(V)])
        p2 = target(pairs)[:, -1].softmax(-1)
    exact = (p1[:, None] * p2).flatten()
    n = 1500
    counts = torch.zeros(V * V)
    for s in range(n):
        out, _ = speculative_generate(target, draft, prompt, SamplingParams(**{**P.__dict__, "seed": s}), k=2)
        counts[out[0] * V + out[1]] += 1
    # merge rare cells so the chi-square approximation holds
    order = torch.argsort(exact, descending=True)
    keep = order[(exact[order] * n) >= 5]
    rest = order[(exact[order] * n) < 5]
    obs = torch.cat([counts[keep], counts[rest].sum(0, keepdim=True)])
    exp = torch.cat([exact[keep], exact[rest].sum(0, keepdim=True)]) * n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    # and the draft is a different model, so rejections really happened
    assert not torch.allclose(draft(torch.tensor([prompt]))[0, -1].softmax(-1), p1, atol=0.05)


def test_stops_and_bad_arguments():
    target = tiny_model(seed=0)
    draft = tiny_model(seed=1, n_layer=1)
    ref = generate(target, [5, 6, 7], SamplingParams(max_tokens=30, temperature=0))
    stop = ref[7]
    out, _ = speculative_generate(
        target, draft, [5, 6, 7], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop]), k=4
    )
    assert out == ref[: ref.index(stop) + 1]
    with pytest.raises(ValueError, match="vocab"):
        speculative_generate(target, tiny_model(vocab_size=100), [1], SamplingParams(), k=2)
    with pytest.raises(ValueError, match="k="):
        speculative_generate(target, draft, [1], SamplingParams(), k=0)
