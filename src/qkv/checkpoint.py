"""qkv checkpoint directories: config.json + model.safetensors (+ tokenizer files).

Weights are only ever read from safetensors, which cannot run code. Every file is
written atomically (temp file + rename). Loading checks names and shapes against the
config and reports the file and the problem in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from qkv.config import ModelConfig
from qkv.io import atomic_write_bytes
from qkv.model import Transformer, build_model
from qkv.wrappers import unwrap

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # the inner model's names (no wrapper prefix); state_dict() already leaves out non-persistent buffers
    return {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}


def save_model(directory: str | Path, model: Transformer, tokenizer=None, metadata: dict | None = None) -> Path:
    return write_model_files(directory, unwrap(model).cfg, state_dict_for_save(model), tokenizer, metadata)


def write_model_files(
    directory: str | Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer=None,
    metadata: dict | None = None,
) -> Path:
    """Weights, then tokenizer files, then config.json: the config is what makes a directory a
    checkpoint, so a crash part way leaves the previous config beside the previous weights (or
    no checkpoint at all), never a new config describing old weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "qkv"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(directory / WEIGHTS, save(state, metadata=meta))
    if tokenizer is not None:
        tokenizer.save(directory)
    cfg.save(directory / CONFIG)
    return directory


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_state_into(model: Transformer, state: dict[str, torch.Tensor], source: Path) -> None:
    check_state(model, state, source)
    model.load_state_dict(state, strict=True)


def check_state(model: Transformer, state: dict[str, torch.Tensor], source: Path) -> None:
    """Names and shapes of `state` match `model`'s; `model` may live on the meta device, so a
    config that disagrees with its weights (a hostile one asking for terabytes) is refused
    before anything of the config's size is allocated."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(
                f"{source}: shape mismatch for {name}: file has {tuple(t.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )


def is_qkv_checkpoint(directory: str | Path) -> bool:
    cfg = Path(directory) / CONFIG
    if not cfg.exists():
        return False
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return "model_type" not in d and "d_model" in d


def load_model(directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    cfg = ModelConfig.load(directory / CONFIG)
    state = read_safetensors(directory / WEIGHTS)
    check_state(build_model(cfg, device="meta"), state, directory / WEIGHTS)  # before allocating the config's size
    model = build_model(cfg)  # real storage; init cost is small next to reading weights
    load_state_into(model, state, directory / WEIGHTS)
    return model.to(device=device, dtype=dtype).eval()
