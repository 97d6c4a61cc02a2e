"""Checkpoints survive long runs, a second run in the same directory, and crashes mid-export:
pruning orders steps by number and never removes the latest, a run holds a lock on its
out_dir, and an export writes its config.json only after the weights it describes."""

import fcntl
import json

import pytest
import torch

import qkv.checkpoint as checkpoint
import qkv.io
from qkv.checkpoint import CONFIG, WEIGHTS, load_model, save_model
from qkv.config import ModelConfig
from qkv.model import build_model
from qkv.train import TrainConfig, state
from qkv.train.pretrain import make_trainer

MICRO = ModelConfig(vocab_size=50, n_layer=1, d_model=16, n_head=2, n_kv_head=1, max_seq_len=32)


def _save(out_dir, step, keep_last=2):
    model = build_model(MICRO)
    opt = torch.optim.AdamW(model.parameters())
    return state.save_checkpoint(out_dir, step, model, opt, {}, is_main=True, keep_last=keep_last)


def _steps(out_dir):
    return sorted(p.name for p in out_dir.glob("step_*"))


def test_pruning_orders_steps_by_number_past_a_million(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        _save(tmp_path, step)
    assert _steps(tmp_path) == ["step_1000000", "step_999999"]
    assert state.latest_checkpoint(tmp_path).name == "step_1000000"


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    (tmp_path / "step_000100").mkdir()  # left by an earlier, longer run in this directory
    _save(tmp_path, 10, keep_last=1)
    assert state.latest_checkpoint(tmp_path).name == "step_000010"
    assert (tmp_path / "step_000010" / WEIGHTS).exists()


def test_pruning_leaves_directories_that_are_not_steps(tmp_path):
    (tmp_path / "step_notes").mkdir()
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=1)
    assert _steps(tmp_path) == ["step_000003", "step_notes"]


# --- one run per out_dir -----------------------------------------------------------------------
TEXT = "".join(f"Line {i}: the quick brown fox jumps over dog {i % 17}.\n" for i in range(200))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from qkv.data.prepare import prepare

    src = tmp_path_factory.mktemp("src") / "t.txt"
    src.write_text(TEXT)
    out = tmp_path_factory.mktemp("d") / "data"
    prepare(str(src), out, vocab_size=300, log=lambda s: None)
    return out


def _train_cfg(data, out) -> TrainConfig:
    model = {"n_layer": 1, "d_model": 16, "n_head": 2, "n_kv_head": 1}
    return TrainConfig(
        data_dir=str(data), out_dir=str(out), model=model, seq_len=8, batch_size=2, max_steps=2, warmup_steps=1,
        eval_every=0, log_every=1, save_every=1, progress=False, threads=1, seed=1,
    )  # fmt: skip


def test_a_second_run_in_the_same_out_dir_is_refused(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / state.RUN_LOCK, "a") as held:  # another run holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(RuntimeError, match=f"{out}.*in use by another run") as err:
            make_trainer(_train_cfg(data, out)).fit()
        assert "\n" not in str(err.value)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing pruned
    make_trainer(_train_cfg(data, out)).fit()  # once it is free, a run goes ahead
    assert _steps(out) == ["step_000001", "step_000002"]
    make_trainer(_train_cfg(data, out).replace(max_steps=3), resume=True).fit()  # and the lock was let go


# --- exports: config.json is written last ------------------------------------------------------
def _crash_on_weights(monkeypatch, module):
    real = module.atomic_write_bytes

    def write(path, data):
        if path.name == WEIGHTS:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(module, "atomic_write_bytes", write)


def test_a_crash_while_saving_weights_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    old = build_model(MICRO)
    save_model(tmp_path, old)
    _crash_on_weights(monkeypatch, checkpoint)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path, build_model(MICRO.replace(n_layer=2)))
    monkeypatch.undo()
    loaded = load_model(tmp_path)  # the old config beside the old weights
    assert loaded.cfg == MICRO
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))


def test_a_crash_while_exporting_to_transformers_leaves_no_new_config(tmp_path, monkeypatch):
    from qkv.interop.hf import export_hf

    export_hf(build_model(MICRO), tmp_path, arch="llama")
    before = (tmp_path / CONFIG).read_text()
    _crash_on_weights(monkeypatch, qkv.io)
    with pytest.raises(OSError, match="disk full"):
        export_hf(build_model(MICRO.replace(n_layer=2)), tmp_path, arch="llama")
    assert (tmp_path / CONFIG).read_text() == before
    assert json.loads(before)["num_hidden_layers"] == 1


def test_a_crash_while_writing_the_trained_model_keeps_the_previous_config(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_trainer(_train_cfg(data, out)).fit()
    before = (out / CONFIG).read_text()
    trainer = make_trainer(_train_cfg(data, tmp_path / "other").replace(model={"n_layer": 2, "d_model": 16}))
    trainer.out_dir = out  # the final write of a different model into the first run's directory
    _crash_on_weights(monkeypatch, checkpoint)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_final()
    assert (out / CONFIG).read_text() == before
