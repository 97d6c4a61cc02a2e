"""LoRA adapters: identity at init, only adapter parameters train (and resume exactly), merge,
PEFT's format both ways (peft itself the oracle), QLoRA through frozen quantized layers, DPO's
reference as the base with adapters off, and per-request adapters in the engine and server."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from _serve_helpers import BackgroundServer, make_tiny_checkpoint, tiny_tokenizer
from qkv import lora as L
from qkv.config import preset
from qkv.kernels import native
from qkv.model import build_model

MERGE_TOL = 1e-5


def tiny(vocab: int = 96, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64, init_std=0.08)
    return build_model(preset("tiny", **{**cfg, **kw})).eval()


def randomize(model: nn.Module, name: str = L.DEFAULT, seed: int = 1, scale: float = 0.2) -> None:
    """B != 0, so the adapter changes the output (B = 0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_layers(model).values():
            w = m.lora_B[name].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "targets, n", [("q_proj,v_proj", 4), ("all-linear", 14), (r"blocks\.1\.mlp\.(gate|up)_proj", 2)]
)
def test_forward_equals_base_at_init(targets, n):
    model = tiny()
    x = torch.randint(0, 96, (2, 12))
    before = model(x)
    chosen = L.add_lora(model, L.LoraConfig(r=4, alpha=8, targets=targets))
    assert len(chosen) == n
    assert torch.equal(model(x), before)  # B = 0: exactly the base
    randomize(model)
    assert not torch.allclose(model(x), before)
    with L.adapters_disabled(model):
        assert torch.equal(model(x), before)


def test_bad_targets_are_one_line_errors():
    with pytest.raises(ValueError, match="match no linear layer"):
        L.add_lora(tiny(), L.LoraConfig(targets="qproj"))
    with pytest.raises(ValueError, match="not a name list nor a valid regex"):
        L.add_lora(tiny(), L.LoraConfig(targets="blocks.(["))


# --- training ----------------------------------------------------------------------------------
def _train(model, out, max_steps, resume=False):
    from qkv.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 96, (8, 4, 17), generator=g)
    cfg = TrainConfig(
        out_dir=str(out),
        max_steps=max_steps,
        batch_size=4,
        seq_len=16,
        lr=1e-2,
        warmup_steps=1,
        save_every=2,
        log_every=1,
        eval_every=0,
        progress=False,
        threads=1,
    )

    def loss_fn(m, b):
        return m.loss(b[:, :-1], b[:, 1:]), {"tokens": b.numel()}

    trainer = Trainer(model, cfg, loss_fn, lambda s, _: data[s], resume=resume)
    return trainer, trainer.fit()


def test_only_adapters_train_and_a_resumed_run_is_bitwise_identical(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr("qkv.train.trainer.matmul_peak", lambda *a: 1e12)  # MFU's ceiling: not under test
    base = tiny()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = L.LoraConfig(r=4, alpha=8, dropout=0.1, targets="q_proj,v_proj,down_proj")

    model = copy.deepcopy(base)
    torch.manual_seed(7)  # the adapters' random A
    L.add_lora(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    trainer, result = _train(model, tmp_path / "straight", 4)
    opt_params = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert all(len(trainer.opt.state[p]) for g in trainer.opt.param_groups for p in g["params"])
    # the base is untouched; the adapter moved
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert any(float(m.lora_B["default"].weight.detach().abs().max()) > 0 for m in L.lora_layers(model).values())
    # a LoRA run's checkpoints and result are the adapter (PEFT's files), not the model
    step = tmp_path / "straight" / "step_000004"
    assert (step / L.ADAPTER_CONFIG).exists() and not (step / "model.safetensors").exists()
    opt_keys = load_file(str(step / "trainer" / "optimizer.safetensors"))
    assert opt_keys and all(".lora_" in k for k in opt_keys)
    assert (tmp_path / "straight" / L.ADAPTER_WEIGHTS).exists()

    # 2 steps, then a new process-like start that resumes to 4: the same adapter, bit for bit
    first = copy.deepcopy(base)
    torch.manual_seed(7)
    L.add_lora(first, cfg)
    _train(first, tmp_path / "resumed", 2)
    again = copy.deepcopy(base)
    L.add_lora(again, cfg)
    _, resumed = _train(again, tmp_path / "resumed", 4, resume=True)
    a, b = L.adapter_state(model), L.adapter_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in result.history]


# --- merge -------------------------------------------------------------------------------------
def test_qkv_merge_equals_base_plus_adapter(tmp_path, one_thread):
    from qkv.checkpoint import load_model
    from qkv.cli import main
    from qkv.interop import load

    ckpt = make_tiny_checkpoint(tmp_path / "base", max_seq_len=64)
    model, _ = load(ckpt)
    L.add_lora(model, L.LoraConfig(r=4, alpha=16, targets="all-linear"))
    randomize(model)
    L.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(ckpt), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (merged(x) - model(x)).abs().max() <= MERGE_TOL


# --- QLoRA -------------------------------------------------------------------------------------
def test_quantized_base_gives_input_gradients_and_trains_adapters():
    from qkv.quant.modules import QuantLinear, quantize_model

    model = quantize_model(tiny(max_seq_len=128), "q8_0", include=["blocks.*"])
    q = model.blocks[0].attn.k_proj
    assert isinstance(q, QuantLinear)
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, q.out_features)
    q(x).backward(g)
    oracle = g @ q.dequantized_weight()  # d(x W^T)/dx
    assert torch.allclose(x.grad, oracle, atol=1e-5)

    L.add_lora(model, L.LoraConfig(r=4, alpha=8, targets="q_proj,v_proj"))
    model.train()
    ids = torch.randint(0, 96, (2, 12))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if ".lora_B." in n)  # B's grad needs A x != 0
    assert not any(b.requires_grad for b in model.buffers())
    # merge on a quantized base: the dequantized weight plus the update (native kernels off, so
    # the quantized layers compute in fp32 with the dequantized weight, not with the row kernel's
    # int8-rounded activations)
    model.eval()
    randomize(model)
    ids = torch.randint(0, 96, (1, 80))
    with torch.no_grad(), native.disabled():
        want = model(ids)
        L.merge_lora(model)
        assert isinstance(model.blocks[0].attn.q_proj, nn.Linear)
        assert (model(ids) - want).abs().max() <= MERGE_TOL


# --- PEFT's format -----------------------------------------------------------------------------
def test_peft_round_trip_both_ways(tmp_path, one_thread):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qkv.interop.hf import export_hf, import_hf

    model = tiny()
    export_hf(model, tmp_path / "hf")
    x = torch.randint(0, 96, (2, 12))

    # qkv -> peft: PeftModel loads a qkv adapter onto the transformers export
    L.add_lora(model, L.LoraConfig(r=4, alpha=8, targets=r"blocks\.0\.attn\.(q|v)_proj|blocks\.1\.mlp\.down_proj"))
    randomize(model)
    L.save_adapter(model, tmp_path / "qkv_adapter")
    written = json.loads((tmp_path / "qkv_adapter" / L.ADAPTER_CONFIG).read_text())
    assert written["target_modules"] == sorted(
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    )
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "qkv_adapter").eval()
    with torch.no_grad():
        assert torch.allclose(pm(x).logits, model(x), atol=1e-5)

    # peft -> qkv: qkv loads a PEFT adapter (rsLoRA scaling, three target kinds)
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True)
    pm2 = peft.get_peft_model(hf2, cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm2.save_pretrained(tmp_path / "peft_adapter")
    base, _ = import_hf(tmp_path / "hf")
    lcfg = L.load_adapter(base, tmp_path / "peft_adapter")
    assert lcfg.r == 8 and lcfg.rslora and len(L.lora_layers(base)) == 6
    with torch.no_grad():
        assert torch.allclose(base(x), pm2(x).logits, atol=1e-5)


# --- DPO: the reference is the base with adapters off, no copy ------------------------------
def test_dpo_with_lora_uses_the_base_as_reference_without_a_copy(tmp_path, monkeypatch, one_thread):
    from qkv.align import dpo as DPO
    from qkv.align.data import Preference
    from qkv.align.reward import encode_pairs
    from qkv.train import TrainConfig

    tok = tiny_tokenizer()
    base = tiny(vocab=tok.vocab_size)
    oracle = copy.deepcopy(base)  # the base alone, made before any adapter exists
    model = base
    L.add_lora(model, L.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)  # adapters that change the log-probs, so "off" is observable
    model.train()

    def msgs(role, text):
        return [{"role": role, "content": text}]

    prefs = [
        Preference(msgs("user", f"say {w}"), msgs("assistant", f"{w} indeed"), msgs("assistant", "no"))
        for w in ("fox", "dog", "cat", "owl")
    ]
    calls = []
    real = DPO.reference_logprobs

    def spy(ref_model, pairs, pad_id, **kw):
        out = real(ref_model, pairs, pad_id, **kw)
        calls.append((ref_model, L.layer.routing_of(model).disabled, out))
        return out

    real_deepcopy = copy.deepcopy

    def no_model_copies(obj, *a, **kw):
        assert not isinstance(obj, nn.Module), "DPO with LoRA must not copy the model"
        return real_deepcopy(obj, *a, **kw)

    monkeypatch.setattr(DPO, "reference_logprobs", spy)
    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    cfg = TrainConfig(
        out_dir=str(tmp_path / "dpo"), max_steps=1, batch_size=4, seq_len=32, save_every=0, progress=False, threads=1
    )
    DPO.run_dpo(model, tok, prefs, cfg)
    (ref_model, disabled, ref), *_ = calls
    assert ref_model is model and disabled
    assert not L.layer.routing_of(model).disabled  # switched back on for training
    want = real(oracle, encode_pairs(tok, prefs, 32), tok.pad_id)
    assert torch.allclose(ref, want, atol=1e-5)


def test_base_view_is_the_grpo_reference_without_touching_the_policy():
    """GRPO's (and the commands') reference for a LoRA policy: the same model, adapters off."""
    from qkv.align.policy import response_logprobs
    from qkv.commands._align_args import reference_for

    base = tiny()
    oracle = copy.deepcopy(base)
    L.add_lora(base, L.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(base)
    policy = base.train()
    ref = reference_for(policy, None, "unused")
    assert isinstance(ref, L.BaseView) and ref.eval() is ref and policy.training  # its eval() leaves the policy be
    ids = torch.randint(0, 96, (2, 10))
    kp = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = response_logprobs(oracle.eval(), ids, kp)
        got = response_logprobs(ref, ids, kp)
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(response_logprobs(policy.eval(), ids, kp), want, atol=1e-3)  # adapters on again


# --- serving -----------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(t)
        ids.append(t)
    return out


def test_engine_serves_adapters_per_row_alone_and_batched(tmp_path, one_thread):
    from qkv.infer.engine import Engine
    from qkv.infer.sampling import SamplingParams

    tok = tiny_tokenizer()
    base = tiny(vocab=tok.vocab_size, seed=2)
    tuned = copy.deepcopy(base)
    L.add_lora(tuned, L.LoraConfig(r=4, alpha=16, targets="all-linear"))
    randomize(tuned, scale=0.5)
    L.save_adapter(tuned, tmp_path / "a")
    served = copy.deepcopy(base)
    assert L.load_serving_adapters(served, [f"a={tmp_path / 'a'}"]) == ["a"]
    prompt = list(range(3, 40))  # longer than a block: the prefix cache is in play
    want_a, want_base = greedy(tuned, prompt, 8), greedy(base, prompt, 8)
    assert want_a != want_base
    engine = Engine(served, tok, block_size=16, num_blocks=64, max_num_seqs=4)

    def run(adapters):
        ids = [
            engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, adapter=a))
            for a in adapters
        ]
        return _drain(engine, ids)

    assert run(["a"]) == [want_a]
    assert run([None, "a"]) == [want_base, want_a]  # one engine step holds both rows
    assert run(["a", None]) == [want_a, want_base]
    with pytest.raises(ValueError, match="no LoRA adapter named 'b'"):
        engine.add_request(prompt, SamplingParams(max_tokens=2, adapter="b"))
    # a LoRA policy's own rollouts (GRPO): no request names an adapter, the trained one applies
    engine = Engine(tuned, tok, block_size=16, num_blocks=64, max_num_seqs=4)
    assert run([None]) == [want_a]


def _drain(engine, ids: list[str]) -> list[list[int]]:
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for r in engine.step():
            if r.request_id in out:
                out[r.request_id] += r.new_token_ids
    return [out[i] for i in ids]


def test_server_routes_base_colon_name_to_the_adapter(tmp_path, one_thread):
    import httpx

    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.serve.app import create_app

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", max_seq_len=64)
    tuned, tok = load_for_serving(str(ckpt))
    L.add_lora(tuned, L.LoraConfig(r=4, alpha=16, targets="all-linear"))
    randomize(tuned, scale=0.5)
    L.save_adapter(tuned, tmp_path / "a")
    model, tok = load_for_serving(str(ckpt))
    L.load_serving_adapters(model, [f"a={tmp_path / 'a'}"])
    prompt = tok.encode("the quick brown fox")
    app = create_app(Engine(model, tok, block_size=16, num_blocks=32), "tiny")
    with BackgroundServer(app) as srv:
        names = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert names == ["tiny", "tiny:a"]

        def complete(name):
            body = dict(model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
            return httpx.post(srv.url + "/v1/completions", json=body, timeout=60)

        got = complete("tiny:a").json()
        assert got["choices"][0]["text"] == tok.decode(greedy(tuned, prompt, 6)) and got["model"] == "tiny:a"
        assert complete("tiny:b").status_code == 404


def test_cli_sft_with_lora_writes_an_adapter_that_merges(tmp_path, one_thread):
    from qkv.align.task import write_jsonl
    from qkv.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "base", max_seq_len=64)
    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run"
    args = ["sft", "--model", str(ckpt), "--data", str(data), "--out-dir", str(out), "--max-steps", "2"]
    args += ["--batch-size", "4", "--seq-len", "32", "--lora-r", "4", "--lora-targets", "all-linear", "--no-progress"]
    assert main(args) == 0
    written = json.loads((out / L.ADAPTER_CONFIG).read_text())
    assert written["r"] == 4 and written["base_model_name_or_path"] == str(ckpt)
    assert not (out / "model.safetensors").exists()
    assert main(["merge", str(ckpt), str(out), str(tmp_path / "merged"), "--to", "hf"]) == 0
    assert (tmp_path / "merged" / "config.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reward"], "qkv reward trains every weight"),
    ],
)
def test_stages_without_adapters_refuse_lora_r(argv, message, tmp_path):
    from qkv.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(argv + ["--model", "m", "--data", "d", "--lora-r", "4", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=message):
        args._run(args)


@pytest.mark.parametrize("tile_elements", [1 << 22, 64 * 5])  # one tile; 5-row tiles (the last one short)
def test_frozen_quant_matmul_matches_a_plain_linear(tile_elements, monkeypatch):
    """The quantized layer's differentiable path (tiled forward without int8 rounding, tiled
    backward) agrees with F.linear on its dequantized weight, in value and input gradient."""
    from qkv.quant import modules as Q

    monkeypatch.setattr(Q, "GRAD_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(Q.quant_linear, "tiled_linear", lambda *a, **k: None)  # the Python tiles
    q = Q.QuantLinear.from_linear(nn.Linear(64, 48), "q8_0")
    w = q.dequantized_weight()
    x = torch.randn(2, 7, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 7, 48)
    q(x).backward(g)
    F.linear(x2, w, q.bias.detach()).backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    with torch.enable_grad():
        assert torch.allclose(q(x), F.linear(x, w, q.bias), atol=1e-5)


def test_dpo_scores_the_reference_only_for_the_pairs_its_steps_draw(tmp_path, monkeypatch, one_thread):
    """A short run on a large preference file: the reference pass covers the pairs the sampler
    gives the run's steps (3 steps of 4 here), not all 40, and training reads only those."""
    from qkv.align import dpo as DPO
    from qkv.align.data import IndexSampler, Preference
    from qkv.train import TrainConfig

    tok = tiny_tokenizer()
    model = tiny(vocab=tok.vocab_size)
    prefs = [
        Preference(
            [{"role": "user", "content": f"say {i}"}],
            [{"role": "assistant", "content": f"{i} indeed"}],
            [{"role": "assistant", "content": "no"}],
        )
        for i in range(40)
    ]
    seen = []
    real = DPO.reference_logprobs
    monkeypatch.setattr(
        DPO, "reference_logprobs", lambda m, pairs, pad, **kw: (seen.append(len(pairs)), real(m, pairs, pad, **kw))[1]
    )
    cfg = TrainConfig(
        out_dir=str(tmp_path / "dpo"), max_steps=3, batch_size=4, seq_len=32, save_every=0, progress=False, threads=1
    )
    result = DPO.run_dpo(model, tok, prefs, cfg)
    sampler = IndexSampler(40, 4, 1, cfg.seed)
    assert seen == [len({i for s in range(3) for i in sampler(s, 0)})] and seen[0] <= 12
    assert all(math.isfinite(h["loss"]) for h in result.history)
