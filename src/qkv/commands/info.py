"""Show a model's parameter counts (total/active, with/without embeddings) and KV-cache size.

MODEL is a preset name (e.g. tiny, mixtral-8x7b), a model name from `qkv models` (e.g.
smollm2), a qkv checkpoint directory, a Hugging Face directory or config.json, or a GGUF file.
For a model file it also shows the weight format, vocabulary, context length and whether a
chat template comes with it. Only the config is read; the model is built on
the meta device, so even Mixtral-8x7B costs no memory.
"""

from __future__ import annotations

import argparse
import functools


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name, model name, checkpoint dir, HF dir/config.json or .gguf file")
    p.add_argument(
        "--context", type=int, default=None, help="context length for the KV-cache total (default: the model's)"
    )
    p.add_argument("--batch", type=int, default=1, help="batch size for the KV-cache total")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16", "fp8", "int8"],
        default="bf16",
        help="KV-cache element type (int8: qkv's --kv-dtype int8, one fp32 scale per key/value vector)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SCALE_BYTES = {"int8": 4}  # per key/value vector (infer/kv_quant.py)


def resolve_config(spec: str):
    """ModelConfig for a preset, qkv checkpoint, HF directory/config.json or GGUF file."""
    from pathlib import Path

    from qkv.config import PRESETS, ModelConfig, preset
    from qkv.interop.registry import MODELS, resolve_model

    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if not path.exists() and spec not in MODELS:
        raise FileNotFoundError(
            f"{spec}: not a preset ({', '.join(PRESETS)}), not a model name ({', '.join(MODELS)}) "
            "and no such file or directory"
        )
    path = resolve_model(spec)
    from qkv.checkpoint import is_qkv_checkpoint

    if path.is_dir() and is_qkv_checkpoint(path):
        return ModelConfig.load(path / "config.json")
    from qkv.interop import detect_format, load_config  # HF config.json or GGUF metadata

    if detect_format(path) == "gguf":
        from qkv.interop.gguf import config_from_gguf
        from qkv.interop.load import _gguf_file

        return config_from_gguf(gguf_reader(_gguf_file(path)), _gguf_file(path))
    return load_config(path)


@functools.lru_cache(maxsize=2)
def gguf_reader(path):
    """One parse of a GGUF file's header for all of `qkv info` (reading a large vocabulary
    takes seconds)."""
    from qkv.interop.gguf import open_gguf

    return open_gguf(path)


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def model_file_facts(spec: str) -> dict:
    """For a model on disk (not a preset): its weight format, vocabulary size, context length
    and whether a chat template comes with it; {} for a preset."""

    from qkv.config import PRESETS
    from qkv.interop.load import _gguf_file, detect_format
    from qkv.interop.registry import resolve_model

    if spec in PRESETS:
        return {}
    path = resolve_model(spec)
    fmt = detect_format(path)
    facts: dict = {"path": str(path), "format": fmt}
    if fmt == "gguf":
        import gguf

        reader = gguf_reader(_gguf_file(path))

        file_type = reader.fields.get("general.file_type")
        try:
            facts["weight_format"] = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            facts["weight_format"] = f"file type {file_type}"
        facts["chat_template"] = bool(reader.fields.get("tokenizer.chat_template"))
    else:
        d = path if path.is_dir() else path.parent
        config = d / "config.json"
        dtype = None
        if config.is_file():
            import json

            hf = json.loads(config.read_text())
            dtype = hf.get("torch_dtype") or hf.get("dtype")
        facts["weight_format"] = f"safetensors ({dtype})" if dtype else "safetensors"
        facts["chat_template"] = _has_chat_template(d)
    return facts


def _has_chat_template(directory) -> bool:
    import json

    if (directory / "chat_template.jinja").is_file():
        return True
    cfg = directory / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def gguf_weight_formats(spec: str) -> dict[str, dict]:
    """For a GGUF file: per stored format, its tensors, weights and how qkv computes with
    them (kept as blocks by the native quantized kernel, or dequantized); {} otherwise."""
    from pathlib import Path

    from qkv.interop.registry import MODELS, resolve_model

    path = resolve_model(spec) if spec in MODELS else Path(spec)
    if path.suffix != ".gguf" or not path.is_file():
        return {}
    from qkv.kernels import native, quant_linear

    out: dict[str, dict] = {}
    for t in gguf_reader(path).tensors:
        fmt = t.tensor_type.name.lower()
        w = out.setdefault(fmt, {"tensors": 0, "elements": 0})
        w["tensors"] += 1
        w["elements"] += int(t.n_elements)
    for fmt, w in out.items():
        if fmt == "f32":
            w["path"] = "fp32 (norms, and any fp32 matrices: the fp32 kernels)"
        elif not quant_linear.supported(fmt):
            w["path"] = "dequantized to fp32 on load (no kernel for this format)"
        elif native.enabled():
            w["path"] = f"kept as {fmt} blocks, native kernel ({quant_linear.isa(fmt)})"
        else:
            w["path"] = f"kept as {fmt} blocks, dequantized per product (native kernels off)"
    return out


def block_options(cfg) -> str:
    """The per-model options beyond a Llama block that this config sets, in words ("" if none)."""
    parts = []
    if cfg.mlp != "swiglu":
        parts.append(f"mlp={cfg.mlp}" + (f" ({cfg.gelu_approx} gelu)" if cfg.mlp in ("gelu", "geglu") else ""))
    if cfg.qk_norm:
        parts.append("qk-norm")
    if cfg.post_norm:
        parts.append("post-norms")
    if cfg.norm_offset:
        parts.append(f"norm scale = {cfg.norm_offset:g} + weight")
    if cfg.embed_scale != 1.0:
        parts.append(f"embeddings x {cfg.embed_scale:.4g}")
    if cfg.query_pre_attn_scalar is not None:
        parts.append(f"scores / sqrt({cfg.query_pre_attn_scalar:g})")
    if cfg.attn_softcap is not None:
        parts.append(f"attention soft-cap {cfg.attn_softcap:g}")
    if cfg.final_softcap is not None:
        parts.append(f"logit soft-cap {cfg.final_softcap:g}")
    return ", ".join(parts)


def window_layout(cfg) -> tuple[int, int]:
    """(local, global) layer counts."""
    local = sum(cfg.window_of(i) is not None for i in range(cfg.n_layer))
    return local, cfg.n_layer - local


def run(args: argparse.Namespace) -> int:
    import json

    from qkv.infer import fused_decode
    from qkv.model import build_model, count_params

    cfg = resolve_config(args.model)
    counts = count_params(build_model(cfg, device="meta"))
    context = args.context or cfg.max_seq_len
    per_vector = cfg.head_dim * DTYPE_BYTES[args.dtype] + SCALE_BYTES.get(args.dtype, 0)
    per_token = 2 * cfg.n_layer * cfg.n_kv_head * per_vector
    attention_kind = "MHA" if cfg.n_kv_head == cfg.n_head else "MQA" if cfg.n_kv_head == 1 else "GQA"
    info = {
        "model": args.model,
        "layers": cfg.n_layer,
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_head} q / {cfg.n_kv_head} kv ({attention_kind})",
        "head_dim": cfg.head_dim,
        "experts": f"{cfg.n_expert_per_token} of {cfg.n_expert}" if cfg.is_moe else "dense",
        "params_total": counts.total,
        "params_active": counts.active,
        "params_total_non_embedding": counts.total_non_embedding,
        "params_active_non_embedding": counts.active_non_embedding,
        "kv_bytes_per_token": per_token,
        "kv_dtype": args.dtype,
        "kv_context": context,
        "kv_batch": args.batch,
        "kv_bytes_total": per_token * context * args.batch,
        "cpu_decode": fused_decode.describe(cfg),
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_seq_len,
        **model_file_facts(args.model),
    }
    local, global_ = window_layout(cfg)
    if local:
        # qkv's caches keep every token of a local layer and mask it to the window; a cache that
        # kept only the window would hold min(context, window) tokens for those layers
        per_layer = per_token // cfg.n_layer
        kept = min(context, cfg.sliding_window)
        windowed = per_layer * args.batch * (global_ * context + local * kept)
        info.update(
            local_layers=local,
            global_layers=global_,
            sliding_window=cfg.sliding_window,
            kv_bytes_total_windowed=windowed,
            kv_window_saving_bytes=info["kv_bytes_total"] - windowed,
        )
    rope_local = cfg.rope_local_theta
    info["rope"] = f"theta {cfg.rope_theta:g}" + (f", local layers {rope_local:g}" if rope_local is not None else "")
    info["block_options"] = block_options(cfg)
    weights = gguf_weight_formats(args.model)
    if weights:
        info["weights"] = weights
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = []
    if "format" in info:
        template = "yes" if info["chat_template"] else "no (use `qkv generate` without --chat)"
        rows += [
            ("file", f"{info['path']} ({info['format']})"),
            ("weight format", info["weight_format"]),
            ("chat template", template),
        ]
    rows += [
        ("vocabulary", f"{cfg.vocab_size:,} tokens"),
        ("context length", f"{cfg.max_seq_len:,} tokens"),
        (
            "architecture",
            f"{cfg.n_layer} layers, d={cfg.d_model}, {info['heads']}, head_dim {cfg.head_dim}, "
            f"{info['experts']}, pos={cfg.pos}",
        ),
        ("parameters (total)", f"{human(counts.total)}  ({counts.total:,})"),
        ("parameters (active/token)", f"{human(counts.active)}  ({counts.active:,})"),
        (
            "  without embeddings",
            f"total {human(counts.total_non_embedding)}, active {human(counts.active_non_embedding)}",
        ),
        (
            f"KV cache per token ({args.dtype})",
            f"{human_bytes(per_token)}  = 2 x {cfg.n_layer} layers x {cfg.n_kv_head} kv heads x {cfg.head_dim} "
            f"x {DTYPE_BYTES[args.dtype]} B"
            + (f" + {SCALE_BYTES[args.dtype]} B a vector" if args.dtype in SCALE_BYTES else ""),
        ),
        (f"KV cache, {context} tokens x batch {args.batch}", human_bytes(info["kv_bytes_total"])),
        ("CPU decode step", info["cpu_decode"]),
        ("rope", info["rope"]),
    ]
    if info["block_options"]:
        rows.insert(1, ("block options", info["block_options"]))
    if local:
        rows.insert(
            -2,
            (
                "  sliding window",
                f"{local} local layers (window {cfg.sliding_window}), {global_} global: local layers keep full "
                f"blocks, masked; keeping only the window would take {human_bytes(info['kv_bytes_total_windowed'])} "
                f"(saves {human_bytes(info['kv_window_saving_bytes'])})",
            ),
        )
    for fmt, w in weights.items():
        rows.append((f"weights {fmt}", f"{w['tensors']} tensors, {human(w['elements'])} weights: {w['path']}"))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
