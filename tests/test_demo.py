"""`qkv demo`, the README's main job, end to end at a few steps per stage: every stage runs,
writes a loadable model, and the report names what each stage measured."""

from __future__ import annotations

import re
import shlex

import pytest

from qkv.checkpoint import load_model
from qkv.cli import main
from qkv.tokenizer import IM_END, Tokenizer


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--vocab-size",
        "512",
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--sft-steps",
        "8",
        "--dpo-steps",
        "4",
        "--samples",
        "1",
        "--max-tokens",
        "8",
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for stage in ("pretrain", "sft", "dpo"):
        assert load_model(out / stage).cfg.vocab_size == 512
    assert Tokenizer.load(out / "dpo").eos_token == IM_END  # the chat model stops at the end of its turn
    assert Tokenizer.load(out / "pretrain").eos_token != IM_END
    assert re.search(r"val loss\s+[\d.]+ at init -> [\d.]+ nats/token", text)
    assert re.search(r"SFT\s+train loss [\d.]+ on assistant tokens; judge score [-+][\d.]+ on 64 held-out", text)
    assert re.search(r"DPO\s+judge score [-+][\d.]+ \(SFT [-+][\d.]+\); wins \d+% of prompts", text)
    assert "assistant: " in text and (out / "pretrain" / "loss.png").exists()
    # the commands the report suggests next are valid as printed
    hints = [shlex.split(c) for c in text.rsplit("next: ", 1)[1].strip().split("   |   ")]
    assert [h[:2] for h in hints] == [["qkv", "chat"], ["qkv", "generate"], ["qkv", "plot"]]
    assert main(hints[1][1:] + ["--max-tokens", "4"]) == 0
    assert main(hints[2][1:]) == 0

    # running it again reuses every stage: same models, same judged scores, nothing overwritten
    assert main(argv) == 0
    again = capsys.readouterr().out

    def stages(t):
        return [re.sub(r"\s+\[\d+s\]$", "", ln) for ln in t.splitlines() if ln.startswith(("SFT ", "DPO ", "val loss"))]

    assert stages(again)[1:] == stages(text)[1:] and len(stages(text)) == 3
