"""`qkv align report` end to end at a few steps per stage: every stage runs, the report's
table has a row per model with the measured columns, and the plots are written."""

from __future__ import annotations

import json

import pytest

from qkv.align.report import KEPT_MARKER, ReportConfig, run_report


@pytest.mark.slow
def test_report_runs_every_stage_and_writes_the_table(tmp_path):
    rc = ReportConfig(
        vocab_size=320,
        n_layer=1,
        d_model=32,
        n_head=2,
        n_kv_head=1,
        max_seq_len=64,
        pretrain_steps=4,
        sft_steps=4,
        rm_steps=3,
        dpo_steps=3,
        ppo_iterations=1,
        ppo_rollout=8,
        ppo_epochs=1,
        batch_size=8,
        n_eval=8,
        max_new_tokens=6,
    )
    docs = tmp_path / "docs"
    docs.mkdir()
    hand = f"{KEPT_MARKER}\n\n## Real models\n\n| task | base | SFT |\n"
    (docs / "alignment.md").write_text("# an older report\n\nstale numbers\n\n" + hand)
    result = run_report(tmp_path / "run", docs, rc, log=lambda *a: None)
    assert set(result["rows"]) == {"base", "SFT", "DPO", "PPO", "PPO-ptx"}
    for row in result["rows"].values():
        assert -1.0 <= row["gold"] <= 1.0 and 0.0 <= row["exact"] <= 1.0 and row["val_bpb"] > 0
    assert result["rows"]["SFT"]["win_vs_sft"] == 0.5  # against itself: all ties
    text = (tmp_path / "docs" / "alignment.md").read_text()
    for name in ("SFT", "DPO", "PPO-ptx"):
        assert f"| {name} |" in text
    # the old report is gone, the hand-written part after the marker is kept, once
    assert "stale numbers" not in text and text.endswith(hand) and text.count(KEPT_MARKER) == 1
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["dpo_steps"] == 3
    assert list((tmp_path / "docs" / "img").glob("alignment_*.png"))
