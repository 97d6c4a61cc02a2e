"""A new user's first training runs: the data is checked against --seq-len before the model
loads, a run stores its final weights once and optimizer state only where --resume needs it,
every option's --help shows its default, --epochs, and log lines without a progress bar.

One tiny chat model (1 layer, d=32) and tokenizer serve every test; runs are a few steps."""

import argparse
import json
import os
import re

import pytest
import torch

from qkv.align.data import Preference, encode_response, preference_fit
from qkv.align.task import build_tokenizer
from qkv.checkpoint import save_model
from qkv.cli import build_parser, main
from qkv.config import preset
from qkv.model import build_model
from qkv.train.config import TrainConfig

LONG = "Speak the speech, I pray you, as I pronounced it to you, trippingly on the tongue. " * 2
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Good morrow."}]
CUT = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Aye, my lord."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer(300, max_chars=20_000)
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=192)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("first") / "base"
    save_model(d, build_model(cfg), tok)
    return d, tok


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sft(model_dir, data, out, *extra):
    return main(["sft", "--model", str(model_dir), "--data", data, "--out-dir", str(out), "--threads", "1", *extra])


def test_sft_refuses_to_train_on_nothing_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    d, tok = model_dir
    data = _jsonl(tmp_path / "d.jsonl", [{"messages": CUT}] * 3)
    n_prompt = len(tok.encode_chat(CUT[:1], add_generation_prompt=True)[0])
    longest = len(tok.encode_chat(CUT)[0])
    assert n_prompt > 16

    def no_weights(source):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("qkv.commands._align_args.load_policy", no_weights)
    assert _sft(d, data, tmp_path / "o", "--seq-len", "16", "--batch-size", "2") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--seq-len 16 keeps no assistant token of any of the 3 conversations" in err
    assert f"raise --seq-len to {longest}" in err
    assert not (tmp_path / "o").exists()


def test_sft_warns_with_counts_when_some_replies_are_cut(model_dir, tmp_path, capsys):
    d, tok = model_dir
    convs = [SHORT, SHORT, CUT]
    data = _jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in convs])
    seq_len = 48
    encoded = [tok.encode_chat(c) for c in convs]
    assert len(encoded[0][0]) <= seq_len < len(encoded[2][0])
    tokens = sum(len(ids) for ids, _ in encoded)
    assistant = sum(sum(m) for _, m in encoded)
    lost = sum(sum(m[seq_len:]) for _, m in encoded)
    args = ["--seq-len", str(seq_len), "--batch-size", "2", "--max-steps", "1", "--no-progress"]
    assert _sft(d, data, tmp_path / "o", *args) == 0
    out, err = capsys.readouterr()
    assert f"data: 3 conversations; {tokens:,} tokens, {assistant:,} assistant tokens, 1 truncated at seq_len 48" in out
    assert (
        f"warning: 1 of 3 conversations are longer than --seq-len 48 and are cut "
        f"({lost:,} of {assistant:,} assistant tokens lost; 1 keep none); raise --seq-len to {len(encoded[2][0])}"
    ) in err


def test_preference_data_is_summarised_per_side(model_dir, tmp_path, capsys):
    d, tok = model_dir
    prefs = [
        Preference(
            [{"role": "user", "content": LONG}],
            [{"role": "assistant", "content": x}],
            [{"role": "assistant", "content": y}],
        )
        for x, y in [("Aye.", "Nay, not so, my good lord, never."), ("Yes.", "No.")]
    ]
    fit = preference_fit(tok, prefs, 10_000)
    for side in ("chosen", "rejected"):
        encoded = [encode_response(tok, p.prompt, getattr(p, side), 10_000) for p in prefs]
        assert fit.sides[side].tokens == sum(len(ids) for ids, _ in encoded)
        assert fit.sides[side].assistant == sum(sum(m) for _, m in encoded)
    rows = [{"prompt": LONG, "chosen": "Aye.", "rejected": "Nay."}] * 2
    data = _jsonl(tmp_path / "p.jsonl", rows)
    assert main(["dpo", "--model", str(d), "--data", data, "--out-dir", str(tmp_path / "o"), "--seq-len", "8"]) == 1
    assert "--seq-len 8 keeps no assistant token of any of the 2 pairs" in capsys.readouterr().err
    summary = preference_fit(tok, prefs, 10_000).summary()
    assert summary.startswith("data: 2 pairs; chosen: ") and "; rejected: " in summary


def test_a_run_stores_its_weights_once_and_optimizer_state_only_for_resume(model_dir, tmp_path, capsys):
    """--epochs 1.5 over 4 conversations at batch 2 = 3 steps; one log line per step without a
    bar; the final weights are the last checkpoint's file (one inode); only that checkpoint
    keeps the optimizer state; the summary says the sizes."""
    d, _ = model_dir
    data = _jsonl(tmp_path / "d.jsonl", [{"messages": SHORT}] * 4)
    out = tmp_path / "o"
    args = ["--batch-size", "2", "--epochs", "1.5", "--save-every", "1", "--keep-last", "2", "--no-progress"]
    assert _sft(d, data, out, *args, "--log-every", "1", "--seq-len", "48") == 0
    stdout = capsys.readouterr().out
    assert re.findall(r"^step (\d)/3: loss \d+\.\d{4}, lr ", stdout, re.M) == ["1", "2", "3"]
    assert "sft done: step 3," in stdout
    assert os.path.samefile(out / "model.safetensors", out / "step_000003" / "model.safetensors")
    assert (out / "step_000003" / "trainer" / "optimizer.safetensors").exists()
    assert not (out / "step_000002" / "trainer" / "optimizer.safetensors").exists()
    weights = (out / "model.safetensors").stat().st_size
    opt = (out / "step_000003" / "trainer" / "optimizer.safetensors").stat().st_size
    line = next(x for x in stdout.splitlines() if x.startswith("run dir on disk:"))
    assert f"weights {2 * weights / 1e6:,.1f} MB" in line and f"optimizer state {opt / 1e6:,.1f} MB" in line
    # --resume reads the newest checkpoint, which kept its optimizer state: a finished run resumes
    assert _sft(d, data, out, *args, "--resume") == 0

    never = tmp_path / "never"
    assert _sft(d, data, never, *args, "--save-optimizer", "never", "--max-steps", "1") == 0
    assert "sft done: step 1," in capsys.readouterr().out  # --max-steps caps --epochs
    assert not list(never.rglob("optimizer.safetensors"))
    assert _sft(d, data, never, *args, "--save-optimizer", "never", "--resume") == 1
    assert "saved without optimizer state (save_optimizer=never)" in capsys.readouterr().err


def test_dpo_logs_margin_and_accuracy_without_a_bar(model_dir, tmp_path, capsys):
    d, _ = model_dir
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Aye.", "rejected": "Nay, sir."}] * 2)
    argv = ["dpo", "--model", str(d), "--data", data, "--out-dir", str(tmp_path / "o"), "--batch-size", "2"]
    assert main([*argv, "--epochs", "2", "--no-progress", "--log-every", "1", "--threads", "1"]) == 0
    lines = re.findall(r"^step \d/2: .*$", capsys.readouterr().out, re.M)
    assert len(lines) == 2 and all(re.search(r"margin -?\d\.\d{3}, acc \d\.\d{3}", x) for x in lines)


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_option_of_every_verb_shows_its_default_once():
    train_fields = {f for f in TrainConfig.__dataclass_fields__}
    missing, twice = [], []
    root = build_parser()
    root = root[0] if isinstance(root, tuple) else root  # the parser, or (parser, {verb: parser})
    for verb, sub in _subparsers(root):
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = _expanded_help(sub, action)
            # TrainConfig options stay unset (SUPPRESS) so a --config file wins; they still show a default
            shown = action.default is not None and (action.default != argparse.SUPPRESS or action.dest in train_fields)
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                shown = False
            if shown and "(default: " not in text:
                missing.append(f"qkv {verb} {action.option_strings[-1]}")
            if text.count("(default") > 1:
                twice.append(f"qkv {verb} {action.option_strings[-1]}: {text}")
    assert not missing, f"options without their default in --help: {missing}"
    assert not twice, f"options showing a default twice: {twice}"


def test_stage_help_shows_the_stage_defaults_and_epochs(capsys):
    for verb in ("sft", "dpo", "reward"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--epochs FLOAT" in out and "capped by --max-steps" in out
        assert "(default: 0.0001)" in out and f"(default: 'runs/{verb}')" in out and "--max-steps INT" in out
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "(default: 1e-05)" in " ".join(capsys.readouterr().out.split())
