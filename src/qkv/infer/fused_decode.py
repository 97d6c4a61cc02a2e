"""Decode steps with one native call per block (kernels/decode_layer_f32.c).

A decode step of a small model on CPU is mostly a stream over the weights, and run op
by op from Python a Llama block costs ~0.4 ms of dispatch on top of that. `hidden` runs
the same computation, block by block, in C, reading and writing the same caches
(contiguous or paged), and returns what `model.hidden` would: the final-norm hidden
states. It returns None whenever the model, the step or the cache is outside what the
C block implements (then the caller runs the model's own forward, the reference the
tests hold this path to): RMSNorm or LayerNorm, SwiGLU or GELU MLP (Llama, Qwen2, Mistral,
GPT-2), RoPE, learned, sinusoidal or no positions, fp32 on CPU, no qk-norm, no MoE, no
inspection hooks, one token per sequence.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from qkv.infer.kv_cache import KVCache
from qkv.infer.paged import PagedKVCache
from qkv.kernels import decode_attention, native

_P = ctypes.c_void_p


class _Block(ctypes.Structure):
    _fields_ = (
        [(n, ctypes.c_int64) for n in ("d_model", "n_head", "n_kv_head", "head_dim", "d_ff")]
        + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
        + [(n, ctypes.c_int64) for n in ("window", "norm", "mlp")]
        + [
            (n, _P)
            for n in (
                "attn_norm",
                "attn_norm_b",
                "wq",
                "wk",
                "wv",
                "bq",
                "bk",
                "bv",
                "wo",
                "bo",
                "mlp_norm",
                "mlp_norm_b",
                "w_gate",
                "w_up",
                "w_down",
                "b_gate",
                "b_up",
                "b_down",
            )
        ]
    )


_NORM = {"rmsnorm": 0, "layernorm": 1}
_MLP = {"swiglu": 0, ("gelu", "tanh"): 1, ("gelu", "none"): 2}  # the C enums


class _KV(ctypes.Structure):
    _fields_ = [
        ("k", _P),
        ("v", _P),
        ("tables", _P),
        ("max_blocks", ctypes.c_int64),
        ("total", _P),
        ("block_size", ctypes.c_int64),
        ("block_stride", ctypes.c_int64),
        ("token_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
    ]


_decode_block = native.Kernel(
    "decode_layer_f32",
    "qkv_decode_block_f32",
    [ctypes.POINTER(_Block), ctypes.POINTER(_KV), _P, ctypes.c_int64, _P, _P, ctypes.c_int],
    ctypes.c_int,
)


def architecture_fits(cfg) -> bool:
    """Whether a config's blocks are what the C block implements."""
    return (
        cfg.norm in _NORM
        and cfg.mlp in ("swiglu", "gelu")
        and not cfg.is_moe
        and not cfg.qk_norm
        and cfg.pos in ("rope", "learned", "sinusoidal", "none")
        and cfg.attn_impl != "math"
        and cfg.head_dim % 8 == 0
    )


def describe(cfg) -> str:
    """How an fp32 CPU decode step of this architecture runs here (for `qkv info`)."""
    if not native.enabled():
        return "PyTorch ops (native kernels off: QKV_NATIVE=0 or no AVX2/FMA CPU)"
    if architecture_fits(cfg):
        return "one native call per block (kernels/decode_layer_f32.c)"
    return "op by op, native linear/attention kernels (the fused block has no MoE, qk-norm or attention-only blocks)"


def supports(model) -> bool:
    """Whether the model's architecture and state fit the fused block (any step)."""
    head = model.tok_emb if model.lm_head is None else model.lm_head
    # the stored parameter, not `output_weight`: a quantized head computes that on each access
    w = dict(head.named_parameters(recurse=False)).get("weight")
    return (
        architecture_fits(model.cfg)
        and not model.training
        and not any(b.attn.keep_probs for b in model.blocks)
        and w is not None
        and w.dtype == torch.float32
        and w.device.type == "cpu"
    )


# per model: (its parameters' addresses, the C view of its blocks); gone with the model
_structs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _blocks(model) -> list[_Block]:
    """The C view of each block's weights, rebuilt when any parameter moved."""
    params = list(model.parameters())
    key = tuple(p.data_ptr() for p in params)
    hit = _structs.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    cfg = model.cfg
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    out = []
    for blk in model.blocks:
        a, m, n1, n2 = blk.attn, blk.mlp, blk.attn_norm, blk.mlp_norm
        gate = getattr(m, "gate_proj", None)  # SwiGLU; the GELU MLP has none
        ws = [
            a.q_proj.weight,
            a.k_proj.weight,
            a.v_proj.weight,
            a.o_proj.weight,
            m.up_proj.weight,
            m.down_proj.weight,
            n1.weight,
            n2.weight,
        ] + ([] if gate is None else [gate.weight])
        # a weight computed on access (a quantized module's dequantized `weight`) is a temporary
        # the C view must not point to: only the model's own fp32 parameters qualify
        if not all(isinstance(w, torch.nn.Parameter) and w.is_contiguous() and w.dtype == torch.float32 for w in ws):
            return []
        mlp = _MLP["swiglu"] if gate is not None else _MLP[("gelu", m.approximate)]
        out.append(
            _Block(
                cfg.d_model,
                cfg.n_head,
                cfg.n_kv_head,
                cfg.head_dim,
                cfg.d_ff,
                n1.eps,
                a.scale,
                cfg.sliding_window or 0,
                _NORM[cfg.norm],
                mlp,
                ptr(n1.weight),
                ptr(getattr(n1, "bias", None)),
                ptr(a.q_proj.weight),
                ptr(a.k_proj.weight),
                ptr(a.v_proj.weight),
                ptr(a.q_proj.bias),
                ptr(a.k_proj.bias),
                ptr(a.v_proj.bias),
                ptr(a.o_proj.weight),
                ptr(a.o_proj.bias),
                ptr(n2.weight),
                ptr(getattr(n2, "bias", None)),
                ptr(None if gate is None else gate.weight),
                ptr(m.up_proj.weight),
                ptr(m.down_proj.weight),
                ptr(None if gate is None else gate.bias),
                ptr(m.up_proj.bias),
                ptr(m.down_proj.bias),
            )
        )
    _structs[model] = (key, out)  # the model holds the parameters the pointers point to
    return out


def _kv_layout(cache, B: int):
    """(tables, total, block_size, strides) addressing each row's keys in the cache, or None."""
    if isinstance(cache, KVCache):
        if cache.pos + 1 > cache.max_len or cache.k.shape[1] != B:
            return None  # the model's path raises the clear "cache full" error
        return decode_attention.dense_layout(cache.k[0, :, :, : cache.pos + 1])  # the prefix this step sees
    if isinstance(cache, PagedKVCache) and cache.decode_index is not None:
        tables, total = cache.decode_index
        return tables, total, cache.block_size, cache.k.stride()[1:4]
    return None


@torch.inference_mode()
def hidden(model, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor | None:
    """Final-norm hidden states (B, 1, d) of one decode step, or None where the fused
    path does not apply. tokens: (B, 1); positions: (1,) or (B, 1), clamped to the table."""
    B, T = tokens.shape
    if T != 1 or tokens.device.type != "cpu" or torch.compiler.is_compiling() or not supports(model):
        return None
    if cache.k.dtype != torch.float32 or cache.k.device.type != "cpu":
        return None
    layout = _kv_layout(cache, B)
    blocks = _blocks(model)
    decode_block = _decode_block.get()
    if layout is None or not blocks or decode_block is None:
        return None
    tables, total, block_size, (block_stride, token_stride, head_stride) = layout
    cfg = model.cfg
    pos = positions.reshape(-1).expand(B) if positions.numel() == 1 else positions.reshape(B)
    x = model.tok_emb(tokens).reshape(B, cfg.d_model).contiguous()
    cos = sin = None
    if cfg.pos == "rope":
        cos, sin = model.rope_cos[pos].contiguous(), model.rope_sin[pos].contiguous()
    elif cfg.pos == "learned":
        x = x + model.pos_emb(pos)
    elif cfg.pos == "sinusoidal":
        x = x + model.pos_table[pos].to(x.dtype)
    kv = _KV(
        0, 0, tables.data_ptr(), tables.shape[1], total.data_ptr(), block_size, block_stride, token_stride, head_stride
    )
    n_threads = torch.get_num_threads()
    for layer, blk in enumerate(blocks):
        kv.k, kv.v = cache.k[layer].data_ptr(), cache.v[layer].data_ptr()
        rc = decode_block(
            ctypes.byref(blk),
            ctypes.byref(kv),
            x.data_ptr(),
            B,
            None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(),
            n_threads,
        )
        if rc != 0:
            raise MemoryError("the fused decode block could not allocate its scratch buffers")
    return model.final_norm(x).view(B, 1, cfg.d_model)
