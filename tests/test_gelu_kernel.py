"""The native tanh-GELU (kernels/gelu.c) against PyTorch's, and a GPT-2 MLP with it installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.kernels import gelu
from qkv.model import layers

needs_native = pytest.mark.skipif(gelu._fwd.get() is None, reason="no AVX2 CPU or C compiler here")


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9000),
    spread=st.sampled_from([0.01, 1.0, 4.0, 30.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_backward_match_fp64(n, spread, dtype, seed):
    """fp32: value within 1e-6 and gradient within 2e-6 (times |g|) of fp64 - PyTorch's own
    kernel is as far; bf16: within one bf16 step of the fp64 result on the same inputs, plus
    the same fp32 noise (below x = -5 the derivative, ~1e-6, is lost to 1 + tanh(u) in fp32,
    PyTorch's too). Sizes off the 8 lanes and the 4096-value work items; tiny, moderate and
    saturated inputs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * spread).to(dtype).requires_grad_()
    grad = torch.randn(n, generator=g).to(dtype)
    y = gelu.gelu_tanh(x)
    y.backward(grad)
    xd = x.detach().double().requires_grad_()
    yd = F.gelu(xd, approximate="tanh")
    yd.backward(grad.double())
    assert y.dtype == dtype and x.grad.dtype == dtype
    if dtype == torch.float32:
        assert ((y.double() - yd).abs() <= 1e-6 * yd.abs().clamp(min=1)).all()
        assert ((x.grad.double() - xd.grad).abs() <= 2e-6 * grad.double().abs().clamp(min=1)).all()
    else:
        assert ((y.double() - yd).abs() <= 2**-8 * yd.abs() + 1e-6).all()
        assert ((x.grad.double() - xd.grad).abs() <= 2**-8 * xd.grad.abs() + 2e-6 * grad.double().abs()).all()


@needs_native
def test_declines_what_it_does_not_take():
    x = torch.randn(4, 6)
    assert gelu.gelu_tanh(x.half()) is None
    assert gelu.gelu_tanh(x.t()) is None  # not contiguous
    assert gelu.gelu_tanh(x.double()) is None


@needs_native
def test_an_mlp_with_the_kernel_installed_matches_f_gelu():
    torch.manual_seed(0)
    mlp = layers.GeluMLP(16, 64)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def run():
        mlp.zero_grad()
        x.grad = None
        out = mlp(x)
        out.square().sum().backward()
        return [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]

    want = run()
    before = layers.install_gelu_tanh_kernel(gelu.gelu_tanh)
    try:
        got = run()
    finally:
        layers.install_gelu_tanh_kernel(before)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
