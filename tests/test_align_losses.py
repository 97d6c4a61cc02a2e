"""Alignment losses: parity with TRL's own loss code, the hand-computed oracles of
ALIGNMENT.md, and invariances (padding, gradient accumulation)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qkv.align import losses as L

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")


# --- TRL harness: call TRL's loss methods on a stand-in trainer and model -----------------
class _Acc:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_self(**attrs):
    base = dict(
        accelerator=_Acc(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    base.update(attrs)
    return SimpleNamespace(**base)


def _random_batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok_logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 3  # [chosen; rejected]
    ref_tok_logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 3
    lens = torch.randint(1, T + 1, (2 * B,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    return tok_logps, ref_tok_logps, mask


def _trl_dpo(loss_type, beta, tok_logps, ref_tok_logps, mask, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (completion mask `mask`)."""
    twoB, T = mask.shape
    # TRL shifts: completion_mask[..., 1:] marks the scored tokens; prepend one prompt column
    completion_mask = torch.cat([torch.zeros(twoB, 1, dtype=torch.long), mask], 1)

    def model(**kw):
        return SimpleNamespace(
            log_probs=tok_logps * mask,
            entropy=torch.zeros(twoB, T, dtype=tok_logps.dtype),
            mean_logits=torch.zeros(twoB, T, dtype=tok_logps.dtype),
            is_top1=torch.zeros(twoB, T, dtype=torch.bool),
        )

    model.training = True
    ref_logps = (ref_tok_logps * mask).sum(1)
    inputs = {
        "input_ids": torch.zeros(twoB, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(twoB, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_logps[: twoB // 2],
        "ref_rejected_logps": ref_logps[twoB // 2 :],
    }
    self = _trl_self(
        model=model,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    return trl_dpo.DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(loss_type, beta):
    tok, ref_tok, mask = _random_batch(seed=int(beta * 10))
    ls = 0.1 if loss_type == "robust" else 0.0
    expected = _trl_dpo(loss_type, beta, tok, ref_tok, mask, label_smoothing=ls)
    seq, ref_seq, n = L.masked_sum(tok, mask, 1), L.masked_sum(ref_tok, mask, 1), mask.sum(1)
    B = len(seq) // 2
    out = L.dpo_loss(
        seq[:B],
        seq[B:],
        ref_seq[:B],
        ref_seq[B:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=ls,
        chosen_len=n[:B],
        rejected_len=n[B:],
    )
    assert abs(out.loss.item() - float(expected)) < 1e-6


@pytest.mark.parametrize("margin", [None, 0.5])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_matches_trl(margin, center):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(16, 1, generator=g, dtype=torch.float64) * 2

    def model(**kw):
        return SimpleNamespace(logits=r)

    model.training = True
    inputs = {"attention_mask": torch.ones(16, 4, dtype=torch.long)}
    m = None
    if margin is not None:
        m = torch.full((8,), margin, dtype=torch.float64)
        inputs["margin"] = m
    self = _trl_self(model=model, args=SimpleNamespace(center_rewards_coefficient=center))
    expected = trl_reward.RewardTrainer.compute_loss(self, model, inputs)
    got = L.reward_loss(r[:8, 0], r[8:, 0], margin=m, center_coef=center)
    assert abs(got.item() - expected.item()) < 1e-6


# --- oracles from ALIGNMENT.md ------------------------------------------------------------
def _dpo_at(delta, loss_type, beta=0.1):
    z = torch.zeros(1, dtype=torch.float64)
    return L.dpo_loss(z + delta, z, z, z, beta=beta, loss_type=loss_type, label_smoothing=0.1).loss.item()


def test_dpo_oracles():
    assert _dpo_at(0.0, "sigmoid") == pytest.approx(0.693147, abs=1e-6)
    assert _dpo_at(0.0, "robust") == pytest.approx(0.693147, abs=1e-6)
    assert _dpo_at(0.0, "hinge") == pytest.approx(1.0, abs=1e-9)
    assert _dpo_at(0.0, "ipo") == pytest.approx(25.0, abs=1e-9)
    assert _dpo_at(1.0, "sigmoid") == pytest.approx(0.644397, abs=1e-6)
    assert _dpo_at(10.0, "sigmoid") == pytest.approx(0.313262, abs=1e-6)
    d = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(1, dtype=torch.float64)
    L.dpo_loss(d, z, z, z, beta=0.1).loss.backward()
    assert d.grad.item() == pytest.approx(-0.05, abs=1e-9)


def test_dpo_implicit_rewards_and_accuracy():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.5, 0.0]))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.5, 0.5]))
    assert out.accuracy == 0.5 and out.margin == pytest.approx(0.25)


def test_reward_oracles():
    r = torch.tensor([0.3, -1.2])
    assert L.reward_loss(r, r).item() == pytest.approx(math.log(2), abs=1e-6)
    assert L.reward_loss(r, r, margin=1.5).item() == pytest.approx(-math.log(1 / (1 + math.exp(1.5))), abs=1e-6)


def test_gae_oracles():
    m = torch.ones(1, 3)
    a, ret = L.gae(torch.tensor([[0.0, 0, 1]]), torch.zeros(1, 3), m, 1.0, 0.95)
    assert torch.allclose(a, torch.tensor([[0.9025, 0.95, 1.0]]))
    assert torch.allclose(ret, a)
    a, _ = L.gae(torch.tensor([[0.0, 0, 1]]), torch.full((1, 3), 0.5), m, 1.0, 0.95)
    assert torch.allclose(a, torch.tensor([[0.45125, 0.475, 0.5]]))
    v = torch.tensor([[0.2, 0.4, 0.6]])
    a, ret = L.gae(torch.tensor([[-0.1, -0.2, 1]]), v, m, 1.0, 0.95)
    assert torch.allclose(a, torch.tensor([[0.461, 0.38, 0.4]]), atol=1e-6)
    assert torch.allclose(ret, a + v)


def test_gae_padding_is_invisible():
    r, v = torch.tensor([[-0.1, -0.2, 1.0]]), torch.tensor([[0.2, 0.4, 0.6]])
    a, _ = L.gae(r, v, torch.ones(1, 3))
    # same sequence padded with junk rewards/values after its end, batched with another row
    r2 = torch.tensor([[-0.1, -0.2, 1.0, 7.0, 9.0], [1, 1, 1, 1, 1.0]])
    v2 = torch.tensor([[0.2, 0.4, 0.6, 5.0, 5.0], [0, 0, 0, 0, 0.0]])
    m2 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1.0]])
    a2, ret2 = L.gae(r2, v2, m2)
    assert torch.allclose(a2[0, :3], a[0]) and (a2[0, 3:] == 0).all() and (ret2[0, 3:] == 0).all()


def test_kl_oracles():
    lp, ref = torch.tensor(-1.0), torch.tensor(-1.5)
    assert L.kl_k1(lp, ref).item() == pytest.approx(0.5)
    assert L.kl_k3(lp, ref).item() == pytest.approx(0.106531, abs=1e-6)
    logp = torch.linspace(-3, 3, 101)
    assert (L.kl_k3(logp, torch.zeros_like(logp)) >= 0).all()


def test_adaptive_kl_oracle():
    c = L.AdaptiveKLController(0.2, 6, 10000)
    assert c.update(12, 256) == pytest.approx(0.201024, abs=1e-9)
    c = L.AdaptiveKLController(0.2, 6, 10000)
    assert c.update(3, 256) < 0.2  # under target -> beta shrinks


def test_ppo_clip_oracles():
    m = torch.ones(1, 1)
    out = L.ppo_policy_loss(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.ones(1, 1), m)
    assert out.loss.item() == pytest.approx(-1.2) and out.clip_frac.item() == 1.0
    out = L.ppo_policy_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), -torch.ones(1, 1), m)
    assert out.loss.item() == pytest.approx(0.8)
    # first minibatch: pi == pi_old -> ratio 1, nothing clipped, approx-KL 0, loss = -mean(A)
    lp = torch.randn(4, 6)
    adv, mask = torch.randn(4, 6), (torch.rand(4, 6) > 0.3).float()
    out = L.ppo_policy_loss(lp, lp.clone(), adv, mask)
    assert out.clip_frac.item() == 0 and out.approx_kl.item() == 0 and out.ratio_mean.item() == pytest.approx(1)
    assert out.loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-6)


def test_value_loss():
    v, old, ret, m = (
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[0.0, 1.0]]),
        torch.ones(1, 2),
    )
    loss, cf = L.ppo_value_loss(v, old, ret, m, clip=0.2)
    # token 0: unclipped (1-0)^2=1, clipped (0.2-0)^2 -> max 1; token 1: both 1 -> 0.5*mean(1,1)
    assert loss.item() == pytest.approx(0.5) and cf.item() == 0.0
    loss, cf = L.ppo_value_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.5 * 0.8**2) and cf.item() == 1.0


def test_whiten_masked_bessel():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0.0]])
    vals = x[m.bool()]
    expected = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8)
    w = L.whiten(x, m)
    assert torch.allclose(w[m.bool()], expected, atol=1e-6) and (w[~m.bool()] == 0).all()
    w2 = L.whiten(x, m, shift_mean=False)
    assert torch.allclose(w2[m.bool()], expected + vals.mean(), atol=1e-5)


def test_eos_penalty_and_token_rewards():
    s = torch.tensor([1.0, 1.0])
    assert torch.equal(L.apply_eos_penalty(s, torch.tensor([True, False]), 2.0), torch.tensor([1.0, -1.0]))
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1.0]])
    r, ns = L.per_token_rewards(s, kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.01, 1 - 0.02, 0.0], [-0.05, -0.05, 1 - 0.05]]))
    assert torch.allclose(ns.sum(1), torch.tensor([-0.03, -0.15]))


def test_group_advantages_matches_manual():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    a = L.group_advantages(r, 3)
    g = r.view(2, 3)
    exp = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(a, exp)
    assert torch.allclose(L.group_advantages(torch.ones(4), 2), torch.zeros(4))
    with pytest.raises(ValueError):
        L.group_advantages(torch.ones(5), 2)


def test_padding_invariance_dpo_and_policy_loss():
    tok, ref_tok, mask = _random_batch(B=4, T=7, seed=3)
    padded = torch.cat([tok, torch.randn(8, 5, dtype=tok.dtype)], 1)  # junk after every sequence
    pmask = torch.cat([mask, torch.zeros(8, 5, dtype=mask.dtype)], 1)
    ref_pad = torch.cat([ref_tok, torch.randn(8, 5, dtype=tok.dtype)], 1)
    a = L.dpo_loss(*L.masked_sum(tok, mask, 1).chunk(2), *L.masked_sum(ref_tok, mask, 1).chunk(2))
    b = L.dpo_loss(*L.masked_sum(padded, pmask, 1).chunk(2), *L.masked_sum(ref_pad, pmask, 1).chunk(2))
    assert abs(a.loss.item() - b.loss.item()) < 1e-12
    adv = torch.randn(8, 7, dtype=tok.dtype)
    p1 = L.ppo_policy_loss(tok, ref_tok, adv, mask).loss
    p2 = L.ppo_policy_loss(padded, ref_pad, torch.cat([adv, torch.randn(8, 5, dtype=tok.dtype)], 1), pmask).loss
    assert abs(p1.item() - p2.item()) < 1e-12


def test_token_mean_with_grad_accumulation_equals_full_batch():
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(8, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(8, 6, generator=g) > 0.4).double()
    full = L.ppo_policy_loss(lp, old, adv, mask).loss
    (gfull,) = torch.autograd.grad(full, lp)
    n = mask.sum().item()
    acc = sum(
        L.ppo_policy_loss(lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], denom=n).loss
        for i in range(0, 8, 2)
    )
    (gacc,) = torch.autograd.grad(acc, lp)
    assert abs(full.item() - acc.item()) < 1e-12 and torch.allclose(gfull, gacc)


def test_gather_logprobs_matches_log_softmax():
    logits, t = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, t[..., None])[..., 0]
    assert torch.allclose(L.gather_logprobs(logits, t, 0.7), ref, atol=1e-6)


def test_bad_arguments():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(z, z, z, z, loss_type="nope")
    with pytest.raises(ValueError, match="estimator"):
        L.kl_estimate(z, z, "k2")
