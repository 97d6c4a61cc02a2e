"""torchrun --nproc_per_node=2 (gloo, CPU) gives the same losses and weights (<= 1e-5) as one
process with the same global batch, for DDP and for FSDP2 fully_shard.

This file is also the worker: `torchrun ... tests/test_train_dist.py DATA OUT` trains the
DDP run into OUT/ddp and the FSDP run into OUT/fsdp."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 4


def run_config(data, out, parallel):
    from qkv.train import TrainConfig

    return TrainConfig(
        data_dir=str(data),
        out_dir=str(out),
        model={"n_layer": 2, "d_model": 32, "n_head": 2, "n_kv_head": 1},
        seq_len=16,
        batch_size=8,
        grad_accum=2,
        max_steps=STEPS,
        warmup_steps=1,
        eval_every=2,
        eval_steps=2,
        log_every=1,
        save_every=2,
        progress=False,
        threads=1,
        seed=3,
        parallel=parallel,
        device="cpu",
    )


def worker(data: str, out: str) -> None:
    from qkv.train import distributed as D
    from qkv.train.pretrain import make_trainer

    for parallel in ("ddp", "fsdp"):
        make_trainer(run_config(data, Path(out) / parallel, parallel)).fit()
    D.teardown()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    from qkv.data.prepare import prepare
    from qkv.train.pretrain import make_trainer

    src = tmp_path / "t.txt"
    src.write_text(
        "".join(
            f"Line {i}: the quick brown fox {'jumps' if i % 3 else 'sleeps'} over dog {i % 17}.\n" for i in range(300)
        )
    )
    prepare(str(src), tmp_path / "data", vocab_size=300, log=lambda s: None)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", __file__, str(tmp_path / "data"), str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    n = torch.get_num_threads()
    try:
        ref = make_trainer(run_config(tmp_path / "data", tmp_path / "one", "ddp")).fit()
    finally:
        torch.set_num_threads(n)
    ref_w = load_file(str(tmp_path / "one" / "model.safetensors"))
    for parallel in ("ddp", "fsdp"):
        rows = [json.loads(line) for line in (tmp_path / "dist" / parallel / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        for r, h in zip(rows, ref.history):
            assert r["loss"] == pytest.approx(h["loss"], abs=1e-5), parallel
            assert r["tokens"] == h["tokens"] == 8 * 16
        assert rows[-1]["val_loss"] == pytest.approx(ref.history[-1]["val_loss"], abs=1e-5)
        w = load_file(str(tmp_path / "dist" / parallel / "model.safetensors"))
        assert w.keys() == ref_w.keys()
        for k in w:
            torch.testing.assert_close(w[k], ref_w[k], atol=1e-5, rtol=0, msg=f"{parallel} {k}")
        # only rank 0 wrote: one checkpoint set, resumable like any other
        assert (tmp_path / "dist" / parallel / "step_000004" / "trainer" / "optimizer.safetensors").exists()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
