"""Hugging Face directories <-> qkv: config and weight mapping for llama, mistral, qwen2,
mixtral, gpt2 and gemma3_text (Gemma 3's text model).

An HF directory is config.json (with `model_type`) + model.safetensors, or shards
model-0000X-of-0000N.safetensors listed in model.safetensors.index.json, + tokenizer files.
Import maps the config onto a `ModelConfig` and renames/reshapes tensors onto qkv's names;
export does the reverse and refuses, naming the feature, when a qkv config has something
the target architecture cannot express. The tensor maps are written out per architecture
so they read as the layout they describe:

    qkv                                 llama / mistral / qwen2 / mixtral
    tok_emb.weight                      model.embed_tokens.weight
    blocks.{i}.attn_norm.weight         model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.{q,k,v,o}_proj.*    model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    blocks.{i}.mlp_norm.weight          model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.{gate,up,down}_proj  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    blocks.{i}.mlp.router.weight        model.layers.{i}.block_sparse_moe.gate.weight
    blocks.{i}.mlp.w_gate[e] (in, out)  model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight (out, in)
    blocks.{i}.mlp.w_up[e]              ... experts.{e}.w3.weight;  w_down[e] <- experts.{e}.w2.weight
    final_norm.weight                   model.norm.weight
    lm_head.weight                      lm_head.weight (absent when tied)

GPT-2 stores its projections as Conv1D (in, out), i.e. transposed, and fuses Q, K, V into one
`c_attn` whose output columns are [q | k | v].

Gemma 3 has four norms a layer: input_layernorm -> attn_norm, post_attention_layernorm ->
post_attn_norm (its output, not the MLP's input as in Llama), pre_feedforward_layernorm ->
mlp_norm, post_feedforward_layernorm -> post_mlp_norm; and self_attn.{q,k}_norm. Its norm
weights are scale - 1: imported as they are with norm_offset=1 (exported as weight +
norm_offset - 1, so a GGUF-imported Gemma, whose weights hold the whole scale, exports too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qkv.config import ModelConfig
from qkv.wrappers import unwrap

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "gpt2", "gemma3_text")
GEMMA_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}
INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"


# --- config: HF -> qkv ------------------------------------------------------------------
def _rope(hf: dict, source: Path) -> tuple[float, dict | None]:
    """rope_theta and qkv rope_scaling from either transformers 5's `rope_parameters` or the
    older top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        return theta, {
            "type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(params.get("original_max_position_embeddings", 8192)),
        }
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported; qkv supports default, linear and llama3")


def config_from_hf(hf: dict, source: Path = Path("config.json")) -> ModelConfig:
    """A qkv ModelConfig from a transformers config.json dict; a bad size names the file."""
    try:
        return _config_from_hf(hf, source)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(source)) else f"{source}: {message}") from None


def _config_from_hf(hf: dict, source: Path) -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in SUPPORTED:
        raise ValueError(f"{source}: unsupported architecture model_type={arch!r}; qkv imports {', '.join(SUPPORTED)}")
    if arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
        if approx is None:
            raise ValueError(f"{source}: gpt2 activation_function {act!r} is not supported (gelu_new or gelu)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ValueError(f"{source}: gpt2 option {flag}=true is not supported by qkv")
        if hf.get("scale_attn_weights") is False:
            raise ValueError(f"{source}: gpt2 option scale_attn_weights=false is not supported by qkv")
        d = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            d_model=d,
            n_head=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d,
            max_seq_len=hf.get("n_positions", 1024),
            pos="learned",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            gelu_approx=approx,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )

    if arch == "gemma3_text":
        return _gemma3_config_from_hf(hf, source)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; qkv's gated MLP uses silu")
    theta, scaling = _rope(hf, source)
    window = hf.get("sliding_window")
    if arch == "qwen2" and not hf.get("use_sliding_window", False):
        window = None  # qwen2 lists a window but only uses it when use_sliding_window is set
    if arch == "qwen2" and window is not None:
        raise ValueError(f"{source}: qwen2 per-layer sliding windows (use_sliding_window=true) are not supported")
    bias = bool(hf.get("attention_bias", False))
    n_head = hf["num_attention_heads"]
    cfg = dict(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or (hf["hidden_size"] // n_head if isinstance(n_head, int) and n_head > 0 else 0),
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        pos="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        qkv_bias=bias or arch == "qwen2",
        o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
    )
    if arch == "mixtral":
        cfg.update(
            n_expert=hf["num_local_experts"],
            n_expert_per_token=hf["num_experts_per_tok"],
            moe_d_ff=hf["intermediate_size"],
            moe_renormalize=True,
        )
    return ModelConfig(**cfg)


def _gemma3_config_from_hf(hf: dict, source: Path) -> ModelConfig:
    """Gemma 3's text config: local/global layers with their own RoPE bases, sandwich norms
    with (1 + weight) scales, QK-norm, GeGLU, sqrt(d)-scaled embeddings, query_pre_attn_scalar."""
    import sys

    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    approx = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}.get(act)
    if approx is None:
        raise ValueError(f"{source}: gemma3 hidden_activation {act!r} is not supported (gelu_pytorch_tanh or gelu)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported; qkv is causal")
    if hf.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 attention does not apply it either; honouring it would break parity
        print(f"warning: {source}: attn_logit_softcapping is ignored, as transformers' Gemma 3 does", file=sys.stderr)
    n_layer, d = hf["num_hidden_layers"], hf["hidden_size"]
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    unknown = sorted(set(types) - set(GEMMA_LAYER_TYPES))
    if unknown:
        raise ValueError(f"{source}: gemma3 layer_types {unknown} are not supported (sliding/full_attention)")
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        g_theta = float(full.get("rope_theta", hf.get("rope_theta", 1e6)))
        l_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))
    else:  # the older flat keys: rope_theta, rope_local_base_freq, rope_scaling (global layers only)
        full, local = {**(hf.get("rope_scaling") or {}), **params}, {}
        g_theta = float(params.get("rope_theta", hf.get("rope_theta", 1e6)))
        l_theta = float(hf.get("rope_local_base_freq", 1e4))
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope scaling on gemma3's sliding layers is not supported (global layers only)")
    _, scaling = _rope({"rope_parameters": {**full, "rope_theta": g_theta}}, source)
    n_head = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_layer=n_layer,
        d_model=d,
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or 256,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 131072),
        pos="rope",
        rope_theta=g_theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="geglu",
        gelu_approx=approx,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=[GEMMA_LAYER_TYPES[t] for t in types],
        rope_local_theta=l_theta,
        norm_offset=1.0,
        post_norm=True,
        embed_scale=d**0.5,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        final_softcap=hf.get("final_logit_softcapping"),
    )


# --- config: qkv -> HF ------------------------------------------------------------------
def pick_arch(cfg: ModelConfig) -> str:
    """The transformers architecture a qkv config exports to by default."""
    if cfg.post_norm or cfg.mlp == "geglu":
        return "gemma3_text"
    if cfg.is_moe:
        return "mixtral"
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        return "gpt2"
    if cfg.qkv_bias and not cfg.o_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def _require(ok: bool, arch: str, feature: str) -> None:
    if not ok:
        raise ValueError(f"cannot export to {arch}: {feature}; change the config or pick another --arch")


def config_to_hf(cfg: ModelConfig, arch: str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A transformers config.json dict for `cfg`; raises naming the first feature that does not map."""
    arch = arch or pick_arch(cfg)
    if arch not in SUPPORTED:
        raise ValueError(f"unknown export architecture {arch!r}; choose one of {', '.join(SUPPORTED)}")
    dtype_name = str(dtype).removeprefix("torch.")
    if arch == "gemma3_text":
        return _gemma3_config_to_hf(cfg, dtype_name)
    for name in ("layer_types", "rope_local_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
        _require(getattr(cfg, name) is None, arch, f"{name} (a Gemma option; use --arch gemma3_text)")
    _require(
        not cfg.post_norm and cfg.embed_scale == 1.0 and cfg.norm_offset == 0.0,
        arch,
        "post_norm / embed_scale / norm_offset (Gemma options; use --arch gemma3_text)",
    )
    _require(not cfg.qk_norm, arch, "qk_norm has no equivalent in this architecture")
    _require(arch == "mixtral" or not cfg.is_moe, arch, "mixture-of-experts layers need --arch mixtral")

    if arch == "gpt2":
        _require(cfg.pos == "learned", arch, f"pos={cfg.pos!r} (gpt2 uses learned absolute positions)")
        _require(cfg.norm == "layernorm" and cfg.norm_bias, arch, "gpt2 needs layernorm with bias")
        _require(cfg.mlp == "gelu", arch, f"mlp={cfg.mlp!r} (gpt2 uses a gelu MLP)")
        _require(cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias, arch, "gpt2 has biases on every projection")
        _require(cfg.n_kv_head == cfg.n_head, arch, "grouped-query attention (gpt2 is multi-head only)")
        _require(cfg.head_dim * cfg.n_head == cfg.d_model, arch, "head_dim * n_head != d_model")
        _require(cfg.sliding_window is None, arch, "sliding_window")
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "activation_function": "gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "scale_attn_weights": True,
            "dtype": dtype_name,
        }

    _require(cfg.pos == "rope", arch, f"pos={cfg.pos!r} ({arch} uses rope)")
    _require(cfg.norm == "rmsnorm", arch, f"norm={cfg.norm!r} ({arch} uses rmsnorm)")
    _require(cfg.mlp == "swiglu", arch, f"mlp={cfg.mlp!r} ({arch} uses a swiglu MLP)")
    hf: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.moe_d_ff if cfg.is_moe else cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "dtype": dtype_name,
    }
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        rope.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"}, rope_type=cfg.rope_scaling["type"])
    hf["rope_parameters"] = rope

    if arch == "llama":
        _require(cfg.qkv_bias == cfg.o_bias, arch, "llama's attention_bias covers q/k/v and o together")
        _require(cfg.sliding_window is None, arch, "sliding_window (use --arch mistral)")
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "mistral":
        _require(not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias), arch, "biases (mistral has none)")
        hf["sliding_window"] = cfg.sliding_window
    elif arch == "qwen2":
        _require(
            cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias,
            arch,
            "qwen2 has q/k/v biases and no o_proj or MLP bias",
        )
        _require(cfg.sliding_window is None, arch, "sliding_window")
        hf.update(use_sliding_window=False, sliding_window=None)
    elif arch == "mixtral":
        _require(not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias), arch, "biases (mixtral has none)")
        _require(cfg.moe_renormalize, arch, "moe_renormalize=False (mixtral renormalises the top-k weights)")
        hf.update(
            num_local_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_per_token,
            sliding_window=cfg.sliding_window,
            router_jitter_noise=0.0,
        )
    names = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }
    return {"architectures": [names[arch]], "model_type": arch, **hf}


def _gemma3_config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
    arch = "gemma3_text"
    _require(cfg.pos == "rope" and cfg.norm == "rmsnorm", arch, "gemma3 uses rope and rmsnorm")
    _require(cfg.mlp == "geglu", arch, f"mlp={cfg.mlp!r} (gemma3 uses a geglu MLP)")
    _require(cfg.qk_norm and cfg.post_norm, arch, "gemma3 has qk_norm and post_norm")
    _require(not cfg.is_moe and not cfg.mlp_bias and cfg.qkv_bias == cfg.o_bias, arch, "biases or experts")
    _require(abs(cfg.embed_scale - cfg.d_model**0.5) < 1e-6 * cfg.embed_scale, arch, "embed_scale != sqrt(d_model)")
    _require(cfg.attn_softcap is None, arch, "attn_softcap (transformers' Gemma 3 does not apply it)")
    types = cfg.layer_types or ["local" if cfg.sliding_window else "global"] * cfg.n_layer
    _require("local" not in types or cfg.sliding_window is not None, arch, "local layers without a window")
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        full.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"}, rope_type=cfg.rope_scaling["type"])
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    _require(cfg.rope_local_theta is not None or not cfg.rope_scaling, arch, "rope_scaling on local layers")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh" if cfg.gelu_approx == "tanh" else "gelu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
        "sliding_window": cfg.sliding_window,
        "layer_types": [{"local": "sliding_attention", "global": "full_attention"}[t] for t in types],
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "final_logit_softcapping": cfg.final_softcap,
        "attn_logit_softcapping": None,
        "dtype": dtype_name,
    }


# --- weights: HF -> qkv -----------------------------------------------------------------
def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def state_from_hf(
    hf_state: dict[str, torch.Tensor], arch: str, cfg: ModelConfig, source: Path
) -> dict[str, torch.Tensor]:
    """Rename/reshape transformers tensors to qkv's state dict. Missing tensors raise, naming one."""
    # older gpt2 checkpoints have no "transformer." prefix; tied heads may be absent or present
    src = dict(hf_state)

    def take(name: str) -> torch.Tensor:
        if name in src:
            return src.pop(name)
        raise ValueError(f"{source}: tensor {name!r} is missing for a {arch} model with this config.json")

    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        src = {k.removeprefix("transformer."): v for k, v in src.items()}
        out["tok_emb.weight"] = take("wte.weight")
        out["pos_emb.weight"] = take("wpe.weight")
        for i in range(cfg.n_layer):
            p, q = f"h.{i}.", f"blocks.{i}."
            for hf_n, qkv_n in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[q + qkv_n + ".weight"] = take(p + hf_n + ".weight")
                out[q + qkv_n + ".bias"] = take(p + hf_n + ".bias")
            w, b = take(p + "attn.c_attn.weight"), take(p + "attn.c_attn.bias")
            for name, wi, bi in zip("qkv", w.chunk(3, dim=1), b.chunk(3)):
                out[q + f"attn.{name}_proj.weight"] = _t(wi)
                out[q + f"attn.{name}_proj.bias"] = bi.contiguous()
            for hf_n, qkv_n in (
                ("attn.c_proj", "attn.o_proj"),
                ("mlp.c_fc", "mlp.up_proj"),
                ("mlp.c_proj", "mlp.down_proj"),
            ):
                out[q + qkv_n + ".weight"] = _t(take(p + hf_n + ".weight"))
                out[q + qkv_n + ".bias"] = take(p + hf_n + ".bias")
            for buf in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
                src.pop(p + buf, None)
        out["final_norm.weight"] = take("ln_f.weight")
        out["final_norm.bias"] = take("ln_f.bias")
        head = src.pop("lm_head.weight", None)
    else:
        out["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            for hf_n, qkv_n in _norm_names(arch):
                out[q + qkv_n + ".weight"] = take(p + hf_n + ".weight")
            for n in "qkvo":
                out[q + f"attn.{n}_proj.weight"] = take(p + f"self_attn.{n}_proj.weight")
                if cfg.o_bias if n == "o" else cfg.qkv_bias:
                    out[q + f"attn.{n}_proj.bias"] = take(p + f"self_attn.{n}_proj.bias")
            if cfg.is_moe:
                _moe_from_hf(take, src, p, q, cfg, out)
            else:
                for n in ("gate", "up", "down"):
                    out[q + f"mlp.{n}_proj.weight"] = take(p + f"mlp.{n}_proj.weight")
                    if cfg.mlp_bias:
                        out[q + f"mlp.{n}_proj.bias"] = take(p + f"mlp.{n}_proj.bias")
        out["final_norm.weight"] = take("model.norm.weight")
        head = src.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise ValueError(f"{source}: tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
        out["lm_head.weight"] = head
    src = {k: v for k, v in src.items() if not k.endswith("rotary_emb.inv_freq")}
    if src:
        extra = sorted(src)
        raise ValueError(f"{source}: unexpected tensors for {arch}: {extra[:5]}{'...' if len(extra) > 5 else ''}")
    return out


def _moe_from_hf(take, src: dict, p: str, q: str, cfg: ModelConfig, out: dict) -> None:
    E = cfg.n_expert
    if p + "block_sparse_moe.gate.weight" in src:  # the published Mixtral layout, one tensor per expert
        m = p + "block_sparse_moe."
        out[q + "mlp.router.weight"] = take(m + "gate.weight")
        out[q + "mlp.w_gate"] = torch.stack([_t(take(m + f"experts.{e}.w1.weight")) for e in range(E)])
        out[q + "mlp.w_up"] = torch.stack([_t(take(m + f"experts.{e}.w3.weight")) for e in range(E)])
        out[q + "mlp.w_down"] = torch.stack([_t(take(m + f"experts.{e}.w2.weight")) for e in range(E)])
    else:  # transformers 5's in-memory layout: gate_up_proj (E, 2f, d), down_proj (E, d, f)
        out[q + "mlp.router.weight"] = take(p + "mlp.gate.weight")
        gate, up = take(p + "mlp.experts.gate_up_proj").chunk(2, dim=1)
        out[q + "mlp.w_gate"] = gate.transpose(1, 2).contiguous()
        out[q + "mlp.w_up"] = up.transpose(1, 2).contiguous()
        out[q + "mlp.w_down"] = take(p + "mlp.experts.down_proj").transpose(1, 2).contiguous()


def _norm_names(arch: str) -> list[tuple[str, str]]:
    """(transformers, qkv) names of a layer's norms."""
    if arch == "gemma3_text":
        return [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "post_attn_norm"),
            ("pre_feedforward_layernorm", "mlp_norm"),
            ("post_feedforward_layernorm", "post_mlp_norm"),
            ("self_attn.q_norm", "attn.q_norm"),
            ("self_attn.k_norm", "attn.k_norm"),
        ]
    return [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")]


# --- weights: qkv -> HF -----------------------------------------------------------------
def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if arch == "gemma3_text" and cfg.norm_offset != 1.0:  # Gemma stores scale - 1
        shift = cfg.norm_offset - 1.0
        state = {k: v + shift if k.endswith("norm.weight") else v for k, v in state.items()}
    if arch == "gpt2":
        out["transformer.wte.weight"] = state["tok_emb.weight"]
        out["transformer.wpe.weight"] = state["pos_emb.weight"]
        for i in range(cfg.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for hf_n, qkv_n in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[p + hf_n + ".weight"] = state[q + qkv_n + ".weight"]
                out[p + hf_n + ".bias"] = state[q + qkv_n + ".bias"]
            out[p + "attn.c_attn.weight"] = torch.cat([state[q + f"attn.{n}_proj.weight"] for n in "qkv"]).t()
            out[p + "attn.c_attn.bias"] = torch.cat([state[q + f"attn.{n}_proj.bias"] for n in "qkv"])
            for hf_n, qkv_n in (
                ("attn.c_proj", "attn.o_proj"),
                ("mlp.c_fc", "mlp.up_proj"),
                ("mlp.c_proj", "mlp.down_proj"),
            ):
                out[p + hf_n + ".weight"] = state[q + qkv_n + ".weight"].t()
                out[p + hf_n + ".bias"] = state[q + qkv_n + ".bias"]
        out["transformer.ln_f.weight"] = state["final_norm.weight"]
        out["transformer.ln_f.bias"] = state["final_norm.bias"]
    else:
        out["model.embed_tokens.weight"] = state["tok_emb.weight"]
        for i in range(cfg.n_layer):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            for hf_n, qkv_n in _norm_names(arch):
                out[p + hf_n + ".weight"] = state[q + qkv_n + ".weight"]
            for n in "qkvo":
                for kind in ("weight", "bias"):
                    if q + f"attn.{n}_proj.{kind}" in state:
                        out[p + f"self_attn.{n}_proj.{kind}"] = state[q + f"attn.{n}_proj.{kind}"]
            if cfg.is_moe:
                m = p + "block_sparse_moe."
                out[m + "gate.weight"] = state[q + "mlp.router.weight"]
                for e in range(cfg.n_expert):
                    out[m + f"experts.{e}.w1.weight"] = state[q + "mlp.w_gate"][e].t()
                    out[m + f"experts.{e}.w3.weight"] = state[q + "mlp.w_up"][e].t()
                    out[m + f"experts.{e}.w2.weight"] = state[q + "mlp.w_down"][e].t()
            else:
                for n in ("gate", "up", "down"):
                    for kind in ("weight", "bias"):
                        if q + f"mlp.{n}_proj.{kind}" in state:
                            out[p + f"mlp.{n}_proj.{kind}"] = state[q + f"mlp.{n}_proj.{kind}"]
        out["model.norm.weight"] = state["final_norm.weight"]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# --- files ------------------------------------------------------------------------------
def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model directory needs one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json. Pickled weights
    (pytorch_model.bin) are refused: unpickling can run code."""
    if (directory / WEIGHTS).exists():
        return [directory / WEIGHTS]
    index = directory / INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        for n in names:
            if not (directory / n).resolve().is_relative_to(directory.resolve()):
                raise ValueError(f"{index}: shard {n!r} lies outside {directory}; shard names must be files in it")
        files = [directory / n for n in names]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
        return files
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickled:
        raise ValueError(
            f"{directory / pickled[0]}: pickled weights are refused (loading them can run code); "
            "convert them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
        )
    raise FileNotFoundError(f"{directory / WEIGHTS}: weights file not found (nor a sharded {INDEX})")


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from qkv.checkpoint import read_safetensors

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        state.update(read_safetensors(f))
    return state


def build_with_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path):
    """A Transformer holding `state`, without paying for a random init of weights that are
    overwritten anyway: build on the meta device, allocate, load (names and shapes checked),
    then compute the non-persistent buffers (RoPE / sinusoidal tables) from a one-layer twin."""
    from qkv.checkpoint import check_state, load_state_into
    from qkv.model import build_model

    model = build_model(cfg, device="meta")
    check_state(model, state, source)  # before to_empty: a config that disagrees with its weights allocates nothing
    model = model.to_empty(device="cpu")
    load_state_into(model, state, source)
    twin = dict(build_model(cfg.replace(n_layer=1, vocab_size=1, n_expert=0, layer_types=None)).named_buffers())
    for name, buf in model.named_buffers():
        if name not in state:
            buf.copy_(twin[name])
    return model.eval()


GENERATION_CONFIG = "generation_config.json"
# generation_config.json keys that are sampling defaults qkv applies (transformers' names = qkv's)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_generation_config(directory: str | Path) -> dict:
    """The sampling defaults a model directory's generation_config.json carries ({} when it has
    none). An explicit `do_sample: false` is transformers' greedy decoding: temperature 0."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    out = {k: gen[k] for k in SAMPLING_KEYS if isinstance(gen.get(k), (int, float)) and not isinstance(gen[k], bool)}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def generation_config(sampling: dict, tokenizer=None) -> dict:
    """generation_config.json for an export: the model's sampling defaults (`sampling` over qkv's
    shared set) so transformers' `generate` samples as `qkv generate` does, plus special tokens."""
    from dataclasses import asdict

    from qkv.infer.sampling import DEFAULT_SAMPLING

    values = asdict(DEFAULT_SAMPLING.merged(sampling))
    gen: dict = {"do_sample": values["temperature"] > 0, **values}
    if tokenizer is not None:
        gen.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        declared = [i for i in map(tokenizer.token_id, tokenizer.end_tokens) if i is not None and i != tokenizer.eos_id]
        if declared and tokenizer.eos_id is not None:  # transformers stops on each id of a list
            gen["eos_token_id"] = [tokenizer.eos_id, *declared]
    return gen


def import_hf(directory: str | Path):
    """(Transformer, Tokenizer | None) from a Hugging Face directory, in fp32 on the CPU."""
    from qkv.tokenizer import Tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model directory")
    hf = read_hf_config(directory)
    cfg = config_from_hf(hf, directory / "config.json")
    files = weight_files(directory)
    state = state_from_hf(read_hf_weights(directory), hf["model_type"], cfg, files[0] if len(files) == 1 else directory)
    model = build_with_state(cfg, state, files[0] if len(files) == 1 else directory)
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").exists() else None
    model.generation_defaults = read_generation_config(directory)  # kept through a re-export
    return model.eval(), tokenizer


def export_hf(
    model, directory: str | Path, tokenizer=None, arch: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` (and tokenizer) as a transformers directory; returns the directory."""
    from safetensors.torch import save

    from qkv.io import atomic_write_bytes, atomic_write_text

    hf_cfg, hf_state = _hf_config_and_state(model, arch, dtype)
    if tokenizer is not None:
        hf_cfg.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # config.json last: a crash part way never leaves a new config beside old weights
    atomic_write_bytes(directory / WEIGHTS, save(hf_state, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(directory)
    gen = generation_config(getattr(unwrap(model), "generation_defaults", {}), tokenizer)
    atomic_write_text(directory / GENERATION_CONFIG, json.dumps(gen, indent=2) + "\n")
    atomic_write_text(directory / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    return directory


def _hf_config_and_state(model, arch: str | None, dtype: torch.dtype | None) -> tuple[dict, dict]:
    """(config.json dict, transformers state dict) for a qkv model (DDP/compiled wrappers unwrapped)."""
    from qkv.checkpoint import state_dict_for_save

    inner = unwrap(model)
    cfg: ModelConfig = inner.cfg
    state = state_dict_for_save(inner)
    dtype = dtype or next(iter(state.values())).dtype
    hf_cfg = config_to_hf(cfg, arch, dtype)
    return hf_cfg, {k: v.to(dtype) for k, v in state_to_hf(state, cfg, hf_cfg["model_type"]).items()}


def to_transformers(model, arch: str | None = None):
    """The same weights as a transformers model, in memory (no files), for side-by-side
    comparisons. Special-token ids stay unset, so transformers' `generate` never stops early."""
    import transformers

    hf_cfg, hf_state = _hf_config_and_state(model, arch, None)
    hf_cfg.pop("architectures")
    config = transformers.AutoConfig.for_model(
        hf_cfg.pop("model_type"), **hf_cfg, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    hf = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    if unexpected or any("lm_head" not in m for m in missing):
        raise RuntimeError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()
