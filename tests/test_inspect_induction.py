"""Induction heads are real: the toy attention-only model of qkv.inspect.induction, trained on
repeated random segments, develops a head that the inspector scores as induction; the same
model untrained has none. The recipe, the probe and what was measured are in that module's
docstring and docs/inspect.md.

Threshold 0.4 (qkv.inspect.attention.THRESHOLDS): 40 % of the head's attention on the one
right key, about 8x the chance level of uniform causal attention on this probe (~0.05).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qkv.cli import main
from qkv.inspect.attention import THRESHOLDS, chance_level
from qkv.inspect.induction import ToyInductionConfig, induction_scores, train_toy_induction
from qkv.model import build_model


def test_untrained_model_has_no_induction_head():
    torch.manual_seed(0)
    before, _ = induction_scores(build_model(ToyInductionConfig().model_config()))
    assert before.max() < 0.15, before  # about chance everywhere
    assert before.max() < THRESHOLDS["induction"]


@pytest.mark.slow
def test_trained_model_develops_an_induction_head():
    cfg = ToyInductionConfig(steps=1200, probe_every=0)
    res = train_toy_induction(cfg)
    after = res.scores
    best = after.max().item()
    layer = int(after.max(dim=1).values.argmax())
    assert best >= THRESHOLDS["induction"], after
    assert best > 8 * chance_level(2 * 13, 13)
    assert layer >= 1, "an induction head needs a previous-token head below it"
    # the head does the task: the copy loss falls far below a guess among the 64 tokens
    assert sum(res.losses[-50:]) / 50 < 0.5 * math.log(cfg.vocab_size), res.losses[-50:]


def test_induction_view_refuses_a_real_model(tmp_path, capsys):
    assert main(["inspect", "smollm2", "induction", "--out", str(tmp_path)]) != 0
    assert "qkv inspect toy induction" in capsys.readouterr().err


@pytest.mark.slow
def test_induction_view_writes_the_phase_change(tmp_path):
    # a short run: the plots and the JSON history, not the mechanism (tested above)
    assert main(["inspect", "toy", "induction", "--steps", "40", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "induction.json").read_text())
    assert [r["step"] for r in data["history"]] == [0, 40] and data["history"][0]["loss"] is None
    assert len(data["scores"]) == 2 and len(data["scores"][0]) == 4
    for name in ("induction_phase_change.png", "induction_attention.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
