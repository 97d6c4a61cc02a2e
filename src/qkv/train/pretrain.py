"""Pretraining (`qkv train`): a preset model on prepared token shards, via the shared Trainer.

The model's vocab_size comes from the data dir's tokenizer; the context is at least seq_len.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qkv.train.config import TrainConfig
from qkv.train.trainer import Trainer, TrainResult


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy (Transformer.loss also adds MoE router losses in training)."""
    loss = model.loss(batch["x"], batch["y"])
    return loss, {"tokens": batch["y"].numel()}


def build_pretrain_model(cfg: TrainConfig, vocab_size: int):
    if cfg.lora_r:
        raise ValueError("qkv train pretrains every weight; lora_r applies to the fine-tuning stages (sft, dpo, grpo)")
    from qkv.checkpoint import load_model
    from qkv.config import preset
    from qkv.model import build_model

    if cfg.init_from:
        model = load_model(cfg.init_from).train()
        if model.cfg.vocab_size != vocab_size:
            raise ValueError(
                f"init_from model has vocab {model.cfg.vocab_size} but the data's tokenizer has {vocab_size}"
            )
        return model
    overrides = {"vocab_size": vocab_size, **cfg.model}
    mc = preset(cfg.preset, **overrides)
    if mc.max_seq_len < cfg.seq_len:
        mc = mc.replace(max_seq_len=cfg.seq_len)
    torch.manual_seed(cfg.seed)  # same init on every process
    return build_model(mc)


def make_trainer(cfg: TrainConfig, resume: bool = False) -> Trainer:
    from qkv.data.loader import WindowSampler
    from qkv.data.shards import TokenShards, read_index
    from qkv.tokenizer import Tokenizer
    from qkv.train import distributed as D

    index = read_index(cfg.data_dir)
    train = WindowSampler(TokenShards(cfg.data_dir, "train"), cfg.seq_len, cfg.seed)
    val = WindowSampler(TokenShards(cfg.data_dir, "val"), cfg.seq_len, cfg.seed)
    tok = Tokenizer.load(cfg.data_dir)
    d = D.setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_pretrain_model(cfg, int(index["vocab_size"]))
    micro_global = cfg.batch_size // cfg.grad_accum
    eval_bs = max(micro_global, d.world)
    eval_bs -= eval_bs % d.world
    trainer = Trainer(
        model,
        cfg,
        lm_loss,
        get_batch=lambda step, micro: train.batch(step, micro, micro_global, d.rank, d.world),
        eval_batch=lambda i: val.eval_batch(i, eval_bs, d.rank, d.world),
        bytes_per_token=float(index["bytes_per_token"]),
        tokenizer=tok,
        extra_state={"stage": "pretrain", "data_dir": str(Path(cfg.data_dir).resolve())},
        resume=resume,
        dist=d,
    )
    return trainer


def pretrain(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    return make_trainer(cfg, resume).fit()
