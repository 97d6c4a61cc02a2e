"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update,

    y = base(x) + (alpha / r) * B(A(dropout(x)))        A: (r, in), B: (out, r), B = 0 at init

installed behind the model's own projections by swapping modules (`add_lora`), as the
inference side swaps in its kernels: the model package never knows. The base may be an
nn.Linear or a QuantLinear (QLoRA: the base stays in its GGUF blocks, frozen; the adapter
is fp32). One LoraLinear can hold several named adapters (serving), all sharing one
`LoraRouting` per model that says which apply:

- `active`: the adapters every row gets (training: the one being trained);
- `rows`: set by the engine for one step, one adapter name (or None: the base alone) per
  batch row, so base and adapter requests run in the same forward;
- `disabled`: the base model alone (DPO's, GRPO's and PPO's reference: no second copy).

Names follow PEFT's (base_layer, lora_A.<adapter>, lora_B.<adapter>) so its state-dict keys
map one to one (peft_format.py).

A head trained beside the adapters (PPO's value head) is marked with `train_head`: it stays
trainable, and the adapter's checkpoints save and resume it (PEFT calls such modules
`modules_to_save`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from qkv.quant.modules import QuantLinear

DEFAULT = "default"
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # comma-separated leaf names ("q_proj,v_proj"), "all-linear", or a regex matched in full
    # against qkv module names ("blocks\\.[0-3]\\.attn\\.(q|v)_proj")
    targets: str = "q_proj,v_proj"
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r={self.r} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class LoraRouting:
    """Which adapters a model's LoraLinears apply; one object shared by all of them."""

    active: tuple[str, ...] = (DEFAULT,)
    rows: list[str | None] | None = None
    disabled: bool = False


class LoraLinear(nn.Module):
    """base_layer(x) plus the low-rank updates the shared routing selects."""

    def __init__(self, base_layer: nn.Module, routing: LoraRouting):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoraConfig] = {}  # per adapter, for its adapter_config.json
        self.routing = routing

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        device = next(self.base_layer.buffers(), None)
        device = device.device if device is not None else next(self.base_layer.parameters()).device
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=device)
        b = nn.Linear(cfg.r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT's default: A random, B zero
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        self.configs[name] = cfg

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(dropout(x))) of adapter `name`, computed in the adapter's dtype."""
        a = self.lora_A[name]
        h = self.lora_dropout[name](x.to(a.weight.dtype))
        return self.lora_B[name](a(h)) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        r = self.routing
        if r.disabled:
            return y
        if r.rows is not None:  # one adapter (or none) per batch row, set by the engine for a step
            for name in sorted({n for n in r.rows if n is not None and n in self.lora_A}):
                idx = torch.tensor([i for i, n in enumerate(r.rows) if n == name], device=x.device)
                y = y.index_add(0, idx, self.delta(name, x.index_select(0, idx)).to(y.dtype))
            return y
        for name in r.active:
            if name in self.lora_A:
                y = y + self.delta(name, x).to(y.dtype)
        return y

    def merged_weight(self, name: str = DEFAULT) -> torch.Tensor:
        """The fp32 weight with adapter `name` folded in: W + scaling * B @ A."""
        base = self.base_layer
        w = base.dequantized_weight() if isinstance(base, QuantLinear) else base.weight.detach().float()
        return w + self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, scaling={self.scaling}"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def routing_of(model: nn.Module) -> LoraRouting | None:
    return next((m.routing for m in model.modules() if isinstance(m, LoraLinear)), None)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for m in lora_layers(model).values():
        names.update(dict.fromkeys(m.lora_A))
    return list(names)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantLinear))


def match_targets(model: nn.Module, targets: str) -> list[str]:
    """Qualified names of the linear layers inside the blocks that `targets` selects (the
    output head is read as a matrix by the loss, so it is never a target)."""
    spec = targets.strip()
    candidates = [
        n for n, m in model.named_modules() if n.startswith("blocks.") and (_is_linear(m) or isinstance(m, LoraLinear))
    ]
    candidates = [n for n in candidates if ".lora_" not in n and not n.endswith(".base_layer")]
    if spec == ALL_LINEAR:
        chosen = candidates
    elif re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", spec):
        leaves = {t.strip() for t in spec.split(",")}
        chosen = [n for n in candidates if n.rsplit(".", 1)[-1] in leaves or n in leaves]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"lora targets {spec!r}: not a name list nor a valid regex ({e})") from None
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"lora targets {spec!r} match no linear layer of this model; use leaf names from {leaves}, "
            f"{ALL_LINEAR!r}, or a regex over names like {candidates[0] if candidates else 'blocks.0.attn.q_proj'!r}"
        )
    return chosen


def add_lora(model: nn.Module, cfg: LoraConfig, name: str = DEFAULT, trainable: bool = True) -> list[str]:
    """Install adapter `name` on the layers cfg.targets selects (in place) and freeze
    everything but it (when trainable). Returns the qualified names of the adapted layers."""
    chosen = match_targets(model, cfg.targets)
    routing = routing_of(model) or LoraRouting(active=(name,))
    for qual in chosen:
        parent_name, _, attr = qual.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer, routing)
            setattr(parent, attr, layer)
        if name in layer.lora_A:
            raise ValueError(f"{qual} already has an adapter named {name!r}; pick another name")
        layer.add_adapter(name, cfg)
    if trainable:
        for pname, p in model.named_parameters():
            p.requires_grad_(f".lora_A.{name}." in pname or f".lora_B.{name}." in pname)
    return chosen


def adapter_state(model: nn.Module, name: str = DEFAULT) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors by qkv name: '<layer>.lora_A.weight' / '<layer>.lora_B.weight'."""
    out = {}
    for qual, m in lora_layers(model).items():
        if name in m.lora_A:
            out[f"{qual}.lora_A.weight"] = m.lora_A[name].weight.detach()
            out[f"{qual}.lora_B.weight"] = m.lora_B[name].weight.detach()
    return out


def train_head(model: nn.Module, head: str) -> None:
    """Train submodule `head` (e.g. "value_head") beside the adapters: its parameters get
    gradients, and head_state puts it into the adapter's checkpoints."""
    model.get_submodule(head).requires_grad_(True)
    model.lora_heads = tuple(sorted({*getattr(model, "lora_heads", ()), head}))


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the heads train_head marked, by qkv name ('value_head.weight', ...)."""
    return {
        f"{head}.{k}": v.detach()
        for head in getattr(model, "lora_heads", ())
        for k, v in model.get_submodule(head).state_dict().items()
    }


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], name: str = DEFAULT) -> None:
    """Copy `state` (adapter_state's keys, plus head_state's when the model trains heads) into
    adapter `name` and the heads; every tensor must land."""
    layers = lora_layers(model)
    heads = head_state(model)
    expected = set(adapter_state(model, name)) | set(heads)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not fit the installed adapter {name!r}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; install it with the same targets and rank (and the same trained heads)"
        )
    with torch.no_grad():
        for key, t in state.items():
            if key in heads:
                w = heads[key]  # head_state's tensors share the parameters' storage
            else:
                qual, which, _ = key.rsplit(".", 2)
                w = getattr(layers[qual], which)[name].weight
            if w.shape != t.shape:
                raise ValueError(f"{key}: shape {tuple(t.shape)} does not fit the adapter's {tuple(w.shape)}")
            w.copy_(t)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block (the frozen reference of DPO, GRPO and PPO)."""
    routing = routing_of(model)
    if routing is None:
        yield
        return
    was, routing.disabled = routing.disabled, True
    try:
        yield
    finally:
        routing.disabled = was


@contextmanager
def adapter_rows(model: nn.Module, rows: list[str | None]) -> Iterator[None]:
    """Each batch row applies its own adapter (None: the base) inside the block. A no-op for a
    model without adapters, and when no row names one: then the active adapters apply to every
    row as usual (a LoRA policy's own rollouts during training)."""
    if all(r is None for r in rows):  # checked first: finding the routing walks every module
        yield
        return
    routing = routing_of(model)
    if routing is None:
        yield
        return
    was, routing.rows = routing.rows, list(rows)
    try:
        yield
    finally:
        routing.rows = was


class BaseView:
    """The model with its adapters off, as a stand-in reference model: calls run under
    adapters_disabled; eval()/train() leave the shared model's mode alone."""

    def __init__(self, model: nn.Module):
        object.__setattr__(self, "_model", model)

    training = False

    def eval(self) -> BaseView:
        return self

    def train(self, mode: bool = True) -> BaseView:
        return self

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self._model):
            return self._model(*args, **kwargs)

    def __getattr__(self, attr: str):
        value = getattr(self._model, attr)
        if callable(value) and not isinstance(value, nn.Module) and attr not in ("parameters", "named_parameters"):

            def wrapped(*args, **kwargs):
                with adapters_disabled(self._model):
                    return value(*args, **kwargs)

            return wrapped
        return value


def merge_lora(model: nn.Module, name: str = DEFAULT) -> nn.Module:
    """Fold adapter `name` into the weights and remove every adapter (in place): each adapted
    layer becomes a plain fp32 nn.Linear (a quantized base is dequantized first). Returns the model."""
    for qual, m in lora_layers(model).items():
        if name not in m.lora_A:
            raise ValueError(f"{qual} has no adapter named {name!r} (it has {list(m.lora_A)})")
        base = m.base_layer
        bias = base.bias
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=m.lora_A[name].weight.device)
        with torch.no_grad():
            lin.weight.copy_(m.merged_weight(name))
            if bias is not None:
                lin.bias.copy_(bias.detach().float())
        parent_name, _, attr = qual.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
