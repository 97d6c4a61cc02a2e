"""Model configuration: one typed dataclass for every architecture qkv builds or imports.

A config fully determines the module tree and the math. Architectural ablations are a
single field: `pos` (rope/learned/sinusoidal/none), `n_kv_head` (MHA/GQA/MQA),
`mlp` (swiglu/geglu/gelu/none = attention-only), `norm` (rmsnorm/layernorm), `n_expert` (dense/MoE).
Gemma-style options (interleaved local/global layers, sandwich norms, soft-capping, ...) are
fields too, each off by default, so any model can use them.
Named presets live at the bottom; `ModelConfig.from_dict` rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PosKind = Literal["rope", "learned", "sinusoidal", "none"]
LayerType = Literal["global", "local"]


MAX_CONTEXT = 2**24  # positions; larger contexts allocate position tables no machine holds

# (lowest, highest) for each size; far above any real model, far below what exhausts memory
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**24),
    "n_layer": (1, 2**12),
    "d_model": (1, 2**17),
    "n_head": (1, 2**12),
    "n_kv_head": (0, 2**12),
    "head_dim": (0, 2**12),
    "d_ff": (0, 2**20),
    "max_seq_len": (1, MAX_CONTEXT),
    "n_expert": (0, 2**12),
    "moe_d_ff": (0, 2**20),
}


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    # the next three are derived when left at 0 (or given as None), and always set after __post_init__
    n_kv_head: int = 0  # 0 -> n_head (MHA); 1 -> MQA; otherwise GQA
    head_dim: int = 0  # 0 -> d_model // n_head
    d_ff: int = 0  # 0 -> 4*d (gelu) or the Llama 8/3*d rule rounded to 64 (swiglu)
    max_seq_len: int = 1024

    # positions
    pos: PosKind = "rope"
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f} or
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None

    # blocks
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    # swiglu: down(silu(gate) * up); geglu: down(gelu(gate) * up) (Gemma); gelu: down(gelu(up));
    # none: attention-only blocks (interpretability toys)
    mlp: Literal["swiglu", "geglu", "gelu", "none"] = "swiglu"
    gelu_approx: Literal["none", "tanh"] = "tanh"  # gelu and geglu
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    sliding_window: int | None = None
    attn_impl: Literal["sdpa", "math"] = "sdpa"

    # options Gemma introduced, usable by any model; each default leaves a Llama unchanged
    # per layer "local" (sees the last sliding_window keys) or "global" (sees all keys);
    # None: every layer local when sliding_window is set (Mistral), else global
    layer_types: list[LayerType] | None = None
    rope_local_theta: float | None = None  # RoPE base of local layers, unscaled; None: as global layers
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): Gemma stores weight - 1
    post_norm: bool = False  # also normalise each sub-block's output before the residual add
    embed_scale: float = 1.0  # token embeddings times this (Gemma: sqrt(d_model), in the embedding dtype)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None: head_dim
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)

    # mixture of experts (n_expert == 0 means a dense MLP)
    n_expert: int = 0
    n_expert_per_token: int = 2
    moe_renormalize: bool = True  # Mixtral renormalises the top-k weights, OLMoE does not
    moe_d_ff: int = 0  # 0 -> d_ff
    moe_dispatch: Literal["grouped_mm", "loop"] = "grouped_mm"
    router_aux_coef: float = 0.01
    router_z_coef: float = 0.001

    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._check_sizes()
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if not self.head_dim:
            if self.d_model % self.n_head:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "set head_dim explicitly or change one of them"
                )
            self.head_dim = self.d_model // self.n_head
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
        if not self.d_ff:
            if self.mlp == "gelu":
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        if self.n_expert and not self.moe_d_ff:
            self.moe_d_ff = self.d_ff
        self.validate()

    def _check_sizes(self) -> None:
        """Every size is a whole number in a sane range: a hostile or broken config.json or GGUF
        must give this one line, not a ZeroDivisionError or a buffer of 2^34 positions."""
        for name, (lo, hi) in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is None and lo == 0:  # None means derived, as 0 does
                value = 0
            try:
                whole = operator.index(value)  # ints and numpy ints; not floats, strings or None
            except TypeError:
                whole = None
            if isinstance(value, bool) or whole is None or not lo <= whole <= hi:
                derived = " (0: derived)" if lo == 0 else ""
                raise ValueError(f"{name}={value!r} is out of range: must be a whole number in [{lo}, {hi}]{derived}")
            setattr(self, name, whole)

    def validate(self) -> None:
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                "(each KV head serves a whole group of query heads)"
            )
        if self.pos not in ("rope", "learned", "sinusoidal", "none"):
            raise ValueError(f"unknown pos={self.pos!r}; choose rope, learned, sinusoidal or none")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"unknown norm={self.norm!r}; choose rmsnorm or layernorm")
        if self.mlp not in ("swiglu", "geglu", "gelu", "none"):
            raise ValueError(f"unknown mlp={self.mlp!r}; choose swiglu, geglu, gelu or none")
        if self.mlp == "none" and self.n_expert:
            raise ValueError("mlp='none' (attention-only) cannot be combined with n_expert > 0; drop one of them")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"unknown attn_impl={self.attn_impl!r}; choose sdpa or math")
        if self.n_expert and not (1 <= self.n_expert_per_token <= self.n_expert):
            raise ValueError(f"n_expert_per_token={self.n_expert_per_token} must be in [1, n_expert={self.n_expert}]")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("linear", "llama3"):
            raise ValueError(f"unknown rope_scaling type {self.rope_scaling.get('type')!r}; choose linear or llama3")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= {"global", "local"}:
                raise ValueError(
                    f"layer_types must list 'global' or 'local' for each of the {self.n_layer} layers, "
                    f"got {self.layer_types!r}"
                )
            if "local" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has local layers but sliding_window is None; set the window size")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value!r} must be positive or None")

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to every earlier key)."""
        if self.layer_types is not None and self.layer_types[layer] == "global":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        """The factor on Q.K scores: 1/sqrt(head_dim), or query_pre_attn_scalar ** -0.5 (as transformers
        computes it) when that is set."""
        if self.query_pre_attn_scalar is None:
            return 1.0 / math.sqrt(self.head_dim)
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def group_size(self) -> int:
        return self.n_head // self.n_kv_head

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """K and V for every layer: 2 * layers * n_kv_head * head_dim * bytes."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * dtype_bytes

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys are: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        d = self.to_dict()
        d.update(overrides)
        return ModelConfig.from_dict(d)

    def save(self, path: str | Path) -> None:
        from qkv.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


# --- named presets -------------------------------------------------------------------
# vocab_size is a placeholder for presets trained with qkv's own tokenizer: the trainer
# sets it from the tokenizer it uses.
PRESETS: dict[str, dict[str, Any]] = {
    # trains in about two minutes on two CPU cores
    "tiny": dict(vocab_size=4096, n_layer=4, d_model=128, n_head=4, n_kv_head=2, max_seq_len=256),
    # nanoGPT's shakespeare-char scale (~10M non-embedding parameters)
    "small": dict(vocab_size=8192, n_layer=6, d_model=384, n_head=6, n_kv_head=6, max_seq_len=256),
    "gpt2-124m": dict(
        vocab_size=50304,
        n_layer=12,
        d_model=768,
        n_head=12,
        max_seq_len=1024,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    ),
    "llama-100m": dict(
        vocab_size=32000,
        n_layer=12,
        d_model=768,
        n_head=12,
        n_kv_head=4,
        d_ff=2048,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # configs of real models, for parameter and KV-cache arithmetic (build on the meta device)
    "llama3-8b": dict(
        vocab_size=128256,
        n_layer=32,
        d_model=4096,
        n_head=32,
        n_kv_head=8,
        d_ff=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    "mixtral-8x7b": dict(
        vocab_size=32000,
        n_layer=32,
        d_model=4096,
        n_head=32,
        n_kv_head=8,
        d_ff=14336,
        max_seq_len=32768,
        rope_theta=1e6,
        tie_embeddings=False,
        n_expert=8,
        n_expert_per_token=2,
    ),
    "olmoe-1b-7b": dict(
        vocab_size=50304,
        n_layer=16,
        d_model=2048,
        n_head=16,
        n_kv_head=16,
        d_ff=1024,
        max_seq_len=4096,
        qk_norm=True,
        tie_embeddings=False,
        n_expert=64,
        n_expert_per_token=8,
        moe_renormalize=False,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        n_layer=30,
        d_model=576,
        n_head=9,
        n_kv_head=3,
        d_ff=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return ModelConfig.from_dict(d)
