"""qkv.train: the one training loop shared by pretraining, SFT, reward modelling, PPO and DPO.

The loop knows nothing about the task. A stage hands it a model, a loss function and a
batch source; the loop does the rest (optimizer, schedule, accumulation, clipping, bf16
autocast, torch.compile, DDP/FSDP, eval, metrics, progress bar, atomic checkpoints, exact
resume, NaN stop).

API (what SFT / reward / PPO / DPO call)::

    from qkv.train import TrainConfig, Trainer

    cfg = TrainConfig(out_dir="runs/sft", max_steps=200, lr=1e-4, batch_size=8, ...)

    def loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
        # model is the (possibly DDP/FSDP/compiled) module; batch is whatever get_batch gave.
        # Return the scalar loss to minimise and float-able metrics to log; put the number
        # of trained tokens in metrics["tokens"] for tokens/s and MFU.
        loss = model.loss(batch["x"], batch["y"])       # Transformer.loss adds MoE aux loss
        return loss, {"tokens": batch["y"].numel()}

    def get_batch(step: int, micro: int):
        # Deterministic in (step, micro) so resume sees the same data: the batch for this
        # process, rank trainer.rank of trainer.world.
        ...

    trainer = Trainer(model, cfg, loss_fn, get_batch,
                      eval_batch=lambda i: ...,       # optional: i in range(cfg.eval_steps)
                      bytes_per_token=3.9,            # optional: eval reports bits per byte
                      tokenizer=tok,                  # saved into every checkpoint
                      extra_state={"stage": "sft"},   # any JSON, saved in trainer/state.json
                      resume=True)                    # continue from out_dir's latest checkpoint
    result = trainer.fit()   # -> TrainResult(step, train_loss, val_loss, val_bpb, tokens_per_s, run_dir)

    Trainer(...).model        # the unwrapped qkv model (after fit: the trained weights)
    trainer.on_step = fn      # optional hook fn(trainer, step, metrics) after each step
                              # (PPO can refresh rollouts there)

Files in cfg.out_dir (the run directory; only rank 0 writes):
    metrics.jsonl            one JSON line per logged step / eval (step, loss, lr, tokens_per_s, mfu, val_loss, val_bpb)
    run_config.json          the TrainConfig
    step_000100/             a full qkv checkpoint (config.json, model.safetensors, tokenizer files)
      trainer/               state.json (step, RNG states, data position, config) and
                             optimizer.safetensors: in the newest checkpoint only (save_optimizer="last",
                             what resume reads), in every one ("all") or in none ("never": not resumable)
    latest.json              {"step": 100, "dir": "step_000100"}   (written last, atomically)
    run.lock                 locked (flock) while a run writes here: a second run in out_dir is refused
    config.json, model.safetensors, tokenizer.json ...   the final model (qkv.checkpoint.load_model(out_dir));
                             its model.safetensors is a hard link to the last checkpoint's when that holds
                             the same weights, so they are stored once

Other pieces: qkv.train.config (TrainConfig, load/overrides), qkv.train.optim (AdamW param
groups, lr schedules), qkv.train.state (trainer checkpoints), qkv.train.distributed
(torchrun setup, DDP / FSDP2 wrapping), qkv.train.pretrain (the `qkv train` stage).
"""

from qkv.train.config import TrainConfig, load_train_config
from qkv.train.trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult", "load_train_config"]
