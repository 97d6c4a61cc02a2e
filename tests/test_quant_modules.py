"""QuantLinear / QuantEmbedding / quantize_model against their dequantized fp32 twins.

- QuantLinear(x) is F.linear(x, dequantized weight, bias) for 1..80 rows, with and without bias.
- QuantEmbedding(idx) is the dequantized table's rows.
- A tiny qkv model quantized to q8_0 keeps its logits within 2% of their largest magnitude
  (q8_0 rounds each weight to within max|w|/254 of its 32-weight block) and runs through
  model.forward, model.hidden and qkv.infer.generate (where the fused fp32 decode block must
  decline it: its weights are not fp32 parameters).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.infer.generate import generate
from qkv.infer.sampling import SamplingParams
from qkv.model import build_model
from qkv.model.layers import RMSNorm
from qkv.quant import QuantEmbedding, QuantLinear, dequantize, quantize, quantize_model

CFG = ModelConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=64)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_1", "q5_k", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_is_f_linear_of_its_dequantized_weight(qtype, bias):
    lin = nn.Linear(256, 48, bias=bias)
    q = QuantLinear.from_linear(lin, qtype)
    assert q.blocks.dtype == torch.uint8 and torch.equal(q.blocks, quantize(lin.weight, qtype))
    w = q.dequantized_weight()
    assert torch.equal(w, dequantize(q.blocks, qtype, 256)) and torch.equal(q.weight, w)
    if bias:
        assert q.bias.dtype == torch.float32 and torch.equal(q.bias, lin.bias)
    with torch.no_grad():
        for rows in range(1, 81):
            x = torch.randn(rows, 256)
            _assert_within_activation_rounding(q(x), F.linear(x, w, q.bias), x, w, qtype)
        x = torch.randn(2, 3, 256)  # leading dimensions
        _assert_within_activation_rounding(q(x), F.linear(x, w, q.bias), x, w, qtype)


def _assert_within_activation_rounding(got, want, x, w, qtype):
    """The native kernel (up to 64 rows) rounds each activation block to int8 as ggml does,
    x ~= q * amax / 127 (blocks of 32, or 256 for K-quants): an output moves by at most
    sum_j |w_j| * amax(block of j) / 254. bf16/f16 weights multiply fp32 x directly."""
    block = 256 if qtype.endswith("_k") else 32
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().reshape(rows.shape[0], -1, block).amax(-1).repeat_interleave(block, dim=-1)
    rounding = 0.0 if qtype in ("bf16", "f16") else 1.0
    bound = rounding * (amax / 254) @ w.abs().T + 1e-4 * (rows.abs() @ w.abs().T) + 1e-5
    assert ((got - want).abs().reshape(bound.shape) <= bound).all()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q6_k"])
def test_quant_embedding_rows_are_the_dequantized_table(qtype):
    emb = nn.Embedding(100, 256)
    q = QuantEmbedding.from_embedding(emb, qtype)
    table = q.dequantized_weight()
    assert table.shape == (100, 256) and torch.equal(q.weight, table)
    idx = torch.tensor([[3, 99, 0, 3], [7, 7, 42, 1]])
    assert torch.equal(q(idx), table[idx])
    assert (table - emb.weight).abs().max() < 0.5  # the format's rounding, not garbage


def test_quantize_model_swaps_linears_and_embeddings_keeps_norms_fp32():
    model = build_model(CFG.replace(qkv_bias=True)).eval()
    q = quantize_model(copy.deepcopy(model), "q8_0", exclude=["blocks.1.mlp.*"])
    assert isinstance(q.tok_emb, QuantEmbedding)
    assert isinstance(q.blocks[0].attn.q_proj, QuantLinear) and isinstance(q.blocks[0].mlp.down_proj, QuantLinear)
    assert isinstance(q.blocks[1].mlp.up_proj, nn.Linear)  # excluded
    bias = q.blocks[0].attn.q_proj.bias
    assert isinstance(bias, nn.Parameter) and bias.dtype == torch.float32
    assert torch.equal(bias, model.blocks[0].attn.q_proj.bias)
    norms = [m for m in q.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * CFG.n_layer + 1 and all(m.weight.dtype == torch.float32 for m in norms)
    only = quantize_model(copy.deepcopy(model), "q4_0", include=["blocks.*.attn.*"])
    assert isinstance(only.tok_emb, nn.Embedding) and isinstance(only.blocks[1].attn.o_proj, QuantLinear)
    assert isinstance(only.blocks[1].mlp.gate_proj, nn.Linear)


def test_quantize_model_names_a_module_the_blocks_do_not_tile():
    model = build_model(CFG)  # d_model 64: no whole 256-weight K-quant block
    message = r"^tok_emb: q4_k: a row of 64 weights is not a whole number .* exclude=\['tok_emb'\]"
    with pytest.raises(ValueError, match=message):
        quantize_model(model, "q4_k")


def test_tiny_model_q8_0_logits_close_to_fp32_and_it_generates():
    model = build_model(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():  # weights of realistic size, so logits are not ~0
            p.add_(torch.randn_like(p) * 0.05)
    q = quantize_model(copy.deepcopy(model), "q8_0")
    ids = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad():
        ref, out = model(ids), q(ids)
        torch.testing.assert_close(q.head(q.hidden(ids)), out, rtol=0, atol=0)  # the tied head reads tok_emb.weight
    err = (out - ref).abs().max().item()
    assert err <= 0.02 * ref.abs().max().item(), (err, ref.abs().max().item())
    assert err > 0  # the weights really were rounded

    # the same model with the dequantized weights as plain fp32: generate agrees token for token
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, (QuantLinear, QuantEmbedding)):
                twin.get_submodule(name).weight.copy_(m.dequantized_weight())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert generate(q, [5, 9, 2, 7], params) == generate(twin, [5, 9, 2, 7], params)


class _Rows:
    """A plain (V, d) tensor lent a tile at a time, counting the rows lent."""

    def __init__(self, w: torch.Tensor, group: int = 1):
        self.w, self.shape, self.group, self.lent = w, tuple(w.shape), group, []

    def rows(self, start: int, stop: int) -> torch.Tensor:
        assert start % self.group == 0
        self.lent.append((start, stop))
        return self.w[start:stop]


@pytest.mark.parametrize("n", [1, 37, 300])
def test_tiled_head_loss_and_grad_match_plain_cross_entropy(n):
    """The loss over a head lent a tile of rows at a time (online log-sum-exp over tiles, then
    softmax - one_hot per tile) equals F.cross_entropy of the whole logits, and so does its
    gradient for h, with ignored targets and with tiles that do not divide the vocabulary."""
    import qkv.model.loss as loss_module

    torch.manual_seed(n)
    v, d = 1000, 48
    w = torch.randn(v, d) * 0.5
    t = torch.randint(0, v, (n,))
    t[: n // 3] = -100
    h0 = torch.randn(n, d)
    h_ref, h = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    plain = F.cross_entropy(h_ref @ w.t(), t, ignore_index=-100)
    plain.backward()
    rows = _Rows(w, group=16)
    tiled = loss_module.fused_linear_cross_entropy(h, rows, t)
    tiled.backward()
    assert tiled.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    assert rows.lent[0][0] == 0 and rows.lent[-1][1] == v  # every row lent, starting on groups
    with torch.no_grad():
        assert loss_module.fused_linear_cross_entropy(h0, rows, t).item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.parametrize("repacked", [False, True])
def test_quantized_tied_head_trains_without_its_whole_table_in_fp32(repacked, monkeypatch):
    """A model whose tied embedding is quantized (QLoRA's frozen head) computes model.loss
    from tiles of the table: never the whole dequantized table, and the same loss and
    gradients as the model with that table dequantized to fp32."""
    cfg = CFG.replace(vocab_size=4000, d_model=64)
    model = build_model(cfg)
    q = quantize_model(copy.deepcopy(model), "q8_0", include=["tok_emb"])
    if repacked and not q.tok_emb.repack():
        pytest.skip("rows are repacked only by the native kernels, which are off here (QKV_NATIVE=0 or no AVX2 CPU)")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.tok_emb.weight.copy_(q.tok_emb.dequantized_weight())
    twin.tok_emb.weight.requires_grad_(False)
    x, y = torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))
    ref = twin.loss(x, y)
    ref.backward()

    def whole_table(*args, **kwargs):
        raise AssertionError("the loss dequantized the whole head")

    monkeypatch.setattr(QuantEmbedding, "dequantized_weight", whole_table)
    loss = q.train().loss(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    trained = dict(twin.named_parameters())
    for name, p in q.named_parameters():  # the twin also has the frozen table, which q keeps as blocks
        torch.testing.assert_close(p.grad, trained[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_alignment_logprobs_through_a_quantized_tied_head_match_the_fp32_twin(monkeypatch):
    """DPO's sequence log-probs and GRPO/PPO's per-token ones read a quantized tied head in
    tiles (qkv.align.policy.head_logprobs): the same values and gradients as the model with
    the table dequantized to fp32, at a sampling temperature, without the whole table."""
    from qkv.align.policy import head_logprobs

    cfg = CFG.replace(vocab_size=3000)
    model = build_model(cfg)
    q = quantize_model(copy.deepcopy(model), "q8_0", include=["tok_emb"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.tok_emb.weight.copy_(q.tok_emb.dequantized_weight())
    h0, targets = torch.randn(2, 9, cfg.d_model), torch.randint(0, cfg.vocab_size, (2, 9))
    h_ref, h = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    ref = head_logprobs(twin, h_ref, targets, temperature=0.7)
    weights = torch.randn(2, 9)  # any downstream use of the log-probs
    (ref * weights).sum().backward()
    monkeypatch.setattr(QuantEmbedding, "dequantized_weight", lambda self: pytest.fail("whole table dequantized"))
    lp = head_logprobs(q, h, targets, temperature=0.7)
    (lp * weights).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
