"""The native causal attention for training (kernels/causal_attention.c) against fp64 SDPA,
and a model with it installed against the same model on SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.config import ModelConfig
from qkv.kernels import causal_attention
from qkv.model import attention as model_attention
from qkv.model import build_model

needs_native = pytest.mark.skipif(causal_attention._fwd.get() is None, reason="no AVX2 CPU or C compiler here")


def _inputs(B, H, Hkv, T, S, D, dtype, seed):
    """q/k/v in the projections' layout (B, T, heads, D) seen as (B, heads, T, D), as the model
    hands them over, and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    return q, k, v, torch.randn(B, H, T, D, generator=g).to(dtype)


def _reference(q, k, v, grad, scale):
    """fp64 SDPA on the same (already rounded) values; query i sees keys up to S - T + i."""
    T, S = q.shape[2], k.shape[2]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    out = F.scaled_dot_product_attention(*ref, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(grad.double())
    return [out.detach()] + [t.grad for t in ref]


def _run(q, k, v, grad, scale):
    out = causal_attention.attention(q, k, v, scale)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in (q, k, v)]


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    kv=st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]),
    T=st.integers(1, 70),
    extra=st.sampled_from([0, 0, 5]),
    D=st.sampled_from([8, 24, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_matches_fp64_sdpa_forward_and_backward(B, kv, T, extra, D, dtype, seed):
    """fp32: within 2e-5 of the largest value (fp32 sums over up to 75 keys). bf16: every
    product accumulates in fp32 and is rounded once, so each output and gradient entry is
    within one bf16 step (2^-8 relative) of the fp64 result on the same inputs, plus fp32
    noise. MHA, GQA and MQA; T off the 6-row tiles and 16-key columns; keys before the
    queries (S > T: query i at position S - T + i)."""
    H, Hkv = kv
    q, k, v, grad = _inputs(B, H, Hkv, T, T + extra, D, dtype, seed)
    scale = D**-0.5
    for got, want in zip(_run(q, k, v, grad, scale), _reference(q, k, v, grad, scale)):
        assert got.dtype == dtype and got.shape == want.shape
        err = (got.double() - want).abs()
        size = want.abs().max().item()
        if dtype == torch.float32:
            assert err.max().item() <= 2e-5 * max(size, 1.0)
        else:
            assert (err <= 2**-8 * want.abs() + 1e-4 * max(size, 1.0)).all()


@needs_native
def test_the_same_bits_on_one_or_two_threads():
    q, k, v, grad = _inputs(2, 4, 2, 45, 45, 32, torch.bfloat16, 0)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for t in (q, k, v):
                t.grad = None
            runs.append(_run(q, k, v, grad, 0.2))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_native
def test_declines_what_it_does_not_take():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32, 0)
    assert causal_attention.attention(q.half(), k.half(), v.half(), 0.25) is None  # fp16
    assert causal_attention.attention(q[..., :12], k[..., :12], v[..., :12], 0.25) is None  # D % 8
    assert causal_attention.attention(q, k[:, :, :4], v[:, :, :4], 0.25) is None  # fewer keys than queries
    assert causal_attention.attention(q, k.bfloat16(), v, 0.25) is None  # mixed dtypes
    assert causal_attention.attention(q.transpose(2, 3), k, v, 0.25) is None  # last axis strided


def _model(seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)
    return build_model(cfg)


@pytest.fixture
def installed():
    model_attention.install_causal_kernel(causal_attention.attention)
    yield
    model_attention.install_causal_kernel(None)


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_training_step_with_the_kernel_installed_matches_sdpa(installed, dtype):
    """Loss and every parameter gradient of a GQA model with RoPE: fp32 within 1e-5, and under
    bf16 autocast within what SDPA's own bf16 kernel differs from an fp32 step, twice over."""
    x = torch.randint(0, 97, (3, 33))

    def grads(kernel) -> tuple[float, list[torch.Tensor]]:
        model_attention.install_causal_kernel(kernel)
        model = _model(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    got_loss, got = grads(causal_attention.attention)
    sdpa_loss, sdpa = grads(None)
    if dtype == "fp32":
        assert got_loss == pytest.approx(sdpa_loss, abs=1e-5)
        for a, b in zip(got, sdpa):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    else:
        model_attention.install_causal_kernel(None)
        model = _model(0)  # an fp32 step: how far bf16 takes SDPA
        model.loss(x[:, :-1], x[:, 1:]).backward()
        exact = [p.grad for p in model.parameters()]
        for a, b, c in zip(got, sdpa, exact):
            assert (a - c).norm() <= 2 * (b - c).norm() + 1e-6


@needs_native
def test_dropout_and_masks_still_go_to_sdpa(installed):
    """The kernel is causal-only without dropout: a model in training mode with attention
    dropout, and an explicit mask, never reach it."""
    calls = []

    def spy(q, k, v, scale):
        calls.append(q.shape)
        return causal_attention.attention(q, k, v, scale)

    model_attention.install_causal_kernel(spy)
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32, 0)
    model_attention.fused_attention(q, k, v, None, 0.25, dropout_p=0.1)
    model_attention.fused_attention(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool), 0.25)
    assert calls == []
    model_attention.fused_attention(q, k, v, None, 0.25)
    assert len(calls) == 1


def test_a_kernel_that_declines_falls_back_to_sdpa():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32, 0)
    model_attention.install_causal_kernel(lambda *args: None)
    try:
        got = model_attention.fused_attention(q, k, v, None, 0.25)
    finally:
        model_attention.install_causal_kernel(None)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25))


@needs_native
def test_training_steps_use_the_kernel_and_leave_sdpa_installed_after(tmp_path, monkeypatch):
    from qkv.train.config import TrainConfig
    from qkv.train.trainer import Trainer

    calls = []
    real = causal_attention.attention

    def counted(q, k, v, scale):
        calls.append(torch.is_grad_enabled())
        return real(q, k, v, scale)

    monkeypatch.setattr(causal_attention, "attention", counted)
    data = torch.randint(0, 97, (2, 4, 17))
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, seq_len=16, warmup_steps=1, save_every=0,
        log_every=1, progress=False, threads=1,
    )  # fmt: skip
    Trainer(_model(0), cfg, lambda m, b: (m.loss(b[:, :-1], b[:, 1:]), {}), lambda step, micro: data[step]).fit()
    assert calls and all(calls)  # two layers a step, with autograd on
    from qkv.model import layers

    assert model_attention._causal_kernel is None and layers._gelu_tanh_kernel is None
