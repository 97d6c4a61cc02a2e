"""qkv -> GGUF (llama.cpp's single-file format): the inverse of interop/gguf.py.

`export_gguf(model, tokenizer, path, qtype)` writes one file that llama.cpp, the `gguf`
package, transformers (`from_pretrained(dir, gguf_file=...)`) and qkv's own importer read:

- Architecture: `llama` (also MoE, as llama with `ffn_*_exps` as llama.cpp stores Mixtral), or
  `qwen2` when the config has q/k/v biases. The metadata keys are those config_from_gguf
  reads, plus general.name, general.file_type and the quantization version. A config option
  neither architecture expresses (learned positions, LayerNorm, GELU, o/MLP biases, qk_norm,
  sliding windows, llama3 rope scaling) is refused in one line naming it.
- Q/K rows of llama are permuted for llama.cpp's adjacent-pair rope (`permute_rows`, the
  inverse of gguf.py's `unpermute`); qwen2 uses neox-style rope and is written as is.
- Tensors: the token embedding, output head and every attention / MLP projection (experts
  too) in `qtype`; norms, biases and the MoE router always F32, as llama-quantize keeps them.
  A weight already held as QuantLinear / QuantEmbedding blocks of the chosen format is
  written byte for byte (rows moved whole); anything else is dequantized and requantized
  with qkv.quant.quantize. A tensor whose row width the format's blocks do not divide falls
  back along FALLBACK (llama-quantize's choices: q4_k -> q5_0, q6_k -> q8_0, 32-blocks -> f16)
  and the fallback is logged.
- Tokenizer: byte-level BPE ("gpt2"): tokens in id order (ids the tokenizer does not use are
  `[PADi]` of type UNUSED), token types (CONTROL for special tokens, USER_DEFINED for other
  added tokens), merges, bos/eos/pad ids, the pre-tokenizer's llama.cpp name and the chat
  template.
- The file is written to a temp file in the target directory and renamed over `path` only
  when complete; one tensor is quantized at a time, so memory stays at the model plus one tensor.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qkv.config import ModelConfig
from qkv.interop.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT, CONTROL, USER_DEFINED
from qkv.quant import FORMATS, QuantEmbedding, QuantLinear, block_format, quantize

NORMAL, UNUSED = 1, 5  # llama.cpp token types (CONTROL, USER_DEFINED come from the importer)

# what a tensor is written as when `qtype`'s blocks do not tile its rows (llama-quantize's fallbacks)
FALLBACK = {
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
    "q8_0": "f16",
    "q4_0": "f16",
    "q4_1": "f16",
    "q5_0": "f16",
    "q5_1": "f16",
}

# general.file_type (llama.cpp's llama_ftype) for a file whose weights are mostly `qtype`
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q4_k": "MOSTLY_Q4_K_S",
    "q5_k": "MOSTLY_Q5_K_S",
    "q6_k": "MOSTLY_Q6_K",
}

# llama.cpp's names (tokenizer.ggml.pre) for the byte-level split patterns qkv's importer knows
_PRE_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GGUFExport:
    """What export_gguf wrote."""

    path: Path
    arch: str
    n_tensors: int
    tensor_bytes: int  # the tensors' data, without header or alignment padding
    n_weights: int
    types: dict[str, int]  # format -> number of tensors written in it
    fallbacks: list[str] = field(default_factory=list)  # one log line per tensor that fell back

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_weights

    def describe(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        size = self.path.stat().st_size
        return (
            f"wrote {self.path} ({self.arch}): {self.n_tensors} tensors ({types}), "
            f"{self.n_weights / 1e6:.1f}M weights, {size / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits per weight"
        )


# --- architecture ----------------------------------------------------------------------------
def gguf_arch(cfg: ModelConfig) -> str:
    """'llama' or 'qwen2' for `cfg`; a one-line ValueError naming the first option GGUF cannot hold."""

    def refuse(option: str, why: str) -> None:
        raise ValueError(f"cannot export to GGUF: {option} ({why}); change the config or use `qkv convert --to hf`")

    if cfg.pos != "rope":
        refuse(f"pos={cfg.pos!r}", "GGUF llama/qwen2 use rope; GPT-2-style models are not written as GGUF")
    if cfg.norm != "rmsnorm":
        refuse(f"norm={cfg.norm!r}", "GGUF llama/qwen2 use rmsnorm")
    if cfg.mlp != "swiglu":
        refuse(f"mlp={cfg.mlp!r}", "GGUF llama/qwen2 use a swiglu MLP")
    if cfg.qk_norm:
        refuse("qk_norm=True", "llama/qwen2 have no q/k norms")
    if cfg.sliding_window is not None:
        refuse(f"sliding_window={cfg.sliding_window}", "llama.cpp's llama has no sliding window")
    if cfg.o_bias or cfg.mlp_bias:
        refuse("o_bias/mlp_bias", "only q/k/v biases (qwen2) are read back from GGUF")
    kind = (cfg.rope_scaling or {}).get("type")
    if kind not in (None, "linear"):
        refuse(f"rope_scaling type {kind!r}", "only linear rope scaling is read back from GGUF")
    if cfg.is_moe:
        if cfg.qkv_bias:
            refuse("qkv_bias with n_expert > 0", "GGUF MoE is written as llama, which has no q/k/v biases")
        if not cfg.moe_renormalize:
            refuse("moe_renormalize=False", "llama MoE renormalises the top-k weights")
        return "llama"
    return "qwen2" if cfg.qkv_bias else "llama"


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (rotate-half rope -> adjacent-pair rope), the inverse of
    gguf.unpermute: per head, rows [(pair, i)] -> [(i, pair)]. Works on float weights and on
    quantized rows alike (a row is whole blocks)."""
    out_dim = w.shape[0]
    return w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- tensors ---------------------------------------------------------------------------------
@dataclass
class _Tensor:
    name: str
    fmt: str  # the format written
    shape: tuple[int, ...]  # PyTorch order: (..., rows, cols)
    produce: Callable[[], torch.Tensor]  # -> (..., row_bytes) uint8, called once when writing

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], block_format(self.fmt).row_bytes(self.shape[-1]))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


def _fit(name: str, cols: int, qtype: str, fallbacks: list[str]) -> str:
    """`qtype`, or the first format along FALLBACK whose blocks tile a row of `cols` weights."""
    fmt = qtype
    while cols % block_format(fmt).block_size:
        fmt = FALLBACK.get(fmt, "f16")
    if fmt != qtype:
        fallbacks.append(
            f"{name}: {cols} columns are not a multiple of {qtype}'s {block_format(qtype).block_size}-weight "
            f"blocks; writing it as {fmt}"
        )
    return fmt


def _quantized(name: str, w: torch.Tensor, fmt: str) -> torch.Tensor:
    try:
        return quantize(w, fmt)
    except ValueError as e:
        raise ValueError(f"GGUF tensor {name}: {e}") from None


def _matrix(name: str, module: nn.Module, qtype: str, fallbacks: list[str], perm_heads: int = 0) -> _Tensor:
    """A Linear / Embedding weight (or its quantized twin) as GGUF rows of `qtype` (or its
    fallback), Q/K rows permuted when `perm_heads`."""
    if isinstance(module, QuantLinear | nn.Linear):
        shape = (module.out_features, module.in_features)
    else:
        shape = (module.num_embeddings, module.embedding_dim)
    fmt = _fit(name, shape[1], qtype, fallbacks)

    def produce() -> torch.Tensor:
        if isinstance(module, QuantLinear | QuantEmbedding) and module.qtype == fmt:
            rows = module.gguf_blocks()  # the file's bytes, written as they are (unpacked if repacked)
        else:
            rows = _quantized(name, module.weight.detach().float(), fmt)
        return permute_rows(rows, perm_heads) if perm_heads else rows

    return _Tensor(name, fmt, shape, produce)


def _f32(name: str, t: torch.Tensor, perm_heads: int = 0) -> _Tensor:
    def produce() -> torch.Tensor:
        w = t.detach().float()
        return quantize(permute_rows(w, perm_heads) if perm_heads else w, "f32")

    return _Tensor(name, "f32", tuple(t.shape), produce)


def _experts(name: str, w: torch.Tensor, qtype: str, fallbacks: list[str]) -> _Tensor:
    """qkv's stacked (E, in, out) expert weights as GGUF's (E, out, in) rows."""
    e, n_in, n_out = w.shape
    fmt = _fit(name, n_in, qtype, fallbacks)
    return _Tensor(
        name, fmt, (e, n_out, n_in), lambda: _quantized(name, w.detach().float().transpose(1, 2).contiguous(), fmt)
    )


def plan_tensors(model, arch: str, qtype: str, fallbacks: list[str]) -> list[_Tensor]:
    """Every GGUF tensor of `model` in llama.cpp's names and order, not yet computed."""
    cfg: ModelConfig = model.cfg
    permute = arch == "llama"  # llama.cpp's llama rope rotates adjacent pairs; qwen2's is neox-style
    out = [
        _matrix("token_embd.weight", model.tok_emb, qtype, fallbacks),
        _f32("output_norm.weight", model.final_norm.weight),
    ]
    if model.lm_head is not None:
        out.append(_matrix("output.weight", model.lm_head, qtype, fallbacks))
    for i, block in enumerate(model.blocks):
        p, attn = f"blk.{i}.", block.attn
        heads = {"q": cfg.n_head if permute else 0, "k": cfg.n_kv_head if permute else 0, "v": 0}
        out.append(_f32(p + "attn_norm.weight", block.attn_norm.weight))
        for n in "qkv":
            proj = getattr(attn, f"{n}_proj")
            out.append(_matrix(p + f"attn_{n}.weight", proj, qtype, fallbacks, heads[n]))
            if proj.bias is not None:
                out.append(_f32(p + f"attn_{n}.bias", proj.bias, heads[n]))
        out.append(_matrix(p + "attn_output.weight", attn.o_proj, qtype, fallbacks))
        out.append(_f32(p + "ffn_norm.weight", block.mlp_norm.weight))
        if cfg.is_moe:
            mlp = block.mlp
            out.append(_f32(p + "ffn_gate_inp.weight", mlp.router.weight))  # the router stays f32, as in llama.cpp
            out.append(_experts(p + "ffn_gate_exps.weight", mlp.w_gate, qtype, fallbacks))
            out.append(_experts(p + "ffn_up_exps.weight", mlp.w_up, qtype, fallbacks))
            out.append(_experts(p + "ffn_down_exps.weight", mlp.w_down, qtype, fallbacks))
        else:
            for n in ("gate", "up", "down"):
                out.append(_matrix(p + f"ffn_{n}.weight", getattr(block.mlp, f"{n}_proj"), qtype, fallbacks))
    return out


# --- metadata --------------------------------------------------------------------------------
def _write_config(writer, cfg: ModelConfig, arch: str, qtype: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType[FILE_TYPES[qtype]]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.moe_d_ff if cfg.is_moe else cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    if cfg.head_dim * cfg.n_head != cfg.d_model:  # llama.cpp assumes d_model / n_head otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling:  # linear only (gguf_arch refuses the rest)
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.is_moe:
        writer.add_expert_count(cfg.n_expert)
        writer.add_expert_used_count(cfg.n_expert_per_token)


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level pre-tokenizer (tokenizer.json form)."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        if spec.get("add_prefix_space"):
            raise ValueError("cannot export the tokenizer to GGUF: its ByteLevel pre-tokenizer adds a prefix space")
        return "gpt-2"
    if spec and spec.get("type") == "Sequence" and len(spec["pretokenizers"]) == 2:
        split, byte_level = spec["pretokenizers"]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("type") == "Split" and byte_level.get("type") == "ByteLevel" and pattern in _PRE_NAMES:
            return _PRE_NAMES[pattern]
    raise ValueError(
        "cannot export the tokenizer to GGUF: its pre-tokenizer has no llama.cpp name "
        "(qkv writes GPT-2 byte-level, llama-bpe and qwen2 splits); export without a tokenizer"
    )


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        raise ValueError(
            "cannot export the tokenizer to GGUF: only byte-level BPE without a normalizer is written "
            "(tokenizer.ggml.model 'gpt2'); export without a tokenizer"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    added = tokenizer.backend.get_added_tokens_decoder()
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ValueError(
            f"cannot export to GGUF: the tokenizer has ids up to {n - 1} but the model's vocab_size is {vocab_size}; "
            "give the model a vocab_size that covers the tokenizer"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # as llama.cpp's converter pads a vocabulary
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if i is not None:
            getattr(writer, f"add_{key}_token_id")(i)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# --- the file --------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def export_gguf(
    model,
    tokenizer,
    path: str | Path,
    qtype: str = "f32",
    name: str | None = None,
    log: Callable[[str], None] = _stderr,
) -> GGUFExport:
    """Write `model` (and its tokenizer, when not None) as a GGUF file at `path` with its weights
    in `qtype` (see the top). Each fallback to another format is passed to `log`. Nothing is left
    at `path` unless the whole file was written."""
    from gguf import GGMLQuantizationType, GGUFWriter

    qtype = block_format(qtype).name
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: output directory does not exist; create it first")
    model = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    arch = gguf_arch(model.cfg)
    fallbacks: list[str] = []
    tensors = plan_tensors(model, arch, qtype, fallbacks)
    for line in fallbacks:
        log(line)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    writer = None
    try:
        writer = GGUFWriter(tmp, arch)
        _write_config(writer, model.cfg, arch, qtype, name or path.stem)
        if tokenizer is not None:
            _write_tokenizer(writer, tokenizer, model.cfg.vocab_size)
        for t in tensors:
            gtype = GGMLQuantizationType(FORMATS[t.fmt].ggml_type)
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=gtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for t in tensors:  # one tensor in memory at a time
                rows = t.produce().contiguous()
                if tuple(rows.shape) != t.byte_shape:
                    raise RuntimeError(
                        f"GGUF tensor {t.name}: produced {tuple(rows.shape)} bytes, planned {t.byte_shape}"
                    )
                writer.write_tensor_data(rows.numpy())
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    types: dict[str, int] = {}
    for t in tensors:
        types[t.fmt] = types.get(t.fmt, 0) + 1
    return GGUFExport(
        path=path,
        arch=arch,
        n_tensors=len(tensors),
        tensor_bytes=sum(t.nbytes for t in tensors),
        n_weights=sum(int(np.prod(t.shape)) for t in tensors),
        types=types,
        fallbacks=fallbacks,
    )
