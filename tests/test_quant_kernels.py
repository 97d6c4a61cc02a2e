"""The native matvec over GGUF blocks (qkv.kernels.quant_linear) against the gguf package's
dequantization followed by an fp64 matmul, its three paths against each other, and
batch invariance.

The error bound, per output y[r, o] = sum_j w[o, j] x[r, j] (w as gguf dequantizes it):

1. Activation rounding. The kernel rounds each block b of a row of x (32 values, 256 for
   the K-quants) to q_j * dx_b with dx_b = max|x_j| / 127, so |x_j - q_j dx_b| <= dx_b / 2
   (plus < 2^-16 of that from the float arithmetic of the rounding). Weighted by w:
       act[r, o] = sum_b (dx_b / 2) (1 + 2^-16) sum_{j in b} |w[o, j]|.
   F16 and BF16 multiply fp32 x directly: act = 0.
2. Float rounding. Integer block dots are exact; each float operation after them adds at
   most 2^-24 of the running magnitude, and an output takes fewer than n_in + 64 of them
   (the portable path sums F16 one weight at a time). The terms are split as the kernel
   splits them (Q4_1: d*q + m, Q4_K: d*sc*q - dmin*m, ...), so each term's size is
   bounded by U_b, the largest part a weight of block b can have given its scales
   (Q8_0: 128|d|; Q4_0: 8|d|; Q4_1: 15|d| + |m|; Q5_0: 16|d|; Q5_1:
   31|d| + |m|; Q4_K: 15*63|d| + 63|dmin|; Q5_K: 31*63|d| + 63|dmin|; Q6_K: (63 + 32)*128|d|;
   F16/BF16: |w_j|), times |q_j dx_b| <= |x_j| + dx_b:
       flt[r, o] = (n_in + 64) 2^-24 sum_j U_b(j) (|x[r, j]| + dx_b(j)).
   This also covers gguf's own float32 rounding of w and the float32 output.

|kernel - oracle| <= act + flt. Two paths see the same int8 activations, so they differ by
at most 2 flt. The K-quant integer sums land in the same lanes on AVX2 and AVX-512, so
those two paths agree bitwise there.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.kernels import native
from qkv.kernels import quant_linear as ql

T = GGMLQuantizationType
needs_native = pytest.mark.skipif(ql._linear.get() is None, reason="no AVX2 CPU or C compiler here (or QKV_NATIVE=0)")
PATHS = ql.ISAS[: ql.ISAS.index(ql.isa()) + 1] if ql.isa() != "off" else ()
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)

# where each format keeps its fp16 scale d and its min/dmin (None: none), and U_b's factors
_SCALES = {
    T.Q8_0: (0, None, 128, 0),
    T.Q4_0: (0, None, 8, 0),
    T.Q4_1: (0, 2, 15, 1),
    T.Q5_0: (0, None, 16, 0),
    T.Q5_1: (0, 2, 31, 1),
    T.Q4_K: (0, 2, 15 * 63, 63),
    T.Q5_K: (0, 2, 31 * 63, 63),
    T.Q6_K: (208, None, 95 * 128, 0),
}


def _fp16_at(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float64)


def make_blocks(qt: T, n_out: int, n_in: int, rng: np.random.Generator, random_bytes: bool) -> np.ndarray:
    """(n_out, row_bytes) uint8: gguf's own quantization of random weights where it has
    one (and random_bytes is False), else random bytes with finite random fp16 scales."""
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    if qt in (T.F16, T.BF16):
        return quants.quantize(w, qt).view(np.uint8).reshape(n_out, -1)
    if not random_bytes and qt not in K_QUANTS:
        return quants.quantize(w, qt)
    block, size = GGML_QUANT_SIZES[qt]
    blocks = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    d_at, m_at, _, _ = _SCALES[qt]
    for at, high in ((d_at, 0.05), (m_at, 0.5)):
        if at is not None:
            scale = rng.uniform(-high, high, blocks.shape[:2]).astype(np.float16)
            blocks[..., at : at + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(n_out, -1)


def oracle_and_bound(x: torch.Tensor, blocks: np.ndarray, qt: T, bias: torch.Tensor | None):
    """The fp64 product with gguf's dequantized weights, the bound act + flt (module
    docstring) and flt alone."""
    n_out, n_in = blocks.shape[0], x.shape[-1]
    w = quants.dequantize(blocks, qt).reshape(n_out, n_in).astype(np.float64)
    xs = x.numpy().astype(np.float64)
    ref = xs @ w.T + (0 if bias is None else bias.numpy().astype(np.float64))
    if qt in (T.F16, T.BF16):
        act = np.zeros_like(ref)
        flt = (n_in + 64) * 2.0**-24 * (np.abs(xs) @ np.abs(w).T)
    else:
        block, _ = GGML_QUANT_SIZES[qt]
        nb = n_in // block
        xb = x.numpy().reshape(x.shape[0], nb, block)
        dx = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float64)  # (rows, nb)
        wsum = np.abs(w).reshape(n_out, nb, block).sum(-1)  # (n_out, nb)
        act = (dx / 2 * (1 + 2.0**-16)) @ wsum.T
        raw = blocks.reshape(n_out, nb, -1)
        d_at, m_at, d_factor, m_factor = _SCALES[qt]
        u = d_factor * np.abs(_fp16_at(raw, d_at))
        if m_at is not None:
            u = u + m_factor * np.abs(_fp16_at(raw, m_at))  # (n_out, nb)
        mass = np.abs(xb).astype(np.float64).sum(-1) + block * dx  # sum_j (|x_j| + dx_b), (rows, nb)
        flt = (n_in + 64) * 2.0**-24 * (mass @ u.T)
    return torch.from_numpy(ref), torch.from_numpy(act + flt), torch.from_numpy(flt)


def run(x, blocks, qt, bias, path):
    with torch.inference_mode():
        return ql._run(x, torch.from_numpy(np.ascontiguousarray(blocks)), qt, bias, path)


@needs_native
@settings(max_examples=60, deadline=None)
@given(
    qt=st.sampled_from(ql.FORMATS),
    n_blocks=st.integers(1, 5),
    n_out=st.integers(1, 19),
    rows=st.integers(1, ql.MAX_ROWS),
    bias=st.booleans(),
    random_bytes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_path_matches_gguf_dequantize_within_the_derived_bound(
    qt, n_blocks, n_out, rows, bias, random_bytes, seed
):
    rng = np.random.default_rng(seed)
    block = GGML_QUANT_SIZES[qt][0]
    n_in = n_blocks * (block if block > 1 else 23)  # F16/BF16: any width, here with a tail
    blocks = make_blocks(qt, n_out, n_in, rng, random_bytes)
    x = torch.from_numpy(rng.standard_normal((rows, n_in)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(n_out).astype(np.float32)) if bias else None
    ref, bound, flt = oracle_and_bound(x, blocks, qt, b)
    got = {path: run(x, blocks, qt, b, path) for path in PATHS}
    for path, y in got.items():
        err = (y.double() - ref).abs()
        assert (err <= bound).all(), f"{qt.name} {path}: error {err.max():.3g} over bound at {(err / bound).argmax()}"
    for path, y in got.items():  # the paths see the same int8 activations: only float rounding differs
        assert ((y.double() - got["portable"].double()).abs() <= 2 * flt).all(), f"{qt.name}: {path} vs portable"
    if qt in K_QUANTS and "avx512" in got:
        assert torch.equal(got["avx512"], got["avx2"])


@needs_native
@pytest.mark.parametrize("qt", ql.FORMATS, ids=lambda q: q.name)
def test_a_row_gives_bitwise_the_same_output_alone_or_in_any_batch(qt):
    rng = np.random.default_rng(int(qt))
    n_in = 3 * GGML_QUANT_SIZES[qt][0] if qt not in (T.F16, T.BF16) else 77  # odd block count: AVX-512's tail
    blocks = make_blocks(qt, 13, n_in, rng, random_bytes=False)
    x = torch.from_numpy(rng.standard_normal((ql.MAX_ROWS, n_in)).astype(np.float32))
    for path in PATHS:
        alone = torch.cat([run(x[i : i + 1], blocks, qt, None, path) for i in range(9)])
        for n in (2, 5, 9, ql.MAX_ROWS):
            assert torch.equal(run(x[:n], blocks, qt, None, path)[:9], alone[: min(n, 9)]), f"{path} at {n} rows"


@needs_native
@settings(max_examples=20, deadline=None)
@given(
    qt=st.sampled_from(ql.FORMATS),
    n_blocks=st.integers(1, 4),
    n_out=st.integers(1, 41),
    rows=st.integers(2, ql.MAX_ROWS),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_row_in_any_batch_and_position_is_bitwise_its_result_alone(qt, n_blocks, n_out, rows, seed):
    """Weight rows go through in groups (eight at a time for the 32-weight formats, the last
    group padded): a row of x must not see which other rows, or how many, share its call."""
    rng = np.random.default_rng(seed)
    block = GGML_QUANT_SIZES[qt][0]
    n_in = n_blocks * (block if block > 1 else 37)
    blocks = make_blocks(qt, n_out, n_in, rng, random_bytes=False)
    x = torch.from_numpy(rng.standard_normal((rows, n_in)).astype(np.float32))
    order = torch.from_numpy(rng.permutation(rows))
    for path in PATHS:
        batch = run(x, blocks, qt, None, path)
        shuffled = run(x[order], blocks, qt, None, path)
        assert torch.equal(shuffled, batch[order]), f"{path}: a row's result moved with its position"
        for i in order[:3].tolist():
            assert torch.equal(run(x[i : i + 1], blocks, qt, None, path)[0], batch[i]), f"{path}: row {i} alone"


@needs_native
def test_smollm2_shapes_leading_dims_and_the_best_path():
    rng = np.random.default_rng(0)
    blocks = make_blocks(T.Q4_0, 576, 1536, rng, random_bytes=False)  # down_proj
    x = torch.from_numpy(rng.standard_normal((2, 3, 1536)).astype(np.float32))
    y = run(x, blocks, T.Q4_0, None, None)
    assert y.shape == (2, 3, 576)
    ref, bound, _ = oracle_and_bound(x.reshape(6, 1536), blocks, T.Q4_0, None)
    assert ((y.reshape(6, 576).double() - ref).abs() <= bound).all()
    assert torch.equal(y, run(x, blocks, T.Q4_0, None, ql.isa("q4_0")))
    # 32-weight formats in the file's layout stay on AVX2 code; VNNI code is for repacked rows only
    expected = {"avx512vnni": "avx2", "avx512": "avx2", "avx2": "avx2", "off": "off"}[ql.isa()]
    assert ql.isa("q4_0") == expected
    assert ql.isa("q4_k") == ("avx512" if ql.isa() == "avx512vnni" else ql.isa())
    assert ql.isa(T.Q4_0 | ql.REPACKED) == ql.isa()


@needs_native
def test_non_finite_activations_give_nan_not_garbage():
    rng = np.random.default_rng(1)
    blocks = make_blocks(T.Q8_0, 4, 64, rng, random_bytes=False)
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32))
    x[0, 40] = float("inf")
    y = run(x, blocks, T.Q8_0, None, None)
    assert y[0].isnan().all() and y[1].isfinite().all()


def test_format_names_and_support():
    assert ql.qtype_of("q4_k") == ql.qtype_of("Q4_K") == ql.qtype_of(12) == T.Q4_K
    assert all(ql.supported(q) for q in ("q8_0", "q4_0", "q4_1", "q6_k", "q4_k", "q5_0", "q5_1", "q5_k", "f16", "bf16"))
    assert not ql.supported("q2_k") and not ql.supported("iq4_xs") and not ql.supported("no-such-type")
    assert ql.isa() in ("off", *ql.ISAS)
    with pytest.raises(ValueError, match="unknown quantization type"):
        ql.qtype_of("q9_9")


@needs_native
def test_returns_none_where_it_does_not_apply_and_rejects_mismatched_blocks():
    rng = np.random.default_rng(2)
    blocks = torch.from_numpy(make_blocks(T.Q8_0, 8, 64, rng, random_bytes=False))
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert ql.linear(x, blocks, "q8_0") is not None
        assert ql.linear(torch.randn(ql.MAX_ROWS + 1, 64), blocks, "q8_0") is None
        assert ql.linear(x.double(), blocks, "q8_0") is None
        assert ql.linear(x, blocks, "q2_k") is None  # a format the kernel does not read
        with native.disabled():
            assert ql.linear(x, blocks, "q8_0") is None
        with pytest.raises(ValueError, match="do not hold 64 Q4_0 weights"):
            ql.linear(x, blocks, "q4_0")
    assert ql.linear(x, blocks, "q8_0") is None  # autograd on: the caller's PyTorch path
