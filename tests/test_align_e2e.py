"""End-to-end alignment on the bundled task with a tiny model, plus bad-input errors.

One module-scoped fixture trains a 2-layer d=64 chat model by SFT from scratch (cheap on
a CPU); the reward-model, DPO and PPO tests start from it. Margins checked:
  SFT:  held-out assistant-token loss drops by > 1.0 nats/token
  RM:   held-out pairwise accuracy >= 0.62 on 120 pairs (chance = 0.5; ~3 standard errors)
  DPO:  mean gold reward on held-out prompts rises by >= 0.05 over SFT
  PPO:  mean gold reward on held-out prompts rises by >= 0.05 over SFT
"""

import copy
import json
import re
import statistics

import pytest
import torch

from qkv.align import dpo as DPO
from qkv.align import evaluate as E
from qkv.align import grpo as GRPO
from qkv.align import ppo as PPO
from qkv.align import reward as RW
from qkv.align import sft as SFT
from qkv.align.data import Preference, load_preferences, load_prompts, load_sft
from qkv.align.policy import RewardModel, from_transformer, response_logprobs, rollout
from qkv.align.task import build_tokenizer, gold_reward, make_task, prompt_text, write_jsonl
from qkv.config import preset
from qkv.model import build_model
from qkv.train import TrainConfig


def gold(p, t):
    return gold_reward(prompt_text(p), t)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two on a shared 2-core box
    yield
    torch.set_num_threads(n)


def _cfg(tmp, name, **kw):
    d = dict(
        out_dir=str(tmp / name),
        lr=3e-3,
        batch_size=16,
        seq_len=64,
        warmup_steps=5,
        eval_every=0,
        save_every=0,
        progress=False,
        log_every=50,
        threads=1,
    )
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("align")
    task = make_task(seed=0, n_sft=700, n_prefs=400, n_prefs_heldout=120, n_rl=96, n_eval=32, chat_fraction=0.1)
    tok = build_tokenizer(512, max_chars=400_000)
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg)
    convs = [r["messages"] for r in task.sft]
    held = convs[-60:]
    before = SFT.assistant_loss(model, tok, held)
    SFT.run_sft(model, tok, convs[:-60], _cfg(tmp, "sft", max_steps=300))
    after = SFT.assistant_loss(model, tok, held)
    model.eval()
    prefs = [Preference(p["prompt"], p["chosen"], p["rejected"]) for p in task.prefs]
    heldout = [Preference(p["prompt"], p["chosen"], p["rejected"]) for p in task.prefs_heldout]
    ro = E.sample_policy(model, tok, task.eval_prompts, 12, 0.7, seed=7, n=2)
    return dict(
        tmp=tmp,
        task=task,
        tok=tok,
        sft=model,
        losses=(before, after),
        prefs=prefs,
        heldout=heldout,
        sft_gold=statistics.mean(E.gold_scores(ro, gold)),
    )


@pytest.fixture(scope="module")
def reward_model(setup):
    rm = from_transformer(RewardModel, setup["sft"])
    _, metrics = RW.run_reward(
        rm, setup["tok"], setup["prefs"], _cfg(setup["tmp"], "rm", max_steps=60, lr=1e-3), heldout=setup["heldout"]
    )
    return rm.eval(), metrics


def eval_gold(model, setup) -> float:
    ro = E.sample_policy(model, setup["tok"], setup["task"].eval_prompts, 12, 0.7, seed=7, n=2)
    return statistics.mean(E.gold_scores(ro, gold))


def test_sft_lowers_assistant_token_loss(setup):
    before, after = setup["losses"]
    print(f"SFT assistant loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0, (before, after)


def test_reward_model_beats_chance(reward_model):
    _, metrics = reward_model
    print(f"RM held-out accuracy {metrics['accuracy']:.3f}")
    assert metrics["accuracy"] >= 0.62, metrics
    assert metrics["margin"] > 0


def test_dpo_raises_gold_reward(setup):
    pol = copy.deepcopy(setup["sft"])
    res = DPO.run_dpo(pol, setup["tok"], setup["prefs"], _cfg(setup["tmp"], "dpo", max_steps=30, lr=1e-3), beta=0.1)
    hist = [h for h in res.history if "rewards_accuracy" in h]
    assert hist and hist[0]["step"] >= 1
    g = eval_gold(pol, setup)
    print(f"DPO gold {setup['sft_gold']:+.3f} -> {g:+.3f}")
    assert g >= setup["sft_gold"] + 0.05, (setup["sft_gold"], g)


def test_ppo_raises_gold_reward(setup, reward_model):
    rm, _ = reward_model
    pol = copy.deepcopy(setup["sft"])
    cfg = PPO.PPOConfig(rollout_batch=32, ppo_epochs=2, max_new_tokens=12, temperature=0.7)
    res, stats = PPO.run_ppo(
        pol,
        setup["sft"],
        rm,
        setup["tok"],
        setup["task"].rl_prompts,
        _cfg(setup["tmp"], "ppo", max_steps=1, lr=1e-3),
        cfg,
        gold_fn=gold,
        n_iterations=5,
    )
    assert stats[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout: policy == reference
    assert all(s["kl"] > -0.05 for s in stats)  # samples come from pi: k1 mean is not negative
    assert stats[-1]["score_proxy"] > stats[0]["score_proxy"]
    g = eval_gold(pol, setup)
    print(f"PPO gold {setup['sft_gold']:+.3f} -> {g:+.3f}")
    assert g >= setup["sft_gold"] + 0.05, (setup["sft_gold"], g, [s["gold"] for s in stats])
    # the saved top-level model is the policy without its value head
    from qkv.checkpoint import load_model

    saved = load_model(res.run_dir)
    assert torch.equal(saved.tok_emb.weight, pol.tok_emb.weight)
    rows = [json.loads(x) for x in (res.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(5))


def test_grpo_runs_and_moves_away_from_reference(setup):
    pol = copy.deepcopy(setup["sft"])
    cfg = GRPO.GRPOConfig(prompts_per_iter=8, group_size=4, ppo_epochs=1, max_new_tokens=10)
    _, stats = GRPO.run_grpo(
        pol,
        setup["sft"],
        setup["tok"],
        setup["task"].rl_prompts,
        gold,
        _cfg(setup["tmp"], "grpo", max_steps=1, lr=1e-3),
        cfg,
        n_iterations=2,
    )
    assert stats[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert not torch.equal(pol.tok_emb.weight, setup["sft"].tok_emb.weight)


def test_rollouts_sample_the_distribution_whose_logprobs_are_used(setup):
    """One-token engine samples at T = 0.7: the k1 estimate of KL(pi_T || q_T) from samples
    matches the exact KL computed from the two full distributions."""
    tok, pi = setup["tok"], setup["sft"]
    torch.manual_seed(3)
    q = build_model(pi.cfg).eval()
    prompt = [{"role": "user", "content": setup["task"].eval_prompts[0]}]
    ro = rollout(pi, tok, [prompt] * 10, max_new_tokens=1, temperature=0.7, seed=11, n=60, max_num_seqs=64)
    b = ro.batch(tok.pad_id, 64)
    with torch.no_grad():
        lp, lq = (
            response_logprobs(pi, b["ids"], b["key_padding"], 0.7),
            response_logprobs(q, b["ids"], b["key_padding"], 0.7),
        )
        m = b["mask"][:, 1:].float()
        samples = ((lp - lq) * m).sum(1)
        ids = torch.tensor([ro.prompt_ids[0]])
        p_all = torch.log_softmax(pi(ids)[0, -1] / 0.7, -1)
        q_all = torch.log_softmax(q(ids)[0, -1] / 0.7, -1)
    exact = (p_all.exp() * (p_all - q_all)).sum().item()
    se = samples.std().item() / len(samples) ** 0.5
    assert abs(samples.mean().item() - exact) < 4 * se + 1e-3, (samples.mean().item(), exact, se)


def test_packed_sft_loss_equals_unpacked(setup):
    tok, model = setup["tok"], setup["sft"]
    words = ["Hi", "Hello there", "How are you?", "Fine", "Good day to you", "Thanks"]
    convs = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a in words for b in words[:2]]
    ids, masks = SFT.encode_conversations(tok, convs, 64)
    from qkv.align.data import batch_sequences, pack_sequences

    with torch.no_grad():
        plain, _ = SFT.sft_loss(model, batch_sequences(ids, masks, tok.pad_id))
        rows = pack_sequences(ids, masks, 64, tok.pad_id)
        assert len(rows) < len(ids)
        packed, _ = SFT.sft_loss(model, SFT.collate_packed(rows, 64, tok.pad_id))
    assert abs(plain.item() - packed.item()) < 1e-4


# --- bad input ----------------------------------------------------------------------------
def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: missing key 'rejected'"):
        load_preferences(p)
    p.write_text('{"prompt": "hi", "chosen": "  ", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl:1: empty chosen response"):
        load_preferences(p)
    s = tmp_path / "sft.jsonl"
    s.write_text(
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{"text": 1}\n'
    )
    with pytest.raises(ValueError, match=r"sft.jsonl:2: missing key 'messages'"):
        load_sft(s)
    s.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:1: empty assistant response"):
        load_sft(s)
    s.write_text("not json\n")
    with pytest.raises(ValueError, match=r"sft.jsonl:1: not valid JSON"):
        load_sft(s)
    q = tmp_path / "prompts.jsonl"
    q.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: missing key 'prompt'"):
        load_prompts(q)


def test_task_jsonl_roundtrip(tmp_path, setup):
    t = setup["task"]
    write_jsonl(tmp_path / "p.jsonl", t.prefs[:5])
    write_jsonl(tmp_path / "s.jsonl", t.sft[:5])
    assert len(load_preferences(tmp_path / "p.jsonl")) == 5 and len(load_sft(tmp_path / "s.jsonl")) == 5


def test_tokenizer_without_chat_template_is_a_clear_error(setup):
    tok = copy.copy(setup["tok"])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        SFT.run_sft(
            copy.deepcopy(setup["sft"]),
            tok,
            [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]],
            _cfg(setup["tmp"], "nochat", max_steps=1),
        )


def test_reference_with_other_vocab_is_a_clear_error(setup):
    other = build_model(preset("tiny", vocab_size=300, n_layer=1, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64))
    with pytest.raises(ValueError, match="reference model has a vocabulary of 300"):
        DPO.run_dpo(
            copy.deepcopy(setup["sft"]),
            setup["tok"],
            setup["prefs"][:4],
            _cfg(setup["tmp"], "badref", max_steps=1),
            ref_model=other,
        )


def test_cli_errors_are_one_line(tmp_path, setup, capsys):
    from qkv.checkpoint import save_model
    from qkv.cli import main

    ck = tmp_path / "ck"
    tok = copy.copy(setup["tok"])
    tok.chat_template = None
    save_model(ck, setup["sft"], tok)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    assert main(["sft", "--model", str(ck), "--data", str(data), "--out-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no chat template" in err and str(ck) in err


def test_ppo_resume_is_exact(setup, reward_model):
    """Two PPO iterations in one go == one iteration, stop, resume for the second."""
    rm, _ = reward_model
    cfg = PPO.PPOConfig(rollout_batch=16, ppo_epochs=1, max_new_tokens=8, adaptive_kl=True, kl_coef=0.1)

    def tc(name: str):
        return _cfg(setup["tmp"], name, max_steps=1, lr=1e-3, save_every=1)

    a = copy.deepcopy(setup["sft"])
    PPO.run_ppo(a, setup["sft"], rm, setup["tok"], setup["task"].rl_prompts, tc("ppo_a"), cfg, n_iterations=2)
    b = copy.deepcopy(setup["sft"])
    PPO.run_ppo(b, setup["sft"], rm, setup["tok"], setup["task"].rl_prompts, tc("ppo_b"), cfg, n_iterations=1)
    b = copy.deepcopy(setup["sft"])  # a fresh process would start from the same SFT weights
    _, stats = PPO.run_ppo(
        b, setup["sft"], rm, setup["tok"], setup["task"].rl_prompts, tc("ppo_b"), cfg, n_iterations=2, resume=True
    )
    assert [s["iteration"] for s in stats] == [1]  # only the second rollout was made after resuming
    assert stats[0]["kl_coef"] != 0.1  # the adaptive KL coefficient came back from the checkpoint
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_gold_judge_levels():
    from qkv.align.task import Question

    q = Question("Last word", "Tell me how thy lady does.'")  # a trailing quote is not a word
    assert q.target == "does" and q.target_surface() == "does"
    p = q.prompt
    assert gold_reward(p, "does") == 1.0 and gold_reward(p, "Does.") == 1.0
    assert gold_reward(p, "The last word is does.") == pytest.approx(0.1)
    assert gold_reward(p, "lady") == -0.25
    assert gold_reward(p, "it is lady") == pytest.approx(-0.6)
    assert gold_reward(p, "  ") == -1.0
    with pytest.raises(ValueError, match="not a task prompt"):
        gold_reward("hello", "x")


def test_stages_take_an_imported_model_directly(tmp_path, setup, capsys):
    """`qkv dpo --model HF_DIR` fine-tunes a Hugging Face directory as it is (no convert step),
    and the result is a qkv checkpoint with the same tokenizer; weights without a tokenizer
    are a clear one-line error."""
    from qkv.checkpoint import load_model
    from qkv.cli import main
    from qkv.interop.hf import export_hf

    hf_dir = export_hf(setup["sft"], tmp_path / "hf", setup["tok"])
    write_jsonl(tmp_path / "prefs.jsonl", setup["task"].prefs[:16])
    out = tmp_path / "dpo"
    assert (
        main(
            [
                "dpo",
                "--model",
                str(hf_dir),
                "--data",
                str(tmp_path / "prefs.jsonl"),
                "--out-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    tuned = load_model(out)
    assert tuned.cfg.vocab_size == setup["sft"].cfg.vocab_size
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), setup["sft"].state_dict().values()))
    capsys.readouterr()
    assert main(["align", "eval", "--model", str(out), "--n-eval", "8", "--samples-per-prompt", "1"]) == 0
    judged = capsys.readouterr().out
    assert re.search(r"judge score [-+]\d\.\d{3} \(range -1\.\.1\) over 8 answers to 8 held-out questions", judged), (
        judged
    )
    bare = export_hf(setup["sft"], tmp_path / "bare")  # weights only
    assert (
        main(["dpo", "--model", str(bare), "--data", str(tmp_path / "prefs.jsonl"), "--out-dir", str(tmp_path / "x")])
        == 1
    )
    assert "no tokenizer found" in capsys.readouterr().err


def test_sequence_logprobs_scores_only_response_positions_and_equals_the_masked_sum():
    """DPO's sequence log-prob runs the head only where a response token is predicted; it is the
    masked sum of every position's log-prob, in value and in gradient."""
    from qkv.align.policy import sequence_logprobs
    from qkv.config import preset
    from qkv.model import build_model

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=97, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=32))
    ids = torch.randint(0, 97, (3, 12))
    kp = torch.ones(3, 12, dtype=torch.bool)
    kp[2, 9:] = False  # right padding
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 5:], mask[1, 2:7], mask[2, 6:9] = True, True, True
    batch = {"ids": ids, "key_padding": kp, "mask": mask}
    seen = []
    model.head = lambda h, real=model.head: (seen.append(h.shape[0]), real(h))[1]
    got = sequence_logprobs(model, batch)
    assert seen == [int(mask[:, 1:].sum())]  # 7 + 5 + 3 positions, not 3 x 11
    got.sum().backward()
    g_got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    del model.head
    want = (response_logprobs(model, ids, kp) * mask[:, 1:]).sum(1)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(g_got[n], p.grad, atol=1e-6), n
