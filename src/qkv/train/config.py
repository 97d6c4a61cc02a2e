"""TrainConfig: every knob of a training run in one typed dataclass.

A run's config is the dataclass defaults, then a YAML/TOML file, then `key=value`
overrides from the command line (in that order). Unknown keys are an error that lists
the valid ones, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def knob(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A TrainConfig field; `help` is its --option's help text in the `qkv` commands."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- model (pretraining; later stages pass their own model) ---
    preset: str = knob("tiny", "a qkv.config preset; vocab_size comes from the tokenizer")
    model: dict = knob(default_factory=dict, help='ModelConfig overrides, e.g. {"n_layer": 2}')
    init_from: str | None = knob(None, "start from a qkv checkpoint dir instead of random init")
    # --- data (pretraining) ---
    data_dir: str = knob("data/shakespeare", "output of `qkv prepare`")
    seq_len: int = knob(128, "tokens per training window (<= model max_seq_len)")
    # --- batch ---
    batch_size: int = knob(16, "sequences per optimizer step, over all processes and micro-steps")
    grad_accum: int = knob(1, "micro-steps per optimizer step")
    # --- optimizer ---
    optimizer: str = knob("adamw", "adamw | muon (Muon on hidden matrices, AdamW at lr on the rest); docs/training.md")
    lr: float = knob(3e-3, "peak learning rate, reached at the end of warmup")
    min_lr_ratio: float = knob(0.1, "final lr = lr * min_lr_ratio")
    schedule: str = knob("cosine", "cosine | wsd | constant (all after linear warmup)")
    warmup_steps: int = knob(20, "steps of linear warmup to lr")
    decay_frac: float = knob(0.2, "wsd: fraction of steps spent decaying at the end")
    weight_decay: float = knob(0.1, "AdamW weight decay; not applied to norms, biases, embeddings")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    eps: float = knob(1e-8, "AdamW epsilon")
    muon_lr: float = knob(0.02, "optimizer=muon: peak lr of the Muon matrices (scaled by sqrt(max(1, fan_out/fan_in)))")
    muon_momentum: float = knob(0.95, "optimizer=muon: momentum of the Muon matrices")
    muon_nesterov: bool = knob(True, "optimizer=muon: Nesterov momentum")
    muon_weight_decay: float = knob(0.0, "optimizer=muon: decoupled weight decay of the Muon matrices")
    muon_ns_steps: int = knob(5, "optimizer=muon: Newton-Schulz iterations per update")
    # --- LoRA (fine-tuning stages; docs/training.md) ---
    lora_r: int = knob(0, "LoRA rank; > 0 trains low-rank adapters on a frozen base instead of every weight")
    lora_alpha: float = knob(32.0, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = knob(0.0, "dropout on the adapters' input")
    lora_targets: str = knob(
        "q_proj,v_proj", "layers that get adapters: leaf names (q_proj,v_proj), all-linear, or a regex over qkv names"
    )
    grad_clip: float = knob(1.0, "max global grad norm; 0 disables")
    # --- loop ---
    max_steps: int = knob(300, "optimizer steps to train for")
    dtype: str = knob("fp32", "fp32 | bf16 (autocast; weights and optimizer stay fp32)")
    compile: bool = knob(False, "torch.compile the model")
    seed: int = knob(1337, "seed of the initial weights, the data order and dropout")
    eval_every: int = knob(100, "steps between evals; 0 disables periodic eval (a final eval still runs)")
    eval_steps: int = knob(8, "batches per eval")
    log_every: int = knob(10, "steps between logged metric lines")
    # --- checkpoints ---
    out_dir: str = knob("runs/train", "run directory: checkpoints, metrics, config")
    save_every: int = knob(100, "steps between checkpoints; 0: save only at the end")
    keep_last: int = knob(2, "step checkpoints kept")
    save_optimizer: str = knob(
        "last", "optimizer state in step checkpoints: last (the newest only, what --resume needs) | all | never"
    )
    # --- system ---
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    threads: int = knob(0, "torch CPU threads; 0 keeps torch's default")
    parallel: str = knob("ddp", "under torchrun: ddp | fsdp (FSDP2 fully_shard)")
    progress: bool = knob(True, "tqdm progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (
                self.schedule in ("cosine", "wsd", "constant"),
                f"schedule={self.schedule!r}: choose cosine, wsd or constant",
            ),
            (self.dtype in ("fp32", "bf16"), f"dtype={self.dtype!r}: choose fp32 or bf16"),
            (self.optimizer in ("adamw", "muon"), f"optimizer={self.optimizer!r}: choose adamw or muon"),
            (self.parallel in ("ddp", "fsdp"), f"parallel={self.parallel!r}: choose ddp or fsdp"),
            (
                self.save_optimizer in ("last", "all", "never"),
                f"save_optimizer={self.save_optimizer!r}: choose last, all or never",
            ),
            (self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (
                self.batch_size % self.grad_accum == 0,
                f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}",
            ),
            (self.seq_len >= 1, f"seq_len={self.seq_len} must be >= 1"),
            (self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1"),
            (0 <= self.decay_frac <= 1, f"decay_frac={self.decay_frac} must be in [0, 1]"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.lora_r >= 0, f"lora_r={self.lora_r} must be >= 0 (0: full fine-tuning)"),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad train config: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown train config key(s) {unknown}; valid keys: {', '.join(known)}")
        return cls(**d)

    def replace(self, **kw: Any) -> TrainConfig:
        d = self.to_dict()
        d.update(kw)
        return TrainConfig.from_dict(d)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    elif path.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        raise ValueError(f"{path}: config files must end in .yaml, .yml, .toml or .json")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the config must be a mapping of key: value")
    return d


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' with value parsed as YAML (numbers, bools, lists, dicts); 'model.n_layer=2'
    sets one model override."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
    import yaml

    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), raw if value is None and raw != "" else value


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None, base: TrainConfig | None = None
) -> TrainConfig:
    """Defaults (or `base`) <- config file <- overrides ('key=value' strings or a dict)."""
    d = (base or TrainConfig()).to_dict()
    layers = [read_config_file(path)] if path else []
    if isinstance(overrides, dict):
        layers.append(overrides)
    elif overrides:
        layers.append(dict(parse_override(o) for o in overrides))
    for layer in layers:
        for key, value in layer.items():
            if key.startswith("model."):
                d["model"] = {**d["model"], key[len("model.") :]: value}
            elif key == "model" and isinstance(value, dict):
                d["model"] = {**d["model"], **value}
            else:
                d[key] = value
    return TrainConfig.from_dict(d)


def save_config(cfg: TrainConfig, path: Path) -> None:
    from qkv.io import atomic_write_text

    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
