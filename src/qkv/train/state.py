"""Trainer checkpoints: everything needed to continue a run bit for bit, never pickled.

    out_dir/step_000100/            a complete qkv checkpoint (load_model works on it)
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        trainer/optimizer.safetensors   AdamW moments and step counts (Muon: momentum), keyed by
                                        parameter name (save_optimizer: "last" keeps it in the newest
                                        checkpoint only, the one --resume reads; "all" in every one; "never")
        trainer/state.json              step, data position, RNG states, param groups, run config
    out_dir/step_000100/            of a LoRA run: the adapter instead of the model (PEFT's format,
        adapter_config.json  adapter_model.safetensors  tokenizer files  trainer/...)
    out_dir/latest.json             {"step": 100, "dir": "step_000100"}
    out_dir/run.lock                held (flock) by the run writing out_dir; a second run is refused

A checkpoint is written into a temporary directory and renamed into place, and
latest.json is replaced only afterwards, so a kill at any moment leaves the previous
checkpoint whole. Full (unsharded) state dicts are gathered through
torch.distributed.checkpoint.state_dict, so the same files come out of one process, DDP
or FSDP; every rank calls save (the gathers are collective), rank 0 writes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from qkv.checkpoint import CONFIG, WEIGHTS
from qkv.io import atomic_write_bytes, atomic_write_text
from qkv.wrappers import unwrap

LATEST = "latest.json"
RUN_LOCK = "run.lock"  # held by the run writing this out_dir
TRAINER = "trainer"
OPTIMIZER = "optimizer.safetensors"
CPU = torch.device("cpu")


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(unwrap(model), options=_sd_options(cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(unwrap(model), _optimizers(opt), options=_sd_options(cpu_offload=True))
    if "state" not in sd:  # ranks other than 0 get nothing with cpu_offload: they do not write
        return {}, []
    tensors = {f"{name}/{key}": t.detach().contiguous() for name, st in sd["state"].items() for key, t in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _rng_state(device: torch.device) -> dict[str, str]:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def _set_rng_state(states: dict[str, str], device: torch.device) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["torch"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(tensor(states["cuda"]), device)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    run_config: dict,
    is_main: bool,
    tokenizer=None,
    extra: dict | None = None,
    keep_last: int = 2,
    device: torch.device = CPU,
    save_optimizer: str = "all",
) -> Path | None:
    """Write out_dir/step_XXXXXX (atomic) and point latest.json at it; prune old ones. The
    optimizer state (twice the weights' bytes under AdamW) is written unless save_optimizer is
    "never", and with "last" removed from the older checkpoints once latest.json names this one."""
    from qkv import lora

    adapter = lora.has_lora(unwrap(model))
    model_sd = {} if adapter else full_model_state(model)  # collective under FSDP: every rank calls
    with_opt = save_optimizer != "never"
    opt_tensors, groups = full_optimizer_state(model, opt) if with_opt else ({}, [])
    if not is_main:
        return None
    out_dir = Path(out_dir)
    name = f"step_{step:06d}"
    final = out_dir / name
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / TRAINER).mkdir(parents=True)
    if adapter:  # the frozen base is not the run's to save: only the adapter's tensors
        inner = unwrap(model)
        for fname, data in lora.adapter_files(inner, base_model=getattr(inner, "lora_base_model", None)).items():
            atomic_write_bytes(tmp / fname, data)
    else:
        unwrap(model).cfg.save(tmp / CONFIG)
        atomic_write_bytes(tmp / WEIGHTS, save(model_sd, metadata={"format": "qkv", "step": str(step)}))
    if tokenizer is not None:
        tokenizer.save(tmp)
    if with_opt:
        atomic_write_bytes(tmp / TRAINER / OPTIMIZER, save(opt_tensors))
    state = {
        "step": step,  # optimizer steps completed; the data loader resumes at this step
        "optimizer": with_opt,
        "param_groups": groups,
        "rng": _rng_state(device),
        "run_config": run_config,
        "extra": extra or {},
    }
    atomic_write_text(tmp / TRAINER / "state.json", json.dumps(state, indent=1) + "\n")
    if final.exists():  # re-saving the same step: move the old one aside first
        old = out_dir / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    atomic_write_text(out_dir / LATEST, json.dumps({"step": step, "dir": name}) + "\n")
    prune_checkpoints(out_dir, keep_last, latest=name)
    if save_optimizer == "last":  # only latest.json's checkpoint is ever resumed from
        for p in out_dir.glob(f"step_*/{TRAINER}/{OPTIMIZER}"):
            if p.parent.parent.name != name:
                p.unlink(missing_ok=True)
    return final


def prune_checkpoints(out_dir: Path, keep_last: int, latest: str) -> None:
    """Remove all but the `keep_last` highest-numbered step dirs, ordered by number (names
    outgrow their zero padding after step 999999), never the one latest.json names."""
    steps = sorted(
        (int(m[1]), p)
        for p in out_dir.iterdir()
        if (m := re.fullmatch(r"step_(\d+)", p.name)) is not None and p.is_dir()
    )
    for _, p in steps[:-keep_last]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on out_dir for one run: a second run there would write the same
    step dirs and prune the first one's checkpoints. The lock goes with the process, so a
    killed run never leaves the directory locked."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not guarded
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise RuntimeError(
                f"{out_dir} is in use by another run{f' (process {holder})' if holder else ''}: "
                "wait for it to finish or choose another out_dir"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def latest_checkpoint(out_dir: Path) -> Path | None:
    path = Path(out_dir) / LATEST
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        ckpt = Path(out_dir) / info["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt ({e}); delete it to start over or fix it to name a step_* dir") from None
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{path} points to {ckpt}, which does not exist; delete {path} to start over")
    return ckpt


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer tensors, state.json) of a step dir, with one-line errors."""

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; the checkpoint {ckpt} is incomplete, cannot resume")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{path}: corrupt or truncated ({str(e).splitlines()[0]}); cannot resume from {ckpt}"
            ) from None

    state_path = ckpt / TRAINER / "state.json"
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path}: missing; the checkpoint {ckpt} is incomplete, cannot resume")
    try:
        state = json.loads(state_path.read_text())
        int(state["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{state_path}: corrupt ({e}); cannot resume from {ckpt}") from None
    if state.get("optimizer", True) is False:
        raise ValueError(
            f"{ckpt}: saved without optimizer state (save_optimizer=never), so the run cannot be resumed "
            f"exactly; start a new run from these weights instead (--init-from / --model {ckpt})"
        )
    if (ckpt / WEIGHTS).exists() or not (ckpt / "adapter_config.json").exists():
        model_sd = tensors(ckpt / WEIGHTS)
    else:  # a LoRA run's checkpoint: the adapter, by qkv names
        from qkv.lora import read_adapter

        model_sd = read_adapter(ckpt)[1]
    opt = tensors(ckpt / TRAINER / OPTIMIZER)
    return model_sd, opt, state


def disk_usage(out_dir: Path) -> dict[str, int]:
    """Bytes a run directory takes on disk, each file counted once however many hard links
    name it: total, model weights (*.safetensors outside trainer/) and optimizer state."""
    seen: set[tuple[int, int]] = set()
    usage = {"total": 0, "weights": 0, "optimizer": 0}
    for p in sorted(Path(out_dir).rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        st = p.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        usage["total"] += st.st_size
        if p.name == OPTIMIZER:
            usage["optimizer"] += st.st_size
        elif p.suffix == ".safetensors":
            usage["weights"] += st.st_size
    return usage


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link: no second copy on disk), replaced
    atomically; a copy where the file system has no hard links."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_model_state(model: torch.nn.Module, model_sd: dict[str, torch.Tensor], source: Path) -> None:
    from qkv import lora
    from qkv.checkpoint import load_state_into

    if lora.has_lora(unwrap(model)):
        if (source / WEIGHTS).exists():
            raise ValueError(
                f"{source}: a full-model checkpoint, but this run trains a LoRA adapter; resume without --lora-r"
            )
        lora.load_adapter_state(unwrap(model), model_sd)
        return
    if "adapter_config.json" in {p.name for p in source.iterdir()}:
        raise ValueError(f"{source}: a LoRA run's checkpoint; resume it with the same --lora-* options")
    load_state_into(unwrap(model), model_sd, source)


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, opt_tensors: dict, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in opt_tensors.items():
        name, field = key.rsplit("/", 1)
        per_param.setdefault(name, {})[field] = t
    groups = state["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_optimizer_state_dict(
        unwrap(model), _optimizers(opt), {"state": per_param, "param_groups": groups}, options=_sd_options()
    )


def _optimizers(opt):
    """The torch optimizer(s) behind `opt` (optim.Optimizers holds several, e.g. Muon + AdamW)."""
    return getattr(opt, "optimizers", opt)


def restore_rng(state: dict, device: torch.device) -> None:
    _set_rng_state(state["rng"], device)
