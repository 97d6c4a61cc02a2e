"""PPO with LoRA adapters: the adapters and the value head train, nothing else; the reference
is the policy with its adapters off (no copy); the value head is saved beside the adapter and
a resumed run is bitwise the run that never stopped. Tiny model, two or four PPO steps."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from _serve_helpers import make_tiny_checkpoint, tiny_tokenizer
from qkv import lora as L
from qkv.align import ppo as PPO
from qkv.align.policy import RewardModel, from_transformer, response_logprobs, save_reward_model
from qkv.config import preset
from qkv.kernels import native
from qkv.model import build_model
from qkv.train import TrainConfig

PROMPTS = [f"say {w}" for w in ("fox", "dog", "cat", "owl", "bee", "elk", "yak", "emu")]
PPO_CFG = dict(rollout_batch=4, ppo_epochs=1, max_new_tokens=6, temperature=1.0, adaptive_kl=True, kl_coef=0.1)


def tiny(vocab: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64, init_std=0.08)
    return build_model(preset("tiny", **cfg))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ppo_with_lora_trains_adapters_and_value_head_only_against_the_base_without_a_copy(
    tmp_path, monkeypatch, one_thread
):
    tok = tiny_tokenizer()
    base = tiny(tok.vocab_size)
    oracle = copy.deepcopy(base).eval()  # the base alone, made before any adapter exists
    rm = from_transformer(RewardModel, tiny(tok.vocab_size, seed=2)).eval()
    policy = base.train()
    L.add_lora(policy, L.LoraConfig(r=4, alpha=8, targets="all-linear"))
    frozen = {k: v.clone() for k, v in policy.state_dict().items() if ".lora_" not in k}

    calls = []

    def spy(model, ids, kp, temperature=1.0):
        out = response_logprobs(model, ids, kp, temperature)
        calls.append((model, ids, kp, out))
        return out

    real_deepcopy = copy.deepcopy

    def no_model_copies(obj, *a, **kw):
        assert not isinstance(obj, nn.Module), "PPO with LoRA must not copy the model"
        return real_deepcopy(obj, *a, **kw)

    monkeypatch.setattr(PPO, "response_logprobs", spy)
    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    cfg = TrainConfig(
        out_dir=str(tmp_path / "ppo"), lr=1e-2, batch_size=2, seq_len=64, save_every=2, progress=False, threads=1
    )
    PPO.run_ppo(policy, L.BaseView(policy), rm, tok, PROMPTS, cfg, PPO.PPOConfig(**PPO_CFG), n_iterations=2)
    monkeypatch.setattr(copy, "deepcopy", real_deepcopy)

    # the reference: the policy's own modules with the adapters off, equal to the base alone
    assert len(calls) == 2
    for ref, ids, kp, got in calls:
        assert isinstance(ref, L.BaseView) and ref._model is policy
        with torch.no_grad():
            assert torch.allclose(got, response_logprobs(oracle, ids, kp, 1.0), atol=1e-5)
    assert not L.layer.routing_of(policy).disabled

    # the base is untouched and got no gradient; the adapters moved (in `policy` itself: shared modules)
    for name, p in policy.named_parameters():
        if ".lora_" not in name:
            assert p.grad is None and torch.equal(p.detach(), frozen[name]), name
    assert any(float(m.lora_B["default"].weight.detach().abs().max()) > 0 for m in L.lora_layers(policy).values())

    # checkpoints and the result: the adapter + the value head, no model; optimizer state for those only
    for d in (tmp_path / "ppo" / "step_000004", tmp_path / "ppo"):
        assert (d / L.ADAPTER_CONFIG).exists() and not (d / "model.safetensors").exists()
        head = load_file(str(d / L.ADAPTER_HEADS))
        assert set(head) == {"value_head.weight", "value_head.bias"}
        assert float(head["value_head.weight"].abs().max()) > 0  # it trained (it starts at zero)
        assert all(".lora_" in k for k in load_file(str(d / L.ADAPTER_WEIGHTS)))
    opt = load_file(str(tmp_path / "ppo" / "step_000004" / "trainer" / "optimizer.safetensors"))
    names = {k.rsplit("/", 1)[0] for k in opt}
    assert names >= {"value_head.weight", "value_head.bias"}
    assert all(".lora_A.default." in n or ".lora_B.default." in n or n.startswith("value_head.") for n in names)
    # the policy's adapter still loads as a plain adapter (the head is the run's, not the model's)
    # (compared through PyTorch's ops: the rollouts installed native kernels behind some of the
    # policy's modules, which round differently from the plain ones in the last bit)
    merged = tiny(tok.vocab_size)
    L.load_adapter(merged, tmp_path / "ppo")
    ids = torch.randint(0, tok.vocab_size, (2, 10))
    with torch.no_grad(), native.disabled():
        assert torch.equal(merged.eval()(ids), policy.eval()(ids))


def test_cli_ppo_with_lora_resumes_bitwise(tmp_path, one_thread):
    """Two iterations in one go == one iteration, stop, resume for the second: the same adapter
    and value head, bit for bit."""
    from qkv.align.task import write_jsonl
    from qkv.cli import main

    tok = tiny_tokenizer()
    ckpt = make_tiny_checkpoint(tmp_path / "base", max_seq_len=64)
    rm = from_transformer(RewardModel, tiny(tok.vocab_size, seed=2))
    save_reward_model(tmp_path / "rm", rm, tok)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])

    def ppo(out: str, iterations: int, *extra: str) -> None:
        args = ["ppo", "--model", str(ckpt), "--reward-model", str(tmp_path / "rm"), "--data", str(data)]
        args += ["--out-dir", str(tmp_path / out), "--iterations", str(iterations), "--batch-size", "2"]
        args += ["--seq-len", "64", "--lr", "1e-2", "--save-every", "2", "--rollout-batch", "4", "--ppo-epochs", "1"]
        args += ["--max-new-tokens", "6", "--temperature", "1.0", "--adaptive-kl", "--kl-coef", "0.1"]
        args += ["--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--no-progress", "--threads", "1", *extra]
        torch.manual_seed(0)  # the adapters' random A come from the global generator, as a fresh process's would
        assert main(args) == 0

    ppo("straight", 2)
    ppo("resumed", 1)
    ppo("resumed", 2, "--resume")
    a, b = L.read_adapter(tmp_path / "straight")[1], L.read_adapter(tmp_path / "resumed")[1]
    assert {"value_head.weight", "value_head.bias"} <= set(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["value_head.weight"].abs().max()) > 0
    config = json.loads((tmp_path / "resumed" / L.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(ckpt) and config["modules_to_save"] is None
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "rollouts.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["kl_coef"] for r in rows] == [r["kl_coef"] for r in straight] and len(rows) == 2
