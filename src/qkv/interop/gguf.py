"""GGUF (llama.cpp's single-file format) -> qkv: config, dequantised weights, tokenizer, chat
template.

- Config comes from `{arch}.*` metadata keys (block_count, embedding_length, head counts,
  rope.freq_base, ...). Architectures: llama (also Mistral/SmolLM2/Llama 3 files, and
  Mixtral-style MoE stored as llama with `ffn_*_exps`), qwen2 and gemma3. A gemma3 file does not
  store what llama.cpp hard-codes for it, so qkv assumes the same: every 6th layer global (the
  rest local, `attention.sliding_window` wide), local RoPE base 10000, query_pre_attn_scalar =
  head_dim (llama.cpp's rule for all but the 27B), embeddings scaled by sqrt(d_model). Its norm
  weights already hold the whole scale (the converter adds Gemma's 1), so norm_offset is 0.
- Weights, by default (`import_gguf(path, dequantize=False)`), stay in the file's block format:
  the token embedding and every attention / MLP projection in a format qkv.quant knows (q8_0,
  q4_0/1, q5_0/1, q4_k, q5_k, q6_k, f16, bf16) become a QuantEmbedding / QuantLinear holding
  the file's bytes, so the model takes about the file's size in memory. Everything else (1-D
  norms and biases, f32 tensors, MoE experts, other quant types) is dequantised to fp32 with
  `gguf.quants.dequantize`, as is everything with `dequantize=True`.
  A GGUF tensor of ne=[in, out] reads as a (out, in) array: already PyTorch's layout, and each
  quantized row is whole blocks, so rows can be reordered as bytes.
- The file is read by qkv.interop.gguf_file (metadata as Python values, tensors as views of one
  read-only map, every size checked against the bytes that remain); every tensor's byte size is
  checked against its declared shape and type before use.
- llama.cpp's converter permutes the rows of Q and K of llama models so its rope kernel can
  rotate adjacent pairs (x0, x1); qkv (like transformers) rotates halves (x_i, x_{i+d/2}).
  `unpermute` reverses it per head: rows [h, (i, pair)] -> [h, (pair, i)].
- Tokenizer: `tokenizer.ggml.model == "gpt2"` is byte-level BPE (tokens + merges), rebuilt as a
  `tokenizers` BPE the way transformers does it, with CONTROL tokens added as special tokens.
  Sentencepiece-style ("llama") vocabularies of gemma files are rebuilt as transformers does: a
  BPE with byte fallback whose merges come from the vocabulary, best first in file order; other
  "llama" vocabularies are not rebuilt: the model imports without a tokenizer.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qkv.config import ModelConfig
from qkv.interop.gguf_file import GGUFFile

if TYPE_CHECKING:
    from qkv.tokenizer import Tokenizer

SUPPORTED = ("llama", "qwen2", "gemma3")
GEMMA3_SWA_PATTERN = 6  # llama.cpp: layer i is global when (i + 1) % 6 == 0
GEMMA3_LOCAL_ROPE_BASE = 10000.0

# pre-tokenizer split patterns by `tokenizer.ggml.pre` (others use GPT-2's byte-level regex)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def open_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return GGUFFile(path)


_VOCABULARY_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
)


def _fields(reader: GGUFFile) -> dict:
    """The metadata without the vocabulary-sized arrays (the tokenizer reads those itself)."""
    return {name: value for name, value in reader.fields.items() if name not in _VOCABULARY_ARRAYS}


def config_from_gguf(reader, source: Path) -> ModelConfig:
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; qkv imports {', '.join(SUPPORTED)}")
    names = {t.name for t in reader.tensors}

    def key(k, default=None):
        v = meta.get(f"{arch}.{k}", default)
        if v is None:
            raise ValueError(f"{source}: GGUF metadata key {arch}.{k} is missing")
        return v

    n_head = int(key("attention.head_count"))
    d = int(key("embedding_length"))
    derived = d // n_head if n_head > 0 else 0  # n_head <= 0 is refused by ModelConfig with the file named
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or derived)
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ValueError(f"{source}: GGUF tensor 'token_embd.weight' is missing")
    vocab = int(emb.shape[1])  # ne = [d_model, vocab]
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise ValueError(f"{source}: GGUF rope scaling {kind!r} is not supported (linear only)")
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    cfg = dict(
        vocab_size=int(vocab),
        n_layer=int(key("block_count")),
        d_model=d,
        n_head=n_head,
        n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv") or n_head),
        head_dim=head_dim,
        d_ff=int(key("feed_forward_length")),
        max_seq_len=int(key("context_length")),
        pos="rope",
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        mlp="swiglu",
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
    )
    if n_expert:
        cfg.update(n_expert=n_expert, n_expert_per_token=int(key("expert_used_count")), moe_renormalize=True)
    if arch == "gemma3":
        n_layer, pattern = int(key("block_count")), int(meta.get(f"{arch}.attention.sliding_window_pattern", 0) or 0)
        pattern = pattern or GEMMA3_SWA_PATTERN
        cap = meta.get(f"{arch}.final_logit_softcapping")
        cfg.update(
            mlp="geglu",
            gelu_approx="tanh",
            qk_norm=True,
            post_norm=True,
            norm_offset=0.0,
            embed_scale=d**0.5,
            sliding_window=int(key("attention.sliding_window")),
            layer_types=["global" if (i + 1) % pattern == 0 else "local" for i in range(n_layer)],
            rope_local_theta=float(meta.get(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
            query_pre_attn_scalar=head_dim,
            final_softcap=None if cap is None else float(cap),
        )
    try:
        return ModelConfig(**cfg)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


@dataclass
class QuantizedRows:
    """A 2-D GGUF tensor kept as its file bytes: (rows, row_bytes) uint8 in format `qtype`."""

    blocks: torch.Tensor
    qtype: str


Weight = torch.Tensor | QuantizedRows

# the modules whose weights may stay quantized: the token embedding and the dense projections
_QUANTIZABLE = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def unpermute(w: Weight, n_head: int) -> Weight:
    """Undo llama.cpp's Q/K row permutation (adjacent-pair rope -> rotate-half rope). Quantized
    rows are moved whole (a row is whole blocks)."""
    if isinstance(w, QuantizedRows):
        return QuantizedRows(unpermute(w.blocks, n_head), w.qtype)
    out_dim = w.shape[0]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_tensor_sizes(reader, source: Path) -> None:
    """Each tensor's bytes must be what its shape and type declare and lie inside the file,
    clear of the next tensor: a one-line error naming the first tensor that is not."""
    from gguf import GGML_QUANT_SIZES

    file_end = len(reader.data)
    ordered = sorted(reader.tensors, key=lambda t: t.data_offset)
    for t, nxt in zip(ordered, ordered[1:] + [None]):
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        n = int(np.prod([int(x) for x in t.shape]))
        expected = n // block * size
        room = (file_end if nxt is None else nxt.data_offset) - t.data_offset
        held = min(int(t.data.nbytes), room)
        if n % block or held < expected:
            shape = [int(x) for x in t.shape]
            raise ValueError(
                f"{source}: GGUF tensor {t.name!r} declares shape {shape} of {t.tensor_type.name} "
                f"({expected} bytes) but the file holds {held} bytes for it; the file is corrupt, re-export it"
            )


def _dequantize(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    arr = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))  # F32 tensors are read-only views


def _file_rows(tensor) -> QuantizedRows:
    """The tensor's bytes as (rows, row_bytes) uint8, a view of the file (copied on load)."""
    arr = tensor.data if tensor.data.dtype == np.uint8 else tensor.data.view(np.uint8)  # f16 reads as float16
    with warnings.catch_warnings():  # the reader's memmap is read-only; it is only ever read from
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(arr)
    return QuantizedRows(blocks, tensor.tensor_type.name.lower())


def state_from_gguf(reader, cfg: ModelConfig, source: Path, dequantize: bool = True) -> dict[str, Weight]:
    """qkv state-dict names -> fp32 tensors, or QuantizedRows for the weights kept quantized
    when `dequantize` is False."""
    from qkv.quant import FORMATS

    arch = _fields(reader).get("general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    keep = {name for name in FORMATS if name != "f32"}  # f32 is already what a Linear holds

    def take(name: str) -> Weight:
        if name not in tensors:
            raise ValueError(f"{source}: GGUF tensor {name!r} is missing")
        t = tensors.pop(name)
        kind = name.split(".")[-2]  # blk.3.attn_q.weight -> attn_q
        if not dequantize and len(t.shape) == 2 and kind in _QUANTIZABLE and t.tensor_type.name.lower() in keep:
            return _file_rows(t)
        return _dequantize(t)

    out = {"tok_emb.weight": take("token_embd.weight"), "final_norm.weight": take("output_norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("output.weight")
    permute = arch == "llama"  # llama.cpp permutes Q/K for llama only (qwen2, gemma3 use neox-style rope)
    norms = [("attn_norm", "attn_norm"), ("ffn_norm", "mlp_norm")]
    if cfg.post_norm:
        norms += [("post_attention_norm", "post_attn_norm"), ("post_ffw_norm", "post_mlp_norm")]
    if cfg.qk_norm:
        norms += [("attn_q_norm", "attn.q_norm"), ("attn_k_norm", "attn.k_norm")]
    for i in range(cfg.n_layer):
        p, q = f"blk.{i}.", f"blocks.{i}."
        for gguf_name, qkv_name in norms:
            out[q + qkv_name + ".weight"] = take(p + gguf_name + ".weight")
        wq, wk = take(p + "attn_q.weight"), take(p + "attn_k.weight")
        out[q + "attn.q_proj.weight"] = unpermute(wq, cfg.n_head) if permute else wq
        out[q + "attn.k_proj.weight"] = unpermute(wk, cfg.n_kv_head) if permute else wk
        out[q + "attn.v_proj.weight"] = take(p + "attn_v.weight")
        out[q + "attn.o_proj.weight"] = take(p + "attn_output.weight")
        if cfg.qkv_bias:
            bq, bk = take(p + "attn_q.bias"), take(p + "attn_k.bias")
            out[q + "attn.q_proj.bias"] = unpermute(bq, cfg.n_head) if permute else bq
            out[q + "attn.k_proj.bias"] = unpermute(bk, cfg.n_kv_head) if permute else bk
            out[q + "attn.v_proj.bias"] = take(p + "attn_v.bias")
        if cfg.is_moe:  # stacked (E, out, in) -> qkv's (E, in, out)
            out[q + "mlp.router.weight"] = take(p + "ffn_gate_inp.weight")
            out[q + "mlp.w_gate"] = take(p + "ffn_gate_exps.weight").transpose(1, 2).contiguous()
            out[q + "mlp.w_up"] = take(p + "ffn_up_exps.weight").transpose(1, 2).contiguous()
            out[q + "mlp.w_down"] = take(p + "ffn_down_exps.weight").transpose(1, 2).contiguous()
        else:
            for n in ("gate", "up", "down"):
                out[q + f"mlp.{n}_proj.weight"] = take(p + f"ffn_{n}.weight")
    tensors.pop("rope_freqs.weight", None)  # llama 3.1 files store the scaled frequencies too
    if tensors:
        extra = sorted(tensors)
        print(f"warning: {source}: ignoring GGUF tensors {extra[:5]}{'...' if len(extra) > 5 else ''}", file=sys.stderr)
    return out


def tokenizer_from_gguf(reader, source: Path):
    """A qkv Tokenizer for byte-level BPE vocabularies, or None (with a warning) otherwise."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    meta = _fields(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None  # the file carries no vocabulary
    if kind == "llama" and meta.get("general.architecture") == "gemma3":
        return _gemma_tokenizer(reader, meta)
    if kind != "gpt2":
        print(
            f"warning: {source}: GGUF tokenizer type {kind!r} is not rebuilt (only byte-level BPE 'gpt2'); "
            "the model is imported without a tokenizer",
            file=sys.stderr,
        )
        return None
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"]]

    # a token outside the byte alphabet is respelled byte by byte, as transformers does
    spelling = pre_tokenizers.ByteLevel.alphabet()
    byte_map = _bytes_to_unicode()
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t if set(t) <= set(spelling) else "".join(byte_map[b] for b in t.encode("utf-8"))] = i
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    alphabet = set(spelling)
    return _with_added_tokens(backend, tokens, types, meta, lambda t: set(t) <= alphabet)


def _gemma_tokenizer(reader, meta: dict):
    """Gemma's sentencepiece vocabulary as a `tokenizers` BPE with byte fallback, built the way
    transformers builds it from a GGUF (GemmaTokenizer): spaces become "▁"; the file lists no
    merges, so every split of a token into two vocabulary pieces is a merge, ranked by the
    token's position in the file (Gemma's scores do not follow its merge order)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    fields = reader.fields
    # a token of blanks is stored as spaces but looked up as "▁"s
    stored = fields["tokenizer.ggml.tokens"]
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in stored]
    types = fields.get("tokenizer.ggml.token_type", [])
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[int, int, int, str, str]] = []
    for merged, index in vocab.items():
        for k in range(1, len(merged)):
            a, b = merged[:k], merged[k:]
            if a in vocab and b in vocab:
                ranked.append((index, -len(a), -len(b), a, b))
    ranked.sort(key=lambda r: r[:3])  # the earliest merged token first, then the longest left piece
    merges = [(a, b) for *_, a, b in ranked]
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 3))]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _with_added_tokens(backend, tokens, types, meta, lambda t: True)


def _with_added_tokens(backend, tokens: list[str], types: list[int], meta: dict, spellable) -> Tokenizer:
    """The qkv Tokenizer around `backend` once the file's CONTROL tokens (those `spellable`
    says the vocabulary can hold) are added as special tokens and USER_DEFINED ones as plain
    added tokens, with bos/eos/pad and the chat template from the metadata."""
    from tokenizers import AddedToken

    from qkv.tokenizer import Tokenizer

    special = [
        AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == CONTROL and spellable(t)
    ]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tokenizer = Tokenizer(
        backend,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tok("bos_token_id"),
        eos_token=tok("eos_token_id"),
        pad_token=tok("padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    # end of turn and end of message (Llama 3.1's tool calls) end generation as eos does
    tokenizer.end_tokens = tuple(t for t in (tok("eot_token_id"), tok("eom_token_id")) if t is not None)
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_quantized(cfg: ModelConfig, state: dict[str, Weight], source: Path):
    """A Transformer holding `state` on the CPU, each QuantizedRows weight in a QuantEmbedding /
    QuantLinear of its format in place of the nn.Embedding / nn.Linear (built on the meta
    device, swapped, allocated, then loaded with names and shapes checked)."""
    import torch.nn as nn

    from qkv.checkpoint import check_state, load_state_into
    from qkv.model import build_model
    from qkv.quant import QuantEmbedding, QuantLinear

    model = build_model(cfg, device="meta")
    state = dict(state)
    for key, w in list(state.items()):
        if not isinstance(w, QuantizedRows):
            continue
        name = key.removesuffix(".weight")
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, w.qtype, device="meta")
        else:
            new = QuantLinear(old.in_features, old.out_features, w.qtype, bias=old.bias is not None, device="meta")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        state[name + ".blocks"] = state.pop(key).blocks
    check_state(model, state, source)  # before to_empty: metadata that disagrees with the tensors allocates nothing
    model.to_empty(device="cpu")
    load_state_into(model, state, source)
    twin = dict(build_model(cfg.replace(n_layer=1, vocab_size=1, n_expert=0, layer_types=None)).named_buffers())
    for name, buf in model.named_buffers():  # RoPE / sinusoidal tables
        if name not in state:
            buf.copy_(twin[name])
    return model.eval()


def import_gguf(path: str | Path, dequantize: bool = True):
    """(Transformer, Tokenizer | None) from a GGUF file on the CPU: dequantised to fp32, or with
    its quantized weights kept as they are in the file (`dequantize=False`; see the top)."""
    from qkv.interop.hf import build_with_state

    path = Path(path)
    reader = open_gguf(path)
    check_tensor_sizes(reader, path)
    cfg = config_from_gguf(reader, path)
    state = state_from_gguf(reader, cfg, path, dequantize=dequantize)
    model = build_with_state(cfg, state, path) if dequantize else build_quantized(cfg, state, path)
    return model, tokenizer_from_gguf(reader, path)
