"""The native softmax step of the fused cross-entropy (kernels/cross_entropy.c) against
PyTorch's ops, and the fused loss with it installed against the loss without it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.kernels import cross_entropy
from qkv.model import loss as model_loss

needs_native = pytest.mark.skipif(cross_entropy._rows.get() is None, reason="no AVX2 CPU or C compiler here")


def reference(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor):
    """PyTorch's ops: the summed loss of the valid rows and softmax - one_hot (zero on
    invalid rows) in bf16, from fp32 log-probabilities."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = -(logp.gather(1, targets[:, None]).squeeze(1) * valid).sum()
    g = logp.exp()
    g[torch.arange(len(targets)), targets] -= 1.0
    return loss, (g * valid[:, None]).to(torch.bfloat16)


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(1, 700),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
    threads=st.sampled_from([1, 2]),
)
def test_rows_match_pytorch_and_do_not_depend_on_threads(n, v, scale, seed, threads):
    """Loss within 1e-5 relative; each gradient entry within one bf16 rounding step (the fp32
    values before rounding differ by the exp polynomial's < 2e-7 relative); vocabularies off the
    8-lane width, one-row chunks and masked rows included. The same bits on 1 or 2 threads."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.25
    want_loss, want_grad = reference(logits, targets, valid)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss, grad = cross_entropy.rows(logits.clone(), targets, valid, True)
        again, grad2 = cross_entropy.rows(logits.clone(), targets, valid, True)
    finally:
        torch.set_num_threads(before)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-5)
    # one bf16 step at each entry's size, or e^-87 = 1.6e-38 (the kernel's exp stops there
    # rather than make denormals)
    ulp = (want_grad.float().abs() * 2**-7).clamp(min=1.7e-38)
    assert ((grad.float() - want_grad.float()).abs() <= ulp).all()
    assert torch.equal(loss, again) and torch.equal(grad, grad2)
    assert not grad[~valid].any()


@needs_native
def test_gradient_overwrites_the_logits_and_the_loss_alone_leaves_them():
    logits = torch.randn(4, 50).to(torch.bfloat16)
    targets, valid = torch.tensor([0, 7, 49, 3]), torch.ones(4, dtype=torch.bool)
    kept = logits.clone()
    loss, grad = cross_entropy.rows(logits, targets, valid, False)
    assert grad is None and torch.equal(logits, kept)
    _, grad = cross_entropy.rows(logits, targets, valid, True)
    assert grad is logits and not torch.equal(logits, kept)


@needs_native
def test_a_target_outside_the_vocabulary_is_an_error_not_a_wild_read():
    logits = torch.randn(3, 10).to(torch.bfloat16)
    valid = torch.ones(3, dtype=torch.bool)
    with pytest.raises(IndexError, match="outside the vocabulary of 10"):
        cross_entropy.rows(logits, torch.tensor([1, 10, 2]), valid, True)
    with pytest.raises(IndexError):
        cross_entropy.rows(logits, torch.tensor([1, -1, 2]), valid, True)
    # an ignored row's target is never read
    cross_entropy.rows(logits, torch.tensor([1, 99, 2]), torch.tensor([True, False, True]), True)


def test_rows_decline_what_they_do_not_take():
    assert (
        cross_entropy.rows(torch.randn(3, 10), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), True)
        is None
    )
    assert not cross_entropy.applies(torch.randn(10, 3).to(torch.bfloat16).t())


@needs_native
def test_fused_loss_with_the_kernel_installed_matches_pytorch_ops_under_bf16_autocast():
    """What a bf16 training step computes with the Trainer's kernel and without it: the same
    loss and gradients within bf16 rounding."""
    torch.manual_seed(0)
    h0, w0 = torch.randn(300, 48), torch.randn(101, 48) * 0.3
    t = torch.randint(0, 101, (300,))
    t[::7] = -100

    def run():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model_loss.fused_linear_cross_entropy(h, w, t, chunk_elems=101 * 64)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    plain = run()
    model_loss.install_row_kernel(cross_entropy.rows)
    try:
        fast = run()
    finally:
        model_loss.install_row_kernel(None)
    assert fast[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    for got, want in zip(fast[1:], plain[1:]):
        assert (got - want).abs().max() <= 0.01 * want.abs().max()
