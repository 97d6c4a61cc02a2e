"""Q8_0 / Q4_0 / Q5_0 rows repacked sixteen at a time (qkv.quant.repack, kernels/quant_linear_x16.c).

- Repacking is a byte permutation: unpacking gives the file's bytes back exactly, and single
  rows read out of the repacked layout are the file's rows, tails (n_out % 16 rows) included.
- The sixteen-row kernel keeps the eight-row kernel's integer sums and float order, so on every
  path its output is bitwise the file layout's (portable vs portable; AVX2 and AVX-512 vs
  AVX2), hence within test_quant_kernels' derived bound of gguf's dequantization and bitwise
  the same for a row alone or in any batch; dequantizing the repacked rows is bitwise gguf's.
- The modules: prepare_for_inference repacks (QKV_REPACK=0 does not), and forward, the weight,
  embedding lookups, the state dict, export's bytes and the LoRA backward are unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.config import ModelConfig
from qkv.infer.backend import prepare_for_inference
from qkv.infer.generate import forward_step
from qkv.infer.kv_cache import new_kv_cache
from qkv.kernels import native
from qkv.kernels import quant_linear as ql
from qkv.model import build_model
from qkv.quant import QuantEmbedding, QuantLinear, quantize_model, repack
from test_quant_kernels import PATHS, make_blocks, needs_native, oracle_and_bound

T = GGMLQuantizationType
FORMATS = (T.Q8_0, T.Q4_0, T.Q5_0)


def packed_copy(blocks: np.ndarray, qt: T) -> torch.Tensor:
    return repack.repack_(torch.from_numpy(np.ascontiguousarray(blocks)).clone(), qt.name)


@settings(max_examples=30, deadline=None)
@given(
    qt=st.sampled_from(FORMATS), n_out=st.integers(1, 70), n_blocks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1)
)
def test_repack_is_a_byte_permutation_that_unpacks_exactly(qt, n_out, n_blocks, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_out, n_blocks * GGML_QUANT_SIZES[qt][1]), dtype=np.uint8)
    rows = torch.from_numpy(blocks)
    packed = packed_copy(blocks, qt)
    assert torch.equal(packed.flatten().sort().values, rows.flatten().sort().values)  # the same bytes
    tail = n_out // 16 * 16
    assert torch.equal(packed[tail:], rows[tail:])  # the last n_out % 16 rows stay as they were
    if tail:
        assert not torch.equal(packed[:tail], rows[:tail])  # random bytes: the groups did move
    assert torch.equal(repack.unpacked(packed, qt.name), rows)
    idx = torch.from_numpy(rng.integers(-n_out, n_out, (3, 5)))
    assert torch.equal(repack.rows(packed, qt.name, idx), rows[idx])
    with pytest.raises(IndexError, match="out of range"):
        repack.rows(packed, qt.name, torch.tensor([n_out]))
    with native.disabled():  # torch's permutation defines the same layout as the C one
        assert torch.equal(repack.repack_(rows.clone(), qt.name), packed)
        assert torch.equal(repack.rows(packed, qt.name, idx), rows[idx])
        assert torch.equal(repack.unpacked(packed, qt.name), rows)
    assert torch.equal(repack.unpack_(packed, qt.name), rows)  # in place


def test_only_q8_0_and_q4_0_repack():
    with pytest.raises(ValueError, match="q4_1 rows cannot be repacked"):
        repack.repack_(torch.zeros(16, 20, dtype=torch.uint8), "q4_1")
    with pytest.raises(ValueError, match="no repacked layout"):
        ql.kernel_type("q6_k", repacked=True)
    assert ql.kernel_type("q4_0") == 2 and ql.kernel_type("q4_0", repacked=True) == ql.REPACKED | 2


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    qt=st.sampled_from(FORMATS),
    n_blocks=st.integers(1, 4),
    n_out=st.integers(1, 50),
    rows=st.integers(1, ql.MAX_ROWS),
    bias=st.booleans(),
    random_bytes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_repacked_rows_give_the_file_layouts_outputs_bitwise(qt, n_blocks, n_out, rows, bias, random_bytes, seed):
    rng = np.random.default_rng(seed)
    n_in = 32 * n_blocks
    blocks = make_blocks(qt, n_out, n_in, rng, random_bytes)
    packed, code = packed_copy(blocks, qt), ql.kernel_type(qt, repacked=True)
    x = torch.from_numpy(rng.standard_normal((rows, n_in)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(n_out).astype(np.float32)) if bias else None
    ref, bound, _ = oracle_and_bound(x, blocks, qt, b)
    file_rows = torch.from_numpy(blocks)
    with torch.inference_mode():
        for path in PATHS:
            got = ql._run(x, packed, code, b, path)
            want = ql._run(x, file_rows, qt, b, "portable" if path == "portable" else "avx2")
            assert torch.equal(got, want), f"{qt.name} {path}: repacked differs from the file layout"
            assert ((got.double() - ref).abs() <= bound).all(), f"{qt.name} {path}: over the bound"
            alone = ql._run(x[-1:], packed, code, b, path)
            assert torch.equal(alone[0], got[-1]), f"{qt.name} {path}: a row alone differs from it in the batch"
        assert torch.equal(ql._run(x, packed, code, b, None), ql._run(x, packed, code, b, ql.isa(code)))
    for path in ("portable", "avx2")[: len(PATHS)]:  # dequantizing: gguf's values bit for bit
        assert torch.equal(ql.dequantize(packed, code, n_in, isa=path), ql.dequantize(file_rows, qt, n_in))


@needs_native
def test_dequantize_takes_whole_groups_of_repacked_rows():
    rng = np.random.default_rng(3)
    blocks = make_blocks(T.Q4_0, 40, 64, rng, random_bytes=False)
    packed, code = packed_copy(blocks, T.Q4_0), ql.kernel_type(T.Q4_0, repacked=True)
    full = ql.dequantize(torch.from_numpy(blocks), T.Q4_0, 64)
    for rows in (slice(0, 16), slice(16, 40), slice(32, 40), slice(0, 40)):
        assert torch.equal(ql.dequantize(packed, code, 64, rows), full[rows])
    with pytest.raises(ValueError, match="cut a sixteen-row group"):
        ql.dequantize(packed, code, 64, slice(8, 24))
    x = torch.randn(70, 64)
    with torch.no_grad():  # the prefill's tiles round to whole groups
        by_7, by_16 = (ql.tiled_linear(x, packed, code, tile_rows=n) for n in (7, 16))
        assert torch.equal(by_7, by_16)


CFG = ModelConfig(vocab_size=300, n_layer=1, d_model=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=64)


def _quantized(qtype: str) -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(build_model(CFG).eval(), qtype)


@needs_native
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_0"])
def test_a_prepared_model_is_repacked_and_computes_as_before(qtype, monkeypatch):
    plain, model = _quantized(qtype), prepare_for_inference(_quantized(qtype), "native")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert quant and all(m.repacked == (m.blocks.shape[0] >= 16) for m in quant.values())
    state = model.state_dict()
    for name, m in quant.items():
        p = plain.get_submodule(name)
        assert torch.equal(m.gguf_blocks(), p.blocks) and torch.equal(state[name + ".blocks"], p.blocks)
        assert torch.equal(m.weight, p.weight)
    ids = torch.randint(0, CFG.vocab_size, (2, 5))
    with torch.inference_mode():
        assert torch.equal(model.tok_emb(ids), plain.tok_emb(ids))
        for rows in (1, 3, 20, 70):  # the decode kernel, then the prefill's tiles
            x = torch.randn(rows, 64)
            mlp, ref = model.blocks[0].mlp.up_proj, plain.blocks[0].mlp.up_proj
            assert torch.equal(mlp(x), ref(x)), rows
    twin = _quantized(qtype)
    twin.load_state_dict(state)  # a state dict holds the file layout
    assert all(not m.repacked for m in twin.modules() if isinstance(m, QuantLinear))
    model.load_state_dict(state)  # and loading it into a repacked model repacks it again
    assert all(m.repacked for m in quant.values() if m.blocks.shape[0] >= 16)
    assert torch.equal(model.blocks[0].attn.q_proj.weight, plain.blocks[0].attn.q_proj.weight)
    monkeypatch.setenv("QKV_REPACK", "0")
    off = prepare_for_inference(_quantized(qtype), "native")
    assert not any(m.repacked for m in off.modules() if isinstance(m, QuantLinear))
    # decode (the fused native block and the tied head) gives the same logits bit for bit
    want = _decode_logits(off)
    assert torch.equal(_decode_logits(model), want)
    for m in quant.values():  # unpacked in place after a decode: the cached fused view must not keep the old type
        m.unpack()
    assert torch.equal(_decode_logits(model), want)


def _decode_logits(model: nn.Module) -> torch.Tensor:
    """The logits of a 3-token prompt and 4 greedy decode steps (batch 1)."""
    cache = new_kv_cache(CFG, 8)
    with torch.inference_mode():
        out = [forward_step(model, cache, torch.tensor([[5, 9, 2]]), last_only=True)]
        for _ in range(4):
            out.append(forward_step(model, cache, out[-1].argmax(-1)))
    return torch.cat(out, 1)


@needs_native
def test_the_frozen_base_backward_and_the_torch_fallback_read_repacked_rows():
    torch.manual_seed(1)
    lin = nn.Linear(64, 40)
    plain = QuantLinear.from_linear(lin, "q4_0")
    packed = QuantLinear.from_linear(lin, "q4_0")
    assert packed.repack() and packed.kernel_type == ql.REPACKED | 2
    x = torch.randn(3, 64, requires_grad=True)
    for m in (plain, packed):
        m(x).square().sum().backward()
        grad, x.grad = x.grad.clone(), None
        if m is plain:
            want = grad
    assert torch.equal(grad, want)
    with torch.no_grad(), native.disabled():  # no kernels: the whole weight unpacked and dequantized in torch
        assert torch.equal(packed(x), plain(x))
    packed.unpack()
    assert not packed.repacked and torch.equal(packed.blocks, plain.blocks)
