"""The model's own invariants: attention paths agree, positions behave as the papers say,
MoE dispatch is exact, parameter arithmetic matches the published figures."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import ModelConfig, build_model, count_params, preset
from qkv.model.attention import fused_attention, math_attention
from qkv.model.moe import MoE
from qkv.model.positions import apply_rope, rope_table, sinusoidal_table


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layer=2, d_model=48, n_head=6, n_kv_head=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("n_kv", [6, 3, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "none"])
def test_math_and_fused_paths_agree(n_kv, pos):
    model = build_model(tiny(n_kv_head=n_kv, pos=pos)).eval()
    x = torch.randint(0, 97, (3, 20))
    pad = torch.ones(3, 20, dtype=torch.bool)
    pad[1, :5] = False  # left padding
    for kp in (None, pad):
        model.cfg.attn_impl = "sdpa"
        fused = model(x, key_padding=kp)
        model.cfg.attn_impl = "math"
        plain = model(x, key_padding=kp)
        assert (fused - plain).abs().max() < 1e-5


@pytest.mark.parametrize("t_q,t_k", [(1, 9), (4, 9), (9, 9)])
def test_attention_kernels_agree_with_offsets(t_q, t_k):
    q = torch.randn(2, 6, t_q, 8)
    k, v = torch.randn(2, 2, t_k, 8), torch.randn(2, 2, t_k, 8)
    a, _ = math_attention(q, k, v, None, 8**-0.5)
    b = fused_attention(q, k, v, None, 8**-0.5)
    assert (a - b).abs().max() < 1e-5
    # against an explicit repeat of K/V over the group (the copy the kernels avoid)
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    s = (q @ kr.transpose(-1, -2)) * 8**-0.5
    qpos = torch.arange(t_k - t_q, t_k)[:, None]
    s = s.masked_fill(torch.arange(t_k)[None] > qpos, float("-inf"))
    assert (a - s.softmax(-1) @ vr).abs().max() < 1e-5


class ListCache:
    """The smallest KV cache that satisfies the model's protocol: concatenate per layer."""

    def __init__(self, n_layer):
        self.kv = [None] * n_layer

    def update(self, layer, k, v):
        if self.kv[layer] is not None:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal"])
def test_prefill_then_decode_through_cache_protocol(pos):
    model = build_model(tiny(pos=pos)).eval()
    x = torch.randint(0, 97, (2, 12))
    full = model(x)
    cache = ListCache(2)
    out = [model(x[:, :7], cache=cache)]
    for t in range(7, 12):
        out.append(model(x[:, t : t + 1], positions=torch.tensor([t]), cache=cache))
    assert (torch.cat(out, dim=1) - full).abs().max() < 1e-5


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 200), n=st.integers(0, 200), shift=st.integers(0, 200))
def test_rope_score_depends_only_on_offset(m, n, shift):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = rope_table(16, 512, 10000.0)

    def score(a, b):
        qa = apply_rope(q, cos[a].view(1, 1, 1, -1), sin[a].view(1, 1, 1, -1))
        kb = apply_rope(k, cos[b].view(1, 1, 1, -1), sin[b].view(1, 1, 1, -1))
        return (qa * kb).sum().item()

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)


def test_sinusoidal_table_matches_the_paper():
    d = 16
    table = sinusoidal_table(50, d)
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_scaling_linear_divides_positions():
    cos_lin, _ = rope_table(16, 64, 10000.0, {"type": "linear", "factor": 4.0})
    cos, _ = rope_table(16, 256, 10000.0)
    assert torch.allclose(cos_lin[8], cos[2], atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 2000), longer=st.integers(0, 2000), theta=st.sampled_from([10000.0, 1e6]))
def test_a_longer_rope_table_starts_with_the_shorter_one_bitwise(rows, longer, theta):
    """Growing the tables recomputes them longer: every row must be what a shorter (or
    the full) table holds, bit for bit, so a grown model decodes exactly as before."""
    scaling = {"type": "llama3", "factor": 8.0}
    for sc in (None, scaling):
        cos, sin = rope_table(64, rows, theta, sc)
        cos_long, sin_long = rope_table(64, rows + longer, theta, sc)
        assert torch.equal(cos, cos_long[:rows]) and torch.equal(sin, sin_long[:rows])


def test_rope_tables_are_built_short_and_grow_by_doubling_to_what_the_positions_need():
    from qkv.model.transformer import ROPE_ROWS_AT_BUILD

    cfg = tiny(max_seq_len=5000, head_dim=16, rope_local_theta=100.0, sliding_window=4, layer_types=["local", "global"])
    model = build_model(cfg).eval()
    tables = ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin")
    assert {getattr(model, n).shape for n in tables} == {(ROPE_ROWS_AT_BUILD, 16)}
    full = build_model(cfg).eval()
    full.grow_rope_tables(cfg.max_seq_len)  # a model holding today's whole tables
    full.load_state_dict(model.state_dict())
    assert full.rope_cos.shape[0] == cfg.max_seq_len  # doubling stops at the model's context
    ref = {n: t for n, t in zip(tables, [*rope_table(16, 5000, 10000.0), *rope_table(16, 5000, 100.0)])}
    assert all(torch.equal(getattr(full, n), ref[n]) for n in tables)
    x = torch.randint(0, 97, (1, 3))
    for start, rows in ((10, ROPE_ROWS_AT_BUILD), (2000, 2048), (2045, 2048), (2046, 4096), (4500, 5000)):
        pos = torch.arange(start, start + 3)
        with torch.no_grad():
            assert torch.equal(model(x, positions=pos), full(x, positions=pos))
        assert {getattr(model, n).shape[0] for n in tables} == {rows}
        assert all(torch.equal(getattr(model, n), ref[n][:rows]) for n in tables)
    with pytest.raises(IndexError):  # past the context, as with the whole tables
        model(x, positions=torch.arange(5000, 5003))


def test_a_compiled_model_reads_the_grown_rope_tables():
    from qkv.model.transformer import ROPE_ROWS_AT_BUILD

    cfg = tiny(max_seq_len=3 * ROPE_ROWS_AT_BUILD, head_dim=8)
    model, full = build_model(cfg).eval(), build_model(cfg).eval()
    full.load_state_dict(model.state_dict())
    full.grow_rope_tables(cfg.max_seq_len)
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing and guards, no codegen
    x = torch.randint(0, 97, (1, ROPE_ROWS_AT_BUILD + 8))
    with torch.no_grad():
        assert torch.equal(compiled(x), full(x))
        assert model.rope_cos.shape[0] == 2 * ROPE_ROWS_AT_BUILD
        pos = torch.arange(2500, 2503)  # given positions are not read in a graph: the whole table
        assert torch.equal(compiled(x[:, :3], positions=pos), full(x[:, :3], positions=pos))
        assert model.rope_cos.shape[0] == cfg.max_seq_len


def test_grown_rope_tables_keep_the_dtype_and_train_after_inference():
    model = build_model(tiny(max_seq_len=3000, head_dim=16), dtype=torch.bfloat16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), positions=torch.tensor([1500, 1501]))
    assert model.rope_cos.dtype == torch.bfloat16 and model.rope_cos.shape[0] == 2048
    assert torch.equal(model.rope_cos, rope_table(16, 2048, 10000.0)[0].to(torch.bfloat16))
    loss = model.loss(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]), positions=torch.tensor([1500, 1501, 1502]))
    loss.backward()  # tables grown under inference_mode are plain tensors


def test_moe_dispatch_matches_per_token_reference():
    cfg = tiny(n_expert=4, n_expert_per_token=2, moe_d_ff=32)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 11, 48)
    grouped = moe(x)
    moe.dispatch = "loop"
    looped = moe(x)
    ref = torch.zeros_like(x)
    flat = x.reshape(-1, 48)
    _, _, w, e = moe.route(flat)
    for t in range(flat.shape[0]):
        for j in range(2):
            ex = e[t, j]
            h = torch.nn.functional.silu(flat[t] @ moe.w_gate[ex]) * (flat[t] @ moe.w_up[ex])
            ref.view(-1, 48)[t] += w[t, j] * (h @ moe.w_down[ex])
    assert (grouped - ref).abs().max() < 1e-5
    assert (looped - ref).abs().max() < 1e-5


def test_moe_renormalisation_and_balance_loss():
    cfg = tiny(n_expert=4, n_expert_per_token=2, moe_renormalize=False, router_aux_coef=1.0, router_z_coef=0.0)
    moe = MoE(cfg)
    torch.nn.init.zeros_(moe.router.weight)  # uniform router: balance loss is exactly 1
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.1)
    moe.train()
    moe(torch.randn(3, 5, 48))
    assert moe.last_aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    _, _, w, _ = moe.route(torch.randn(7, 48))
    assert torch.allclose(w, torch.full_like(w, 0.25))  # OLMoE style: raw top-k probabilities
    moe.renormalize = True
    _, _, w, _ = moe.route(torch.randn(7, 48))
    assert torch.allclose(w.sum(-1), torch.ones(7))  # Mixtral style


def test_moe_trains_with_grouped_mm():
    model = build_model(tiny(n_expert=4, n_expert_per_token=2)).train()
    x = torch.randint(0, 97, (2, 16))
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 97), x.view(-1)) + model.aux_loss()
    loss.backward()
    g = model.blocks[0].mlp.w_gate.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_param_counts_of_real_configs_from_config_alone():
    mixtral = count_params(build_model(preset("mixtral-8x7b"), device="meta"))
    assert mixtral.total / 1e9 == pytest.approx(46.7, abs=0.05)
    assert mixtral.active / 1e9 == pytest.approx(12.9, abs=0.05)
    olmoe = count_params(build_model(preset("olmoe-1b-7b"), device="meta"))
    assert olmoe.total / 1e9 == pytest.approx(6.9, abs=0.05)
    assert olmoe.active / 1e9 == pytest.approx(1.3, abs=0.05)
    dense = count_params(build_model(tiny()))
    assert dense.total == dense.active
    assert dense.embedding == 97 * 48  # tied: the head shares the token embedding


def test_kv_bytes_per_token_shrinks_by_group_size():
    mha, mqa = tiny(n_kv_head=6), tiny(n_kv_head=1)
    assert mha.kv_bytes_per_token(2) == 2 * 2 * 6 * 8 * 2
    assert mha.kv_bytes_per_token() // mqa.kv_bytes_per_token() == 6


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(n_head=6, n_kv_head=4), "multiple of n_kv_head"),
        (dict(pos="alibi"), "unknown pos"),
        (dict(d_model=50, n_head=6), "not divisible"),
        (dict(n_expert=4, n_expert_per_token=5), "n_expert_per_token"),
        (dict(mlp="none", n_expert=4), "attention-only"),
    ],
)
def test_bad_configs_name_the_problem(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_attention_only_blocks_have_no_mlp():
    cfg = tiny(mlp="none")
    model = build_model(cfg)
    assert all(b.mlp is None and b.mlp_norm is None for b in model.blocks)
    dense = count_params(build_model(tiny())).total
    per_block_mlp = 3 * cfg.d_model * cfg.d_ff + cfg.d_model  # SwiGLU + its norm
    assert count_params(model).total == dense - cfg.n_layer * per_block_mlp
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    model.loss(x, x).backward()  # trains end to end
    assert model.blocks[0].attn_norm.weight.grad is not None


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"n_layers": 3})


def test_context_overflow_is_a_clear_error():
    model = build_model(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("tied", [True, False])
def test_fused_linear_cross_entropy_matches_plain_loss_and_grads(tied):
    from qkv.model.loss import fused_linear_cross_entropy

    model = build_model(tiny(tie_embeddings=tied)).train()
    x = torch.randint(0, 97, (3, 10))
    y = torch.randint(0, 97, (3, 10))
    y[0, :4] = -100  # e.g. prompt tokens masked out in SFT
    plain = torch.nn.functional.cross_entropy(model(x).view(-1, 97), y.view(-1), ignore_index=-100)
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model.loss(x, y)
    fused.backward()
    assert fused.item() == pytest.approx(plain.item(), abs=1e-6)
    for n, p in model.named_parameters():
        assert (p.grad - ref[n]).abs().max() < 1e-6, n
    # chunking does not change the result
    h = torch.randn(30, 48)
    w = torch.randn(97, 48)
    t = torch.randint(0, 97, (30,))
    a = fused_linear_cross_entropy(h, w, t, chunk_elems=97 * 4)
    assert a.item() == pytest.approx(torch.nn.functional.cross_entropy(h @ w.t(), t).item(), abs=1e-5)


def test_fused_cross_entropy_under_bf16_autocast_runs_its_products_in_bf16_and_matches_plain(monkeypatch):
    """Under autocast the fused loss's three products (logits, d/dh, d/dW) run in bf16, as
    autocast's own linear would, and the loss and gradients match plain autocast
    cross-entropy within bf16's rounding (gradients within 2% of their largest entry);
    several chunks give what one does."""
    import qkv.model.loss as loss_module

    torch.manual_seed(0)
    h0, w0 = torch.randn(300, 48), torch.randn(97, 48) * 0.3
    t = torch.randint(0, 97, (300,))
    t[:20] = -100

    def run(fn):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    plain = run(lambda h, w: torch.nn.functional.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100))
    seen = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: (seen.append((a.dtype, b.dtype)), real_mm(a, b))[1])
    for chunk_elems in (None, 97 * 64):
        seen.clear()
        fused = run(lambda h, w, c=chunk_elems: loss_module.fused_linear_cross_entropy(h, w, t, chunk_elems=c))
        assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
        assert fused[1].dtype == fused[2].dtype == torch.float32  # gradients land in the parameters' dtype
        assert fused[0].item() == pytest.approx(plain[0].item(), rel=1e-2)
        for got, want in zip(fused[1:], plain[1:]):
            assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_fused_cross_entropy_builds_no_gradient_when_no_backward_can_follow(monkeypatch):
    import qkv.model.loss as loss_module

    built = []
    real = loss_module._logits_grad
    monkeypatch.setattr(loss_module, "_logits_grad", lambda *a: (built.append(1), real(*a))[1])
    model = build_model(tiny()).train()
    x = torch.randint(0, 97, (3, 10))
    y = torch.randint(0, 97, (3, 10))
    y[1, 5:] = -100
    plain = torch.nn.functional.cross_entropy(model(x).view(-1, 97), y.view(-1), ignore_index=-100)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = model.loss(x, y, ignore_index=-100)
        assert not loss.requires_grad and loss.item() == pytest.approx(plain.item(), abs=1e-6)
    model.requires_grad_(False)  # a frozen model with autograd on (a reference model): nothing to build either
    assert model.loss(x, y).item() == pytest.approx(plain.item(), abs=1e-6)
    assert built == []
    model.requires_grad_(True)
    model.loss(x, y).backward()  # training: the gradient is built, and is the plain loss's
    assert built
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain.backward()
    assert all((p.grad - grads[n]).abs().max() < 1e-6 for n, p in model.named_parameters())


def test_building_and_running_a_model_does_not_import_torch_dynamo():
    """torch._dynamo takes ~2 s to import; a model built on the meta device (as loaders do) or
    on the CPU, and run eagerly, never needs it, so no qkv command should pay it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from qkv.config import ModelConfig\n"
        "from qkv.model.transformer import build_model\n"
        "cfg = ModelConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=4096)\n"
        "build_model(cfg, device='meta')\n"
        "model = build_model(cfg).eval()\n"
        "model(torch.randint(0, 97, (1, 3)), positions=torch.arange(3000, 3003))  # the tables grow\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
