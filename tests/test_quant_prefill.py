"""Prefill over quantized weights: the native dequantizer (qkv.kernels.quant_linear.dequantize)
against the gguf package; QuantLinear beyond 64 rows (the decode kernel, 64 rows a call, each
row bitwise its result alone); and the tiled product (tiled_linear, the fallback for formats
the kernel does not read, and QuantEmbedding.project as a tied head) against F.linear on gguf's
dequantized weights.

- dequantize is bit for bit gguf.quants.dequantize on every format and every path, on random
  bytes whose fp16 scales are any finite value (zeros, subnormals and -0 included), since each
  weight's products are exact in fp32 and only the sum with a min rounds.
- The tiled product is an fp32 GEMM on exactly those weights, so it may differ from F.linear
  only by float rounding: a sum of n_in products rounded in any order moves by at most
  n_in * 2^-24 * sum_j |x_j w_j| (plus the same again for the other side), bounded here by
  the 1e-4 relative tolerance the GEMM is held to, and it does not depend on the tile size
  beyond that rounding.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.config import ModelConfig
from qkv.infer.backend import logits, prepare_for_inference
from qkv.kernels import native
from qkv.kernels import quant_linear as ql
from qkv.model import build_model
from qkv.quant import QuantEmbedding, QuantLinear, quantize_model
from test_quant_kernels import oracle_and_bound

T = GGMLQuantizationType
needs_native = pytest.mark.skipif(ql._dequantize.get() is None, reason="no AVX2 CPU or C compiler (or QKV_NATIVE=0)")
PATHS = ("portable", "avx2") if ql.isa() != "off" else ()
# byte offsets of each format's fp16 fields (scale d, and min m or dmin)
FP16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q5_0: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2)}
FP16_FIELDS |= {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
WIDE = {
    T.F16: (np.uint16, 0x7C00, 0x03FF),
    T.BF16: (np.uint16, 0x7F80, 0x007F),
    T.F32: (np.uint32, 0x7F800000, 0x7FFFFF),
}


def finite_fp16(rng: np.random.Generator, shape) -> np.ndarray:
    """Random fp16 bit patterns, every finite value possible: exponent 31 (inf, NaN) becomes 30."""
    h = rng.integers(0, 2**16, shape, dtype=np.uint16)
    return np.where(h & 0x7C00 == 0x7C00, h ^ 0x0400, h).astype(np.uint16)


def random_blocks(qt: T, n_rows: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, row_bytes) random bytes; fp16 scales finite, F16/BF16/F32 values not NaN."""
    if qt in WIDE:
        dtype, exponent, mantissa = WIDE[qt]
        v = rng.integers(0, np.iinfo(dtype).max, (n_rows, n_in), dtype=dtype, endpoint=True)
        v = np.where((v & exponent == exponent) & (v & mantissa != 0), v & ~dtype(mantissa), v)  # NaN -> inf
        return v.astype(dtype).view(np.uint8).reshape(n_rows, -1)
    block, size = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (n_rows, n_in // block, size), dtype=np.uint8)
    for at in FP16_FIELDS[qt]:
        b[..., at : at + 2] = finite_fp16(rng, b.shape[:2])[..., None].view(np.uint8)
    return b.reshape(n_rows, -1)


def width(qt: T, n_blocks: int) -> int:
    block = GGML_QUANT_SIZES[qt][0]
    return n_blocks * (block if block > 1 else 21)  # F16/BF16/F32: a width with an AVX2 tail


@needs_native
@settings(max_examples=80, deadline=None)
@given(
    qt=st.sampled_from(ql.DEQUANTIZE_FORMATS),
    n_rows=st.integers(1, 40),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_dequantize_is_gguf_bit_for_bit_on_every_path(qt, n_rows, n_blocks, seed):
    rng = np.random.default_rng(seed)
    n_in = width(qt, n_blocks)
    blocks = random_blocks(qt, n_rows, n_in, rng)
    want = quants.dequantize(blocks, qt).reshape(n_rows, n_in).astype(np.float32).view(np.int32)
    for path in (None, *PATHS):
        got = ql.dequantize(torch.from_numpy(blocks), qt, n_in, isa=path)
        assert got is not None and got.shape == (n_rows, n_in)
        mismatch = np.flatnonzero(got.numpy().view(np.int32) != want)
        assert mismatch.size == 0, f"{qt.name} {path}: {mismatch.size} weights differ, first at {mismatch[:3]}"


@needs_native
def test_dequantize_rows_into_out_and_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    blocks = torch.from_numpy(random_blocks(T.Q4_K, 10, 512, rng))
    full = ql.dequantize(blocks, "q4_k", 512)
    out = torch.full((4 * 512 + 5,), float("nan"))
    part = ql.dequantize(blocks, "Q4_K", 512, rows=slice(3, 7), out=out)
    assert part.data_ptr() == out.data_ptr() and torch.equal(part, full[3:7]) and out[-5:].isnan().all()
    assert torch.equal(ql.dequantize(blocks, T.Q4_K, 512, rows=range(9, 10)), full[9:])
    assert ql.dequantize(blocks, "q4_k", 512, rows=slice(5, 5)).shape == (0, 512)
    with pytest.raises(ValueError, match="step-1 range"):
        ql.dequantize(blocks, "q4_k", 512, rows=slice(0, 10, 2))
    with pytest.raises(ValueError, match="step-1 range"):
        ql.dequantize(blocks, "q4_k", 512, rows=range(8, 11))
    with pytest.raises(ValueError, match="at least 2048 elements"):
        ql.dequantize(blocks, "q4_k", 512, rows=slice(0, 4), out=torch.empty(100))
    with pytest.raises(ValueError, match="do not hold 256 Q4_K weights"):
        ql.dequantize(blocks, "q4_k", 256)
    assert ql.dequantize(blocks, "q2_k", 512) is None  # a format the kernel does not read
    with native.disabled():
        assert ql.dequantize(blocks, "q4_k", 512) is None


def gguf_weight(blocks: np.ndarray, qt: T, n_in: int) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(blocks, qt).reshape(blocks.shape[0], n_in).astype(np.float32))


def assert_gemm_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None):
    """Within 1e-4 of the magnitude the sum is made of, sum_j |x_j w_j| (+ |b|), per output."""
    scale = x.reshape(-1, x.shape[-1]).abs() @ w.abs().T + (0 if bias is None else bias.abs())
    err = (got.reshape(scale.shape) - want.reshape(scale.shape)).abs()
    assert (err <= 1e-4 * scale + 1e-30).all(), f"error {(err / scale).max():.3g} of the magnitude"


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    qt=st.sampled_from([T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16, T.F32]),
    rows=st.integers(ql.MAX_ROWS + 1, 300),
    n_out=st.integers(1, 90),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_quant_linear_beyond_64_rows_gives_each_row_its_decode_result(qt, rows, n_out, bias, seed):
    """In inference mode a prompt's rows go through the decode kernel 64 at a time: each row's
    output is bitwise what the kernel gives it alone (so within the kernel's derived bound of
    the gguf weights' product); a format the kernel does not read takes the tiled fp32 GEMM."""
    rng = np.random.default_rng(seed)
    n_in = 256 if qt.name.endswith("_K") else 96
    if qt.name.endswith("_K"):  # gguf cannot quantize to K-quants: random bytes, finite scales
        blocks = random_blocks(qt, n_out, n_in, rng)
    else:  # gguf's own quantization of weights of a realistic size (random F32 bits overflow products)
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        blocks = quants.quantize(w, qt).view(np.uint8).reshape(n_out, -1)
    b = torch.from_numpy(rng.standard_normal(n_out).astype(np.float32)) if bias else None
    layer = QuantLinear.from_blocks(torch.from_numpy(blocks), qt.name, n_in, b)
    w = gguf_weight(blocks, qt, n_in)
    x = torch.from_numpy(rng.standard_normal((rows, n_in)).astype(np.float32))
    with torch.inference_mode(), mock.patch.object(ql, "tiled_linear", wraps=ql.tiled_linear) as tiled:
        got = layer(x)
        alone = [ql.linear(x[r : r + 1], layer.blocks, qt, b) for r in range(rows)]
    if qt in ql.FORMATS:
        assert tiled.call_count == 0, "a format the kernel reads takes it for every row"
        assert torch.equal(got, torch.cat(alone))
        ref, bound, _ = oracle_and_bound(x, blocks, qt, b)
        assert ((got.double() - ref).abs() <= bound).all()
    else:
        assert tiled.call_count == 1 and alone[0] is None
        assert_gemm_close(got, F.linear(x, w, b), x, w, b)


@needs_native
@pytest.mark.parametrize("qt", [T.Q4_1, T.Q6_K], ids=lambda q: q.name)
def test_the_result_does_not_depend_on_the_tile_size(qt):
    rng = np.random.default_rng(int(qt))
    n_in, n_out = 512, 203  # tiles that do and do not divide the rows
    blocks = torch.from_numpy(random_blocks(qt, n_out, n_in, rng))
    w = gguf_weight(blocks.numpy(), qt, n_in)
    w_scale = w.abs().amax()
    x = torch.randn(2, 70, n_in) / w_scale  # leading dimensions; products of order 1
    bias = torch.randn(n_out)
    with torch.no_grad():
        outs = {tile: ql.tiled_linear(x, blocks, qt, bias, tile_rows=tile) for tile in (1, 7, 64, 203, 1024)}
    want = F.linear(x, w, bias)
    for tile, y in outs.items():
        assert y is not None and y.shape == (2, 70, n_out), tile
        assert_gemm_close(y, want, x, w, bias)
        assert_gemm_close(y, outs[1024], x, w, bias)


@needs_native
def test_tied_quantized_head_projects_many_rows_through_the_tiles(monkeypatch):
    cfg = ModelConfig(vocab_size=300, n_layer=1, d_model=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=128)
    model = prepare_for_inference(quantize_model(build_model(cfg).eval(), "q8_0"), "native")
    head = model.tok_emb
    assert isinstance(head, QuantEmbedding) and model.lm_head is None
    table = gguf_weight(head.gguf_blocks().numpy(), T.Q8_0, 64)  # rows in the file layout (repacked here)
    calls = []
    project = QuantEmbedding.project
    monkeypatch.setattr(QuantEmbedding, "project", lambda self, h: calls.append(h.shape) or project(self, h))
    h = torch.randn(1, 100, 64)
    with torch.inference_mode():
        got = logits(model, h)
    assert calls == [(1, 100, 64)]
    assert_gemm_close(got, F.linear(h, table), h, table)
    with torch.inference_mode(), native.disabled():  # the torch fallback: the whole table at once
        assert_gemm_close(head.project(h), F.linear(h, table), h, table)


@needs_native
def test_autograd_and_other_dtypes_take_the_dequantized_fallback():
    lin = nn.Linear(64, 40, bias=True)
    q = QuantLinear.from_linear(lin, "q8_0")
    x = torch.randn(100, 64, requires_grad=True)
    assert ql.tiled_linear(x, q.blocks, "q8_0", q.bias) is None  # autograd through x
    assert ql.tiled_linear(x.detach().double(), q.blocks, "q8_0") is None
    y = q(x)
    y.sum().backward()
    w = q.dequantized_weight()
    assert x.grad is not None and torch.allclose(x.grad, w.sum(0).expand(100, -1))
    with torch.no_grad():  # the bias is a Parameter: with grad off it is read, not differentiated
        # outside inference mode (a training step's reference pass) many rows keep the fp32 product
        assert_gemm_close(q(x), F.linear(x, w, q.bias), x, w, q.bias)
    with torch.inference_mode():  # decoding and scoring: the int8 row kernel, row by row
        assert torch.equal(q(x), torch.cat([ql.linear(x[r : r + 1], q.blocks, "q8_0", q.bias) for r in range(100)]))
    with pytest.raises(ValueError, match="tile_rows must be positive"):
        ql.tiled_linear(x.detach(), q.blocks, "q8_0", tile_rows=0)


@needs_native
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_prompt_chunks_batched_past_64_rows_each_get_their_result_alone(qtype):
    """Five prompt chunks of 20 tokens (100 rows) in one call: each chunk's output is bitwise
    what it gets alone, so a seeded sample does not depend on which prompts shared its step."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 48), qtype)
    x = torch.randn(5, 20, 64)
    with torch.inference_mode():
        together = layer(x)
        for b in range(5):
            assert torch.equal(together[b], layer(x[b : b + 1])[0])
