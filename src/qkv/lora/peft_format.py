"""Adapters on disk in PEFT's format, so `peft` and qkv read each other's:

    adapter_config.json          peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors    base_model.model.<transformers module>.lora_A.weight  (r, in)
                                 base_model.model.<transformers module>.lora_B.weight  (out, r)

    adapter_heads.safetensors    heads trained beside the adapter (PPO's value head), by qkv
                                 name (value_head.weight, value_head.bias); only when there are any

The module names are those of the transformers model `qkv convert --to hf` writes
(model.layers.{i}.self_attn.q_proj, model.layers.{i}.mlp.down_proj, ...), so PeftModel loads a
qkv adapter onto that export. GPT-2's export fuses q/k/v into one Conv1D (c_attn), which has no
per-projection adapter, so GPT-2-architecture adapters are not written in this format.

The heads live in their own file rather than in PEFT's `modules_to_save`: PEFT would then
look for a `value_head` module on the transformers model it loads the adapter onto, which a
causal LM does not have, so the policy's adapter would stop loading in peft. Beside the
adapter, the head is what resuming the run needs and what peft ignores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from qkv.lora.layer import (
    DEFAULT,
    LoraConfig,
    adapter_state,
    add_lora,
    head_state,
    load_adapter_state,
    lora_layers,
    match_targets,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_HEADS = "adapter_heads.safetensors"
PREFIX = "base_model.model."
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _arch(model: nn.Module) -> str:
    from qkv.interop.hf import pick_arch

    return pick_arch(model.cfg)


def to_peft_name(qual: str, arch: str) -> str:
    """qkv module name -> the transformers export's module name."""
    m = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(\w+)", qual)
    ok = m is not None and arch != "gpt2" and m[3] in (_ATTN if m[2] == "attn" else _MLP)
    if not ok:
        raise ValueError(
            f"{qual}: no PEFT module name for it in the {arch} export (PEFT adapters cover the separate "
            f"q/k/v/o and gate/up/down projections of llama, mistral, qwen2, mixtral attention and gemma3)"
        )
    assert m is not None
    return f"model.layers.{m[1]}.{'self_attn' if m[2] == 'attn' else 'mlp'}.{m[3]}"


def from_peft_name(name: str) -> str:
    """The transformers export's module name -> qkv's."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", name)
    if m is None or m[3] not in (_ATTN if m[2] == "self_attn" else _MLP):
        raise ValueError(f"{name}: a PEFT adapter on a module qkv has no LoRA layer for (only q/k/v/o, gate/up/down)")
    return f"blocks.{m[1]}.{'attn' if m[2] == 'self_attn' else 'mlp'}.{m[3]}"


def adapter_config(model: nn.Module, name: str = DEFAULT, base_model: str | None = None) -> dict:
    layers = {q: m for q, m in lora_layers(model).items() if name in m.lora_A}
    if not layers:
        raise ValueError(f"the model has no adapter named {name!r}; nothing to save")
    cfg: LoraConfig = next(iter(layers.values())).configs[name]
    arch = _arch(model)
    hf_names = sorted(to_peft_name(q, arch) for q in layers)
    leaves = sorted({q.rsplit(".", 1)[-1] for q in layers})
    # leaf names when they select exactly these layers (PEFT's usual form), else the full names
    every = set(match_targets(model, ",".join(leaves)))
    targets = leaves if every == set(layers) else hf_names
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }


def adapter_files(model: nn.Module, name: str = DEFAULT, base_model: str | None = None) -> dict[str, bytes]:
    """{file name: bytes} of adapter `name` in PEFT's format (fp32 tensors, PEFT key names)."""
    from safetensors.torch import save

    arch = _arch(model)
    tensors = {}
    for key, t in adapter_state(model, name).items():
        qual, which, _ = key.rsplit(".", 2)
        tensors[f"{PREFIX}{to_peft_name(qual, arch)}.{which}.weight"] = t.float().contiguous().cpu()
    config = json.dumps(adapter_config(model, name, base_model), indent=2) + "\n"
    files = {ADAPTER_CONFIG: config.encode(), ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"})}
    heads = {k: t.float().contiguous().cpu() for k, t in head_state(model).items()}
    if heads:
        files[ADAPTER_HEADS] = save(heads, metadata={"format": "qkv"})
    return files


def save_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT, base_model: str | None = None) -> Path:
    """Write adapter `name` as a PEFT adapter directory (atomic files; the config last)."""
    from qkv.io import atomic_write_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = adapter_files(model, name, base_model)
    if ADAPTER_HEADS in files:
        atomic_write_bytes(directory / ADAPTER_HEADS, files[ADAPTER_HEADS])
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, files[ADAPTER_WEIGHTS])
    atomic_write_bytes(directory / ADAPTER_CONFIG, files[ADAPTER_CONFIG])
    return directory


def read_adapter(directory: str | Path, heads: bool = True) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig whose targets are exactly the adapted layers, tensors by qkv name) of a PEFT
    LoRA directory, plus the trained heads' tensors when `heads` and the directory has them
    (what resuming a run needs); a one-line error for what qkv does not implement."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no {ADAPTER_CONFIG}; give an adapter directory (what PEFT's save_pretrained writes)"
        )
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    unsupported = [
        (c.get("peft_type", "LORA") != "LORA", f"peft_type {c.get('peft_type')!r} (only LORA)"),
        (bool(c.get("use_dora")), "use_dora"),
        (c.get("bias", "none") != "none", f"bias={c.get('bias')!r}"),
        (bool(c.get("lora_bias")), "lora_bias"),
        (bool(c.get("fan_in_fan_out")), "fan_in_fan_out (GPT-2's Conv1D)"),
        (bool(c.get("modules_to_save")), "modules_to_save"),
        (bool(c.get("rank_pattern")) or bool(c.get("alpha_pattern")), "rank_pattern / alpha_pattern"),
    ]
    bad = [what for cond, what in unsupported if cond]
    if bad:
        raise ValueError(f"{path}: qkv's LoRA does not implement {', '.join(bad)}; merge it with peft instead")
    wpath = directory / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: missing (a .bin adapter is pickled and never read; save it as safetensors)")
    state = {}
    for key, t in load_file(str(wpath)).items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)(?:\.\w+)?\.weight", key)
        if m is None:
            raise ValueError(f"{wpath}: unexpected tensor {key!r} (expected ...lora_A.weight / ...lora_B.weight)")
        state[f"{from_peft_name(m[1])}.{m[2]}.weight"] = t.float()
    quals = sorted({k.rsplit(".", 2)[0] for k in state})
    if not quals:
        raise ValueError(f"{wpath}: holds no LoRA tensors")
    r = int(c.get("r") or state[f"{quals[0]}.lora_A.weight"].shape[0])
    cfg = LoraConfig(
        r=r,
        alpha=float(c.get("lora_alpha", r)),
        dropout=float(c.get("lora_dropout") or 0.0),
        targets="|".join(re.escape(q) for q in quals),
        rslora=bool(c.get("use_rslora")),
    )
    if heads and (directory / ADAPTER_HEADS).is_file():
        state.update(load_file(str(directory / ADAPTER_HEADS)))
    return cfg, state


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT, trainable: bool = False) -> LoraConfig:
    """Install the PEFT adapter in `directory` on `model` as adapter `name` (in place)."""
    cfg, state = read_adapter(directory, heads=False)  # the policy's adapter; a trained head is the run's
    add_lora(model, cfg, name, trainable=trainable)
    load_adapter_state(model, state, name)
    return cfg


def load_serving_adapters(model: nn.Module, specs: list[str]) -> list[str]:
    """Install each 'name=path' PEFT adapter on `model` for per-request serving (frozen; no
    adapter applies unless a request names it). Returns the names."""
    from qkv.lora.layer import routing_of

    names = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path or not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(f"--lora {spec!r}: write it as NAME=PATH (NAME of letters, digits, '_', '-', '.')")
        if name in names:
            raise ValueError(f"--lora {spec!r}: the name {name!r} is given twice; give each adapter its own")
        load_adapter(model, path, name)
        names.append(name)
    routing = routing_of(model)
    if routing is not None:
        routing.active = ()  # the base unless a request (the engine's per-row routing) says otherwise
    return names
