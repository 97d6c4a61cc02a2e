"""GGUF block formats against the `gguf` package (llama.cpp's Python reference) as the oracle.

- The table (type ids, block and byte sizes) is gguf's.
- dequantize is bit-exact against gguf.quants.dequantize on random blocks of every format.
- quantize gives gguf.quants.quantize's bytes where gguf implements quantization (q8_0, q4_0,
  q4_1, q5_0, q5_1, bf16, f16, f32); gguf cannot quantize the K-quants, so there the
  round trip is held to the per-weight bounds derived in formats.quantize's docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.quant import FORMATS, block_format, dequantize, quantize

gguf = pytest.importorskip("gguf")
GGML_QUANT_SIZES, GGMLQuantizationType = gguf.GGML_QUANT_SIZES, gguf.GGMLQuantizationType

GGUF_QUANTIZES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16", "f16", "f32")
K_QUANTS = ("q4_k", "q5_k", "q6_k")
F16_FIELDS = {  # byte offsets of each block's fp16 scales
    "q8_0": (0,),
    "q4_0": (0,),
    "q4_1": (0, 2),
    "q5_0": (0,),
    "q5_1": (0, 2),
    "q4_k": (0, 2),
    "q5_k": (0, 2),
    "q6_k": (208,),
}


def gtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def random_blocks(name: str, rows: int, blocks_per_row: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes; fp16 fields (scales, or f16 values) replaced by finite halves."""
    f = block_format(name)
    b = torch.randint(0, 256, (rows * blocks_per_row, f.type_size), dtype=torch.uint8, generator=gen)

    def finite(n):
        return (torch.randn(n, 1, generator=gen) * 0.1).half().view(torch.uint8)

    if name == "f16":
        b = finite(b.shape[0])
    for off in F16_FIELDS.get(name, ()):
        b[:, off : off + 2] = finite(b.shape[0])
    if name == "f32":
        b = torch.randn(b.shape[0], 1, generator=gen).view(torch.uint8)
    return b.reshape(rows, blocks_per_row * f.type_size)


def gguf_dequantize(blocks: torch.Tensor, name: str) -> np.ndarray:
    data = blocks.numpy()
    if name == "f16":
        data = data.view(np.float16)
    return np.asarray(gguf.quants.dequantize(data, gtype(name)), dtype=np.float32)


def same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.contiguous().view(torch.int32).numpy(), b.view(np.int32))


def test_table_is_ggufs():
    for name, f in FORMATS.items():
        assert f.ggml_type == int(gtype(name)), name
        assert (f.block_size, f.type_size) == GGML_QUANT_SIZES[gtype(name)], name
    assert block_format("Q4_K") is block_format(12) is FORMATS["q4_k"]
    assert FORMATS["q4_0"].bits_per_weight == 4.5 and FORMATS["q6_k"].bits_per_weight == 6.5625


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_is_bit_exact_against_gguf(name):
    gen = torch.Generator().manual_seed(1)
    f = block_format(name)
    per_row = 3 if f.block_size > 1 else 96
    blocks = random_blocks(name, 5, per_row, gen)
    ours = dequantize(blocks, name, per_row * f.block_size)
    assert ours.dtype == torch.float32 and ours.shape == (5, per_row * f.block_size)
    assert same_bits(ours, gguf_dequantize(blocks, name))
    # leading dimensions are kept (an embedding lookup dequantizes (B, T, row_bytes))
    assert torch.equal(dequantize(blocks.reshape(5, 1, -1), name, per_row * f.block_size)[:, 0], ours)


def tricky_weights(n_cols: int, gen: torch.Generator) -> torch.Tensor:
    """Rows that hit the rounding rules: zeros, ties, a dominant negative, tiny values."""
    rows = [
        torch.randn(n_cols, generator=gen),
        torch.zeros(n_cols),
        torch.arange(n_cols, dtype=torch.float32) % 17 - 8,  # integers: many exact ties
        (torch.arange(n_cols, dtype=torch.float32) % 32) / 2 - 8,  # halves
        torch.randn(n_cols, generator=gen) * 1e-6,  # fp16 subnormal scales
        torch.where(torch.arange(n_cols) % 32 == 5, -50.0, torch.rand(n_cols, generator=gen)),
        torch.randn(n_cols, generator=gen) * 300,
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_quantize_gives_ggufs_bytes(name):
    w = tricky_weights(256, torch.Generator().manual_seed(2))
    ours = quantize(w, name)
    theirs = np.asarray(gguf.quants.quantize(w.numpy(), gtype(name))).view(np.uint8).reshape(w.shape[0], -1)
    assert ours.dtype == torch.uint8 and np.array_equal(ours.numpy(), theirs)


def test_gguf_cannot_quantize_k_quants():
    """Why the K-quants are held to error bounds: the oracle has no quantizer for them."""
    for name in K_QUANTS:
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(np.zeros((1, 256), np.float32), gtype(name))


def k_quant_bound(w: torch.Tensor, name: str) -> torch.Tensor:
    """The per-weight error bound of formats.quantize, computed from the weights alone."""

    def up(scale):  # stored fp16 scales are rounded up, by at most one fp16 step (2**-24 when subnormal)
        return scale * (1 + 2**-10) + 2**-24

    if name == "q6_k":
        a = w.reshape(-1, 16, 16).abs().amax(-1, keepdim=True)  # (blocks, 16, 1)
        d = up((a / 31).amax(1, keepdim=True) / 127)
        bound = a / 62 + d / 2
        return bound.expand(-1, -1, 16).reshape(w.shape)
    levels = {"q4_k": 15, "q5_k": 31}[name]
    x = w.reshape(-1, 8, 32)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    r = x.amax(-1, keepdim=True) - lo
    d = up((r / levels).amax(1, keepdim=True) / 63)
    dmin = up((-lo).amax(1, keepdim=True) / 63)
    bound = r / (2 * levels) + d / 2 + dmin / 2
    return bound.expand(-1, -1, 32).reshape(w.shape)


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_round_trip_within_bound(name):
    w = tricky_weights(512, torch.Generator().manual_seed(3))
    blocks = quantize(w, name)
    back = dequantize(blocks, name, 512)
    assert same_bits(back, gguf_dequantize(blocks, name))  # the oracle reads our bytes the same
    err = (back - w).abs()
    slack = 1e-6 * w.abs().amax(-1, keepdim=True)  # fp32 rounding in the arithmetic
    assert bool((err <= k_quant_bound(w, name) + slack).all()), (err - k_quant_bound(w, name)).max()
    assert torch.equal(back[1], torch.zeros(512))  # a zero row stays exactly zero


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(list(FORMATS)),
    rows=st.integers(1, 4),
    n_blocks=st.integers(1, 3),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_over_shapes(name, rows, n_blocks, scale, seed):
    f = block_format(name)
    n_cols = n_blocks * max(f.block_size, 32)
    w = torch.randn(rows, n_cols, generator=torch.Generator().manual_seed(seed)) * scale
    blocks = quantize(w, name)
    assert blocks.shape == (rows, f.row_bytes(n_cols)) and blocks.dtype == torch.uint8
    back = dequantize(blocks, name, n_cols)
    assert back.shape == w.shape
    if name in GGUF_QUANTIZES:
        theirs = np.asarray(gguf.quants.quantize(w.numpy(), gtype(name))).view(np.uint8).reshape(rows, -1)
        assert np.array_equal(blocks.numpy(), theirs)
    else:
        assert bool(((back - w).abs() <= k_quant_bound(w, name) + 1e-6 * scale * 10).all())


@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_width_not_divisible_by_block_is_one_line_error(name):
    with pytest.raises(ValueError, match=rf"^{name}: a row of 100 weights is not a whole number of \d+-weight blocks"):
        quantize(torch.randn(2, 100), name)
    with pytest.raises(ValueError, match="not a whole number") as e:
        dequantize(torch.zeros(2, 18, dtype=torch.uint8), name, 100)
    assert "\n" not in str(e.value)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"unknown quantized format 'q3_x'; qkv handles f32, f16"):
        quantize(torch.randn(1, 32), "q3_x")
    with pytest.raises(ValueError, match=r"q8_0: expected uint8 rows of 34 bytes for 32 weights, got torch.uint8 rows"):
        dequantize(torch.zeros(1, 35, dtype=torch.uint8), "q8_0", 32)
    with pytest.raises(ValueError, match="q4_k: a weight or block scale overflows fp16"):
        quantize(torch.full((1, 256), 1e9), "q4_k")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([[float("nan")] * 32]), "q8_0")
