"""Muon: Newton-Schulz against an SVD, the update against torch.optim.Muon, which tensors get Muon
on each architecture, exact resume after SIGKILL, and DDP on 2 processes == 1 process.

This file is also the DDP worker: `torchrun ... tests/test_muon.py DATA OUT` trains OUT/ddp with
Muon and records in OUT/fsdp_refused whether FSDP was refused with its message."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qkv.train.optim import NS_BAND, NS_COEFFICIENTS, NS_FLOOR, Muon, make_optimizer, muon_groups, newton_schulz


# --- Newton-Schulz --------------------------------------------------------------------
def scalar_map(s: np.ndarray, steps: int = 5) -> np.ndarray:
    """What Newton-Schulz does to each singular value of g / ||g||_F, in float64."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def ill_conditioned(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(torch.randn(m, n, generator=g, dtype=torch.float64), full_matrices=False)
    return (u * torch.logspace(0, -4, min(m, n), dtype=torch.float64)) @ vh  # down to 1e-4: some below NS_FLOOR


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (32, 32)])
def test_newton_schulz_against_svd(shape):
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(*shape, generator=g, dtype=torch.float64), ill_conditioned(*shape, g)):
        o = newton_schulz(x.float()).double()
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        d = u.T @ o @ vh.T  # diagonal when o = U S' V^T has x's singular vectors
        assert (d - torch.diag(d.diagonal())).abs().max() < 1e-4
        rel = (s / s.norm()).numpy()
        np.testing.assert_allclose(d.diagonal().numpy(), scalar_map(rel), atol=1e-4)
        kept = d.diagonal()[rel >= NS_FLOOR]
        assert NS_BAND[0] <= kept.min() and kept.max() <= NS_BAND[1]
        uvt = u @ vh  # the exact orthogonalisation, which NS approximates within its band
        assert torch.linalg.matrix_norm(o - uvt, ord=2) <= 1 - NS_BAND[0] + 1e-4 or (rel < NS_FLOOR).any()
    # the band holds for every singular value from NS_FLOOR to 1
    band = scalar_map(np.linspace(NS_FLOOR, 1.0, 100_001))
    assert NS_BAND[0] <= band.min() < NS_BAND[0] + 0.01 and NS_BAND[1] - 0.01 < band.max() <= NS_BAND[1]


def test_newton_schulz_batched_and_like_torch():
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    x = torch.randn(3, 8, 24)
    o = newton_schulz(x)
    for i in range(3):
        torch.testing.assert_close(o[i], newton_schulz(x[i]), atol=1e-6, rtol=0)
        ref = torch_ns(x[i], NS_COEFFICIENTS, 5, 1e-7).float()  # torch's runs in bfloat16
        torch.testing.assert_close(o[i], ref, atol=0.03, rtol=0)


def test_muon_step_matches_torch_muon():
    torch.manual_seed(0)
    w0 = torch.randn(24, 8)
    mine, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Muon([mine], lr=0.01, momentum=0.9, weight_decay=0.1)
    topt = torch.optim.Muon([ref], lr=0.01, momentum=0.9, weight_decay=0.1)  # Keller's lr adjustment by default
    for _ in range(3):
        grad = torch.randn(24, 8)
        mine.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        topt.step()
    moved = (ref - w0).abs().max()
    torch.testing.assert_close(mine.detach(), ref.detach(), atol=0.02 * moved.item(), rtol=0)  # bf16 vs fp32 NS
    torch.testing.assert_close(opt.state[mine]["momentum_buffer"], topt.state[ref]["momentum_buffer"])


# --- which tensors get Muon -----------------------------------------------------------
def names_of(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("arch", ["gpt2-like", "llama-like", "moe"])
def test_grouping_per_architecture(arch):
    from qkv.config import preset
    from qkv.model import build_model

    small = dict(n_layer=1, d_model=32, n_head=2, vocab_size=64, max_seq_len=16)
    cfg = {
        "gpt2-like": preset("gpt2-124m", **small),  # tied head, learned positions, biases, LayerNorm
        "llama-like": preset("llama-100m", **small, n_kv_head=1, d_ff=64, tie_embeddings=False),  # untied head
        "moe": preset("tiny", **small, n_kv_head=1, n_expert=4, n_expert_per_token=2),
    }[arch]
    m = build_model(cfg)
    linear, experts, rest = muon_groups(m)
    attn = {f"blocks.0.attn.{k}_proj.weight" for k in "qkvo"}
    if arch == "gpt2-like":
        assert names_of(m, linear) == attn | {"blocks.0.mlp.up_proj.weight", "blocks.0.mlp.down_proj.weight"}
        assert {"tok_emb.weight", "pos_emb.weight", "blocks.0.attn.q_proj.bias"} <= names_of(m, rest)
    if arch == "llama-like":
        mlp = {f"blocks.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}
        assert names_of(m, linear) == attn | mlp
        assert {"tok_emb.weight", "lm_head.weight", "final_norm.weight"} <= names_of(m, rest)
    if arch == "moe":
        assert names_of(m, linear) == attn
        assert names_of(m, experts) == {f"blocks.0.mlp.w_{k}" for k in ("gate", "up", "down")}
        assert "blocks.0.mlp.router.weight" in names_of(m, rest)
    assert all(p.dim() == 1 for n, p in m.named_parameters() if "norm" in n and id(p) in {id(q) for q in rest})
    counted = [id(p) for p in linear + experts + rest]
    assert sorted(counted) == sorted({id(p) for p in m.parameters()})  # each parameter exactly once
    opt = make_optimizer(m, 3e-3, 0.1, (0.9, 0.95), optimizer="muon", muon={"lr": 0.02})
    muon_opt, adam = opt.optimizers
    assert {id(p) for g in muon_opt.param_groups for p in g["params"]} == {id(p) for p in linear + experts}
    assert {id(p) for g in adam.param_groups for p in g["params"]} == {id(p) for p in rest}
    m(torch.randint(0, 64, (2, 8))).sum().backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters() if p.grad is not None)


def test_muon_refuses_sharded_parameters_and_bad_settings(monkeypatch):
    import qkv.train.optim as optim

    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    monkeypatch.setattr(optim, "_has_dtensor", lambda model: True)
    with pytest.raises(ValueError, match="optimizer=muon needs each weight matrix whole.*use parallel=ddp"):
        make_optimizer(m, 1e-3, 0.0, (0.9, 0.95), optimizer="muon")
    with pytest.raises(ValueError, match="bad Muon settings"):
        Muon(m.parameters(), momentum=1.0)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        from qkv.train import TrainConfig

        TrainConfig(optimizer="sgd")


# --- exact resume, DDP ----------------------------------------------------------------
from test_train import KILLER, cfg_for, data, threads  # noqa: E402, F401  (the AdamW test's helpers)


def test_sigkill_then_resume_is_bitwise_identical_with_muon(data, tmp_path, threads):  # noqa: F811 (the fixtures imported from test_train, requested by name)
    from qkv.train.pretrain import make_trainer

    killed = cfg_for(data, tmp_path / "killed", optimizer="muon", muon_weight_decay=0.01, eval_every=0)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, json.dumps(killed.to_dict())], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "latest.json").read_text())["step"] == 8
    resumed = make_trainer(killed, resume=True)
    assert resumed.step == 8
    resumed.fit()
    straight = make_trainer(cfg_for(data, tmp_path / "straight", optimizer="muon", muon_weight_decay=0.01)).fit()
    a = load_file(str(tmp_path / "killed" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(str(tmp_path / "killed" / "step_000012" / "trainer" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "straight" / "step_000012" / "trainer" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    kinds = {k.rsplit("/", 1)[1] for k in oa}
    assert kinds == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}  # both optimizers' state
    state = json.loads((tmp_path / "killed" / "step_000012" / "trainer" / "state.json").read_text())
    assert sum("peak_lr" in g for g in state["param_groups"]) == 1  # the Muon group, beside two AdamW groups
    lrs = [r["lr"] for r in straight.history]
    assert [r["lr"] for r in resumed.history] == lrs


def dist_config(data_dir, out, parallel):
    from qkv.train import TrainConfig

    return TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out),
        model={"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1},
        seq_len=16,
        batch_size=4,
        max_steps=3,
        warmup_steps=1,
        eval_every=0,
        eval_steps=1,
        log_every=1,
        save_every=0,
        progress=False,
        threads=1,
        seed=3,
        optimizer="muon",
        parallel=parallel,
        device="cpu",
    )


def worker(data_dir: str, out: str) -> None:
    from qkv.train import distributed as D
    from qkv.train.pretrain import make_trainer

    make_trainer(dist_config(data_dir, Path(out) / "ddp", "ddp")).fit()
    try:
        make_trainer(dist_config(data_dir, Path(out) / "fsdp", "fsdp"))
    except ValueError as e:
        if D.setup().is_main:
            (Path(out) / "fsdp_refused").write_text(str(e))
    D.teardown()


def test_ddp_two_processes_match_one_with_muon(data, tmp_path, threads):  # noqa: F811 (the fixtures imported from test_train, requested by name)
    from qkv.train.pretrain import make_trainer

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", __file__, str(data), str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs each weight matrix whole" in (tmp_path / "dist" / "fsdp_refused").read_text()
    ref = make_trainer(dist_config(data, tmp_path / "one", "ddp")).fit()
    rows = [json.loads(line) for line in (tmp_path / "dist" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([h["loss"] for h in ref.history], abs=1e-5)
    w = load_file(str(tmp_path / "dist" / "ddp" / "model.safetensors"))
    ref_w = load_file(str(tmp_path / "one" / "model.safetensors"))
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], atol=1e-5, rtol=0, msg=k)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
