"""Induction heads are real: a small qkv model trained on repeated random segments should
develop a head that the inspector scores as induction; the same model untrained has none.

STATUS: the untrained half passes. The trained half is a strict xfail: in every recipe
tried within a CPU-minute budget (2-3 layers, d 64-128, RoPE/learned, with/without qkv
bias, lr 1e-3..1e-2, up to ~3k steps, with or without an auxiliary skip-bigram task
that makes layer 0 grow a perfect previous-token head) the layer-1 heads stayed at
chance on this probe. SmolLM2's induction heads (tests/test_inspect.py) show the score
working on a trained model. Strict: the day it passes, the marker must go.

Training data: [random prefix][segment of L random tokens][the same segment][random
suffix], with L and the prefix length drawn per sequence, loss on the repeated copy only.
Random tokens make the copy unpredictable except by looking back: find the previous
occurrence of the current token, read what followed it. Varying L and the offset stops a
fixed-offset positional head from solving the task.

The probe (qkv.inspect.classify_heads) uses fresh random segments of two lengths that do
not occur as a shortcut pair: a head must score on both, so a head attending to a fixed
relative position (which scores on one length only) does not count. Threshold 0.4 (see
qkv.inspect.attention.THRESHOLDS): 40 % of the head's attention on the one right key, about
8x the chance level of uniform causal attention on this probe (~0.05).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.inspect.attention import THRESHOLDS, chance_level, classify_heads
from qkv.model import build_model

V, T = 64, 33
CFG = dict(vocab_size=V, n_layer=2, d_model=64, n_head=4, d_ff=16, max_seq_len=T, pos="learned")
PERM = torch.randperm(V, generator=torch.Generator().manual_seed(123))
SKIP_BIGRAM = 0.3  # share of sequences with x[t] = PERM[x[t-2]]: rewards a previous-token head


def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, V, (n, T), generator=g)
    mask = torch.zeros(n, T - 1, dtype=torch.bool)
    for b in range(n):
        if torch.rand(1, generator=g).item() < SKIP_BIGRAM:
            for t in range(2, T):
                x[b, t] = PERM[x[b, t - 2]]
            mask[b, 1:] = True
            continue
        L = int(torch.randint(4, 17, (1,), generator=g))
        p = int(torch.randint(0, T - 2 * L + 1, (1,), generator=g))
        x[b, p + L : p + 2 * L] = x[b, p : p + L]
        mask[b, p + L - 1 : p + 2 * L - 1] = True  # predict the second copy
    return x, mask


def induction_scores(model) -> torch.Tensor:
    """(L, H) min over two segment lengths of the inspector's induction score."""
    a = classify_heads(model, seg_len=13, batch=16, seed=1)
    b = classify_heads(model, seg_len=16, batch=16, seed=2)
    return torch.minimum(torch.tensor(a.induction), torch.tensor(b.induction))


def train(model, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x, mask = batch(32, g)
        loss = F.cross_entropy(model(x[:, :-1])[mask], x[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def test_untrained_model_has_no_induction_head():
    torch.manual_seed(0)
    before = induction_scores(build_model(ModelConfig(**CFG)))
    assert before.max() < 0.15, before  # about chance everywhere
    assert before.max() < THRESHOLDS["induction"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QKV_INDUCTION_TRAIN") != "1",
                    reason="known gap (see module docstring); ~80 s of training: run with QKV_INDUCTION_TRAIN=1")
@pytest.mark.xfail(strict=True, reason="induction does not form in this CPU budget yet (see module docstring)")
def test_trained_model_develops_an_induction_head():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a shared machine
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(**CFG))
        train(model, steps=STEPS)
        after = induction_scores(model)
    finally:
        torch.set_num_threads(threads)
    best = after.max().item()
    layer = int(after.max(dim=1).values.argmax())
    assert best >= THRESHOLDS["induction"], after
    assert best > 8 * chance_level(2 * 13, 13)
    assert layer >= 1, "an induction head needs a previous-token head below it"


STEPS = 1500
