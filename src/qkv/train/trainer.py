"""The training loop. One optimizer step:

    for each micro-batch:  loss = loss_fn(model, batch) / grad_accum;  loss.backward()
    (gradients all-reduced across processes by DDP, or reduce-scattered by FSDP)
    clip the global gradient norm;  set lr from the schedule;  AdamW (or Muon) step;  zero grads

plus, around it: eval every N steps (val loss and bits per byte), metrics JSONL, a tqdm
bar with tokens/s and MFU, atomic checkpoints every N steps, exact resume, and a stop
with a clear message when the loss or gradient norm is not finite.

Metrics: each logged step appends one line to out_dir/metrics.jsonl (rank 0; the line is
written whole and handed to the OS at once, so it survives the process being killed), and
the file is fsynced before every checkpoint, so the lines up to a checkpoint's step are on
disk before the checkpoint is. After a crash the file may hold lines past the last
checkpoint (steps the resumed run will compute again), or, after a power loss, a torn last
line; a resumed run keeps the lines up to its checkpoint's step, drops the rest, and
rewrites the file once, so every step is logged exactly once and in order.

Determinism: batches are a pure function of (step, micro, rank) (the caller's get_batch),
and the RNG is re-seeded from (seed, step, rank) before every step, so a resumed run
computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qkv.io import atomic_write_text
from qkv.kernels import causal_attention, cross_entropy, gelu
from qkv.model import attention as model_attention
from qkv.model import layers as model_layers
from qkv.model import loss as model_loss
from qkv.train import distributed as D
from qkv.train import state as S
from qkv.train.config import TrainConfig, save_config
from qkv.train.optim import lr_at, make_optimizer, muon_options

METRICS = "metrics.jsonl"

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]

# metrics of a loss function shown on the progress bar and in log lines, by their short names
# (DPO's implicit-reward margin and accuracy, the reward model's pairwise ones)
SHOWN = {"rewards_margin": "margin", "rewards_accuracy": "acc", "margin": "margin", "accuracy": "acc"}


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; raised before the bad update is applied."""


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    tokens_per_s: float
    run_dir: Path
    history: list
    disk: dict | None = None  # bytes on disk: total, weights, optimizer (state.disk_usage)


class _LossModule(nn.Module):
    """Routes loss_fn through one module call so DDP sees a forward (and syncs gradients)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on this device, measured now (the MFU denominator): the
    best of several, since on a shared machine any one may be descheduled."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """Training FLOPs per token: 6 x (active matmul params incl. the output head) plus the
    attention scores and mixing, 12 x layers x heads x head_dim x seq_len (PaLM, appendix B)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    from qkv.model import count_params

    counts = count_params(model)
    matmul_params = counts.active_non_embedding + cfg.vocab_size * cfg.d_model
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loss_fn: LossFn,
        get_batch: Callable[[int, int], Any],
        eval_batch: Callable[[int], Any] | None = None,
        bytes_per_token: float | None = None,
        tokenizer=None,
        extra_state: dict | None = None,
        resume: bool = False,
        dist: D.Dist | None = None,
    ):
        self.cfg = cfg
        self.loss_fn, self.get_batch, self.eval_batch = loss_fn, get_batch, eval_batch
        self.bytes_per_token = bytes_per_token
        self.tokenizer = tokenizer
        self.extra_state = extra_state or {}
        self.on_step: Callable[[Trainer, int, dict], None] | None = None
        self.dist = dist or D.setup(cfg.device)
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        per_rank = cfg.batch_size // cfg.grad_accum
        if per_rank % self.dist.world:
            raise ValueError(
                f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} = {per_rank} sequences per micro-step "
                f"cannot be split evenly over {self.dist.world} processes; change batch_size"
            )

        self.model = model.to(self.device)  # the plain module (loss_fn and checkpoints see this)
        self.step = 0
        ckpt = S.latest_checkpoint(self.out_dir) if self.out_dir.exists() else None
        loaded = None
        if ckpt is not None and not resume:
            raise ValueError(
                f"{self.out_dir} already holds a run (checkpoint {ckpt.name}); resume it with --resume "
                "or choose another out_dir (nothing was overwritten)"
            )
        if ckpt is not None:
            loaded = S.read_checkpoint(ckpt)  # validated before anything is written
            S.load_model_state(self.model, loaded[0], ckpt)
            self.step = int(loaded[2]["step"])
            self.resumed_from: Path | None = ckpt
        else:
            self.resumed_from = None
        self.saved_step = self.step if ckpt is not None else None  # the step of the newest checkpoint

        if cfg.compile:
            for block in getattr(self.model, "blocks", []):
                block.compile()
        if self.dist.enabled and cfg.parallel == "fsdp":
            from qkv.lora import has_lora

            if has_lora(self.model):
                raise ValueError("LoRA runs shard nothing worth sharding (the base is frozen); use parallel=ddp")
            D.wrap(self.model, self.dist, "fsdp")  # shards in place
            self.wrapped = _LossModule(self.model, loss_fn)
        else:
            self.wrapped = D.wrap(_LossModule(self.model, loss_fn), self.dist, "ddp")
        self.opt = make_optimizer(
            self.model,
            cfg.lr,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
            cfg.eps,
            optimizer=cfg.optimizer,
            muon=muon_options(cfg),
        )
        if loaded is not None:
            S.load_optimizer_state(self.model, self.opt, loaded[1], loaded[2])
            S.restore_rng(loaded[2], self.device)
        self.history: list[dict] = _read_metrics(self.out_dir / METRICS, self.step) if self.dist.is_main else []
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bf16" else None
        if self.autocast_dtype is not None:  # the fused loss's bf16 softmax step in one native pass per row
            model_loss.install_row_kernel(cross_entropy.rows)
        self.flops_per_token = flops_per_token(self.model, cfg.seq_len)
        self.peak_flops = (
            matmul_peak(self.device, self.autocast_dtype or torch.float32) if self.flops_per_token else None
        )

    # --- properties for batch sources -----------------------------------------------
    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world

    # --- pieces ---------------------------------------------------------------------
    @contextmanager
    def _forward(self):
        """Where the model's forward runs: under bf16 autocast for a bf16 run, with causal
        attention and the tanh GELU (forward and backward) in native kernels where they apply,
        PyTorch's ops elsewhere. The kernels are installed for these forwards only: the model
        outside training (sampling, a later evaluation in the same process) keeps PyTorch's."""
        attention_before = model_attention.install_causal_kernel(causal_attention.attention)
        gelu_before = model_layers.install_gelu_tanh_kernel(gelu.gelu_tanh)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None):
                yield
        finally:
            model_attention.install_causal_kernel(attention_before)
            model_layers.install_gelu_tanh_kernel(gelu_before)

    def _seed_step(self, step: int) -> None:
        torch.manual_seed((self.cfg.seed * 1_000_003 + step) * 1009 + self.rank)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.dist.is_main:
            with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _sync_metrics(self) -> None:
        """Put the logged lines on disk (before a checkpoint: a resume starts from it)."""
        path = self.out_dir / METRICS
        if self.dist.is_main and path.exists():
            with open(path, "ab") as f:
                os.fsync(f.fileno())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over cfg.eval_steps batches from eval_batch (all ranks averaged); the
        model is left in the mode it was in."""
        if self.eval_batch is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.eval_steps):
            batch = _to_device(self.eval_batch(i), self.device)
            with self._forward():
                loss, _ = self.loss_fn(self.model, batch)
            total += loss.detach().float()
        self.model.train(was_training)
        val = D.all_reduce_mean(total / self.cfg.eval_steps).item()
        out = {"val_loss": val}
        if self.bytes_per_token:
            out["val_bpb"] = val / math.log(2) / self.bytes_per_token
        return out

    def save(self) -> Path | None:
        self._sync_metrics()
        self.saved_step = self.step
        return S.save_checkpoint(
            self.out_dir,
            self.step,
            self.model,
            self.opt,
            self.cfg.to_dict(),
            self.dist.is_main,
            tokenizer=self.tokenizer,
            extra={**self.extra_state, "data_step": self.step},
            keep_last=self.cfg.keep_last,
            device=self.device,
            save_optimizer=self.cfg.save_optimizer,
        )

    def save_final(self) -> None:
        """The trained model at the top of out_dir: a qkv checkpoint load_model reads. When the
        newest step checkpoint holds these very weights, the top-level file is a hard link to
        its model.safetensors, so the weights are stored once."""
        from qkv import lora
        from qkv.checkpoint import CONFIG, WEIGHTS, write_model_files

        if lora.has_lora(self.model):  # a LoRA run's result is its adapter (PEFT's format)
            if self.dist.is_main:
                lora.save_adapter(self.model, self.out_dir, base_model=getattr(self.model, "lora_base_model", None))
                if self.tokenizer is not None:
                    self.tokenizer.save(self.out_dir)
            return
        if self.saved_step == self.step:  # same on every rank: no collective gather needed
            if self.dist.is_main:
                step_dir = S.latest_checkpoint(self.out_dir)
                S.link_or_copy(step_dir / WEIGHTS, self.out_dir / WEIGHTS)
                if self.tokenizer is not None:
                    self.tokenizer.save(self.out_dir)
                self.model.cfg.save(self.out_dir / CONFIG)  # last: the config makes it a checkpoint
            return
        sd = S.full_model_state(self.model)
        if not self.dist.is_main:
            return
        write_model_files(self.out_dir, self.model.cfg, sd, self.tokenizer, {"step": self.step})

    def _train_step(self, step: int) -> dict:
        cfg = self.cfg
        self._seed_step(step)
        schedule = dict(
            lr=cfg.lr,
            max_steps=cfg.max_steps,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_frac=cfg.decay_frac,
        )
        lr = lr_at(step, **schedule)
        for g in self.opt.param_groups:  # Muon's groups have their own peak lr
            g["lr"] = lr if "peak_lr" not in g else lr_at(step, **{**schedule, "lr": g["peak_lr"]})
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        extra: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(self.get_batch(step, micro), self.device)
            sync = micro == cfg.grad_accum - 1
            ctx = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) else nullcontext()
            with ctx:
                with self._forward():
                    loss, metrics = self.wrapped(batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                if k == "tokens":
                    tokens += int(v)
                else:
                    extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
        loss_val = D.all_reduce_mean(loss_sum / cfg.grad_accum).item()
        if not math.isfinite(loss_val):
            self._diverged(step, f"loss is {loss_val}")
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm_val = float(norm)
        if not math.isfinite(norm_val):
            self._diverged(step, f"gradient norm is {norm_val}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": tokens * self.world, **extra}

    def _log_line(self, m: dict, shown: dict) -> str:
        extra = "".join(f", {k} {v}" for k, v in shown.items())
        return (
            f"step {self.step}/{self.cfg.max_steps}: loss {m['loss']:.4f}{extra}, lr {m['lr']:.2e}, "
            f"grad norm {m['grad_norm']:.3f}, {m['tokens_per_s']:,.0f} tok/s"
        )

    def _diverged(self, step: int, what: str) -> None:
        last = S.latest_checkpoint(self.out_dir) if self.out_dir.exists() else None
        where = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"{what} at step {step + 1}; stopped before applying the update ({where}). "
            "Lower lr, keep grad_clip on, or train in fp32"
        )

    # --- the loop -------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to cfg.max_steps, holding out_dir against a second run (rank 0 holds the lock)."""
        with S.run_lock(self.out_dir) if self.dist.is_main else nullcontext():
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "run_config.json")
            if self.history or (self.out_dir / METRICS).exists():  # without lines past the resumed step
                atomic_write_text(self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.history))
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
            desc="train",
        )
        self.model.train()
        last: dict = {}
        val: dict = {}
        t0, tok_total, time_total = time.perf_counter(), 0, 0.0
        while self.step < cfg.max_steps:
            m = self._train_step(self.step)
            self.step += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            tok_total += m["tokens"]
            time_total += dt
            tps = m["tokens"] / dt if dt > 0 else 0.0
            m["tokens_per_s"] = tps
            if self.flops_per_token and self.peak_flops:
                m["mfu"] = tps / self.world * self.flops_per_token / self.peak_flops
                if m["mfu"] > 1.0:  # the start-up ceiling was measured while the machine was busy: measure again
                    self.peak_flops = max(
                        self.peak_flops, matmul_peak(self.device, self.autocast_dtype or torch.float32)
                    )
                    m["mfu"] = tps / self.world * self.flops_per_token / self.peak_flops
            last = m
            bar.update(1)
            shown = {short: f"{m[k]:.3f}" for k, short in SHOWN.items() if k in m}
            bar.set_postfix(
                loss=f"{m['loss']:.3f}", **shown, tok_s=f"{tps:,.0f}", mfu=f"{m.get('mfu', 0):.0%}", refresh=False
            )
            if self.on_step is not None:
                self.on_step(self, self.step, m)
            do_eval = self.eval_batch is not None and (
                (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps
            )
            if do_eval:
                val = self.evaluate()
                bar.write(
                    f"step {self.step}: train loss {m['loss']:.4f}, "
                    + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                ) if self.dist.is_main else None
            if self.step % cfg.log_every == 0 or do_eval or self.step == cfg.max_steps:
                self._log({"step": self.step, **{k: v for k, v in m.items()}, **(val if do_eval else {})})
                if bar.disable and self.dist.is_main:  # no bar to watch: one line per logged step
                    print(self._log_line(m, shown), flush=True)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps:
                self.save()
            t0 = time.perf_counter()  # eval and checkpoint time is not training time
        bar.close()
        if "loss" not in last:  # resumed a finished run: report its last logged values
            last = next((r for r in reversed(self.history) if "loss" in r), last)
            val = next(
                (
                    {k: r[k] for k in ("val_loss", "val_bpb") if k in r}
                    for r in reversed(self.history)
                    if "val_loss" in r
                ),
                {},
            )
        self._sync_metrics()
        self.save_final()
        D.barrier()
        return TrainResult(
            step=self.step,
            train_loss=last.get("loss", float("nan")),
            val_loss=val.get("val_loss"),
            val_bpb=val.get("val_bpb"),
            tokens_per_s=tok_total / time_total
            if time_total
            else (sum(r.get("tokens_per_s", 0) for r in self.history) / max(1, len(self.history))),
            run_dir=self.out_dir,
            history=self.history,
            disk=S.disk_usage(self.out_dir) if self.dist.is_main else None,
        )


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The logged lines of a run resumed at `up_to_step`: later ones are dropped (the resumed
    run logs them again), and so is a line torn by a crash mid-write."""
    if up_to_step == 0 or not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= up_to_step:
            kept.append(record)
    return kept
