"""Decode steps with one native call for all the blocks (kernels/decode_layer_f32.c).

A decode step of a small model on CPU is mostly a stream over the weights, and run op by
op from Python a Llama block costs ~0.4 ms of dispatch on top of that. `hidden` runs the
same computation, block by block, in C, reading and writing the same caches (contiguous
or paged, fp32 or int8: an int8 cache gets the new K/V quantized as infer/kv_quant.py
quantizes them and is attended in place), and returns what `model.hidden` would: the
final-norm hidden states. It returns None whenever the model, the step or the cache is
outside what the C block implements (then the caller runs the model's own forward, the
reference the tests hold this path to): RMSNorm or LayerNorm, SwiGLU, GeGLU or GELU MLP
(Llama, Qwen2, Mistral, GPT-2, Gemma 3), RoPE (a second base for sliding-window layers),
learned, sinusoidal or no positions, per-head q/k RMSNorm, norms after each sub-block, a
norm offset (folded into a copy of the weight), an embedding scale, fp32 on CPU, no MoE,
no attention soft-capping, no inspection hooks, one token per sequence. Sliding windows
may differ per layer. Anything else is refused by name (`refusal`, shown by `qkv info`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from qkv.config import ModelConfig
from qkv.infer.kv_cache import Int8KVCache, KVCache
from qkv.infer.paged import PagedKVCache
from qkv.kernels import decode_attention, native, quant_linear
from qkv.model.layers import RMSNorm
from qkv.quant.modules import QuantLinear

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
        + [(n, ctypes.c_int64) for n in ("t_q", "t_k", "t_v", "t_o", "t_gate", "t_up", "t_down")]
        + [
            (n, _P)
            for n in ("q_norm", "k_norm", "post_attn_norm", "post_attn_norm_b", "post_mlp_norm", "post_mlp_norm_b")
        ]
    )


_NORM = {"rmsnorm": 0, "layernorm": 1}
# the C enums: (mlp, gelu_approx); SwiGLU ignores the approximation
_MLP = {("gelu", "tanh"): 1, ("gelu", "none"): 2, ("geglu", "tanh"): 3, ("geglu", "none"): 4}


def _mlp_kind(cfg: ModelConfig) -> int | None:
    return 0 if cfg.mlp == "swiglu" else _MLP.get((cfg.mlp, cfg.gelu_approx))


class _KV(ctypes.Structure):
    _fields_ = [
        ("k", _P),
        ("v", _P),
        ("k_scale", _P),  # int8 caches: one fp32 scale per vector; NULL for fp32
        ("v_scale", _P),
        ("tables", _P),
        ("max_blocks", ctypes.c_int64),
        ("total", _P),
        ("block_size", ctypes.c_int64),
        ("block_stride", ctypes.c_int64),
        ("token_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
    ]


_decode_layers = native.Kernel(
    "decode_layer_f32",
    "qkv_decode_layers_f32",
    [ctypes.POINTER(_Block), ctypes.c_int64, ctypes.POINTER(_KV), _P, _P, ctypes.c_int64, _P, _P, _P, _P, ctypes.c_int],
    ctypes.c_int,
)


# Every ModelConfig field, and what the C block supports of it. A field that is not here
# (a new architecture option) makes `refusal` name it, so a model never runs a block that
# silently ignores part of its config.
_SUPPORTED_FIELDS: dict[str, Callable[[ModelConfig], bool]] = {
    "vocab_size": lambda c: True,
    "n_layer": lambda c: True,
    "d_model": lambda c: True,
    "n_head": lambda c: True,
    "n_kv_head": lambda c: True,
    "head_dim": lambda c: c.head_dim % 8 == 0,
    "d_ff": lambda c: True,
    "max_seq_len": lambda c: True,
    "pos": lambda c: c.pos in ("rope", "learned", "sinusoidal", "none"),
    "rope_theta": lambda c: True,  # baked into the model's cos/sin tables, which this path reads
    "rope_scaling": lambda c: True,  # likewise
    "norm": lambda c: c.norm in _NORM,
    "norm_eps": lambda c: True,
    "norm_bias": lambda c: True,
    "mlp": lambda c: c.mlp in ("swiglu", "gelu", "geglu"),
    "gelu_approx": lambda c: _mlp_kind(c) is not None,
    "qkv_bias": lambda c: True,
    "o_bias": lambda c: True,
    "mlp_bias": lambda c: True,
    "qk_norm": lambda c: True,  # an RMSNorm over each head, whatever cfg.norm is
    "tie_embeddings": lambda c: True,
    "dropout": lambda c: True,  # inference: no dropout
    "sliding_window": lambda c: True,
    "attn_impl": lambda c: c.attn_impl != "math",
    "layer_types": lambda c: True,  # each block's struct carries its own window
    "rope_local_theta": lambda c: True,  # local layers get the local table's angles
    "norm_offset": lambda c: True,  # folded into a copy of each norm's weight (_norm_weights)
    "post_norm": lambda c: True,
    "embed_scale": lambda c: True,  # applied to the embedded token before the blocks
    "query_pre_attn_scalar": lambda c: True,  # read from the attention's scale
    "attn_softcap": lambda c: c.attn_softcap is None,
    "final_softcap": lambda c: True,  # the head's, after this path (backend.logits)
    "n_expert": lambda c: c.n_expert == 0,
    "n_expert_per_token": lambda c: True,  # dense models only (n_expert)
    "moe_renormalize": lambda c: True,
    "moe_d_ff": lambda c: True,
    "moe_dispatch": lambda c: True,
    "router_aux_coef": lambda c: True,
    "router_z_coef": lambda c: True,
    "init_std": lambda c: True,
}


def refusal(cfg: ModelConfig) -> str | None:
    """Why the C block cannot run this architecture (the first config field it does not
    implement, or does not know), or None when it can."""
    for f in dataclasses.fields(cfg):
        check = _SUPPORTED_FIELDS.get(f.name)
        if check is None:
            return f"config field {f.name!r} is unknown to the fused block"
        if not check(cfg):
            return f"{f.name}={getattr(cfg, f.name)!r}"
    return None


_block_sizeof = native.Kernel("decode_layer_f32", "qkv_decode_block_sizeof", [], ctypes.c_int64)
_kv_sizeof = native.Kernel("decode_layer_f32", "qkv_decode_kv_sizeof", [], ctypes.c_int64)
_layout_checked = False


def _decode_kernel():
    """The C function that runs every block of a step, after checking once that the ctypes
    mirrors match the C structs."""
    global _layout_checked
    fn = _decode_layers.get()
    if fn is None or _layout_checked:
        return fn
    for mirror, sizeof in ((_Block, _block_sizeof), (_KV, _kv_sizeof)):
        c_size = sizeof.get()()
        if c_size != ctypes.sizeof(mirror):
            raise RuntimeError(
                f"{mirror.__name__} is {ctypes.sizeof(mirror)} bytes in Python but {c_size} in "
                "kernels/decode_layer_f32.c: make the ctypes fields match the C struct"
            )
    _layout_checked = True
    return fn


def architecture_fits(cfg: ModelConfig) -> bool:
    """Whether a config's blocks are what the C block implements."""
    return refusal(cfg) is None


# the KV cache dtypes (--kv-dtype names) the C block reads and writes in place
FUSED_KV_DTYPES = {"fp32": torch.float32, "int8": torch.int8}


def describe(cfg: ModelConfig, kv_dtype: str | None = None) -> str:
    """How an fp32 CPU decode step of this architecture runs here (for `qkv info`), with a
    KV cache of `kv_dtype` (a --kv-dtype name; None: say which caches the block reads)."""
    if not native.enabled():
        return "PyTorch ops (native kernels off: QKV_NATIVE=0 or no AVX2/FMA CPU)"
    why = refusal(cfg)
    if why is None and kv_dtype is None:
        fused = " or ".join(FUSED_KV_DTYPES)
        return f"one native call per block (kernels/decode_layer_f32.c), {fused} KV cache read in place"
    if why is None and kv_dtype in FUSED_KV_DTYPES:
        return f"one native call per block (kernels/decode_layer_f32.c), {kv_dtype} KV cache read in place"
    if why is None:
        fused = " or ".join(FUSED_KV_DTYPES)
        return f"op by op, native linear kernels (the fused block reads {fused} KV caches, not {kv_dtype})"
    return f"op by op, native linear kernels (the fused block does not implement {why})"


def supports(model) -> bool:
    """Whether the model's architecture and state fit the fused block (any step)."""
    return architecture_fits(model.cfg) and _state_fits(model, [b.attn for b in model.blocks])


def _state_fits(model, attns: list[nn.Module]) -> bool:
    """The state half of supports(), for a model whose blocks' attention modules are `attns`
    (a current view's): without walking the blocks, which is most of its cost a step."""
    return not model.training and not any(a.keep_probs for a in attns) and model.final_norm.weight.device.type == "cpu"


@dataclasses.dataclass
class _View:
    """A model's blocks as the C block sees them, and what makes that view stale: a module,
    parameter or buffer registered on a module it was read from (a module swapped in, a
    weight assigned), or a tensor it points to moved (`.data` assigned, `model.to`), or gone."""

    blocks: ctypes.Array[_Block]  # one C array, every block in order
    attns: list[nn.Module]  # each block's attention (its keep_probs is asked every step)
    registrations: int
    tensors: list[weakref.ref]
    addresses: list[int]
    keep: list[torch.Tensor]  # tensors the view points into that the model does not hold

    def current(self) -> bool:
        if self.registrations != _registrations:
            return False
        for ref, address in zip(self.tensors, self.addresses, strict=True):
            t = ref()
            if t is None or t.data_ptr() != address:
                return False
        return True


# Checking a view costs a pointer read per weight a step; walking the model's parameters and
# buffers instead (nn.Module.parameters(), .buffers()) was ~10,000 Python calls a decode step
# on SmolLM2 (30 blocks), over nine tenths of the step's Python work.
_views: weakref.WeakKeyDictionary[nn.Module, _View] = weakref.WeakKeyDictionary()
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module a view was read from
_registrations = 0  # moves when one of them registers a module, parameter or buffer
_hooks_installed = False


def _on_registration(module: nn.Module, name: str, value) -> None:
    global _registrations
    if module in _watched:
        _registrations += 1


def _watch(modules: list[nn.Module]) -> None:
    global _hooks_installed
    if not _hooks_installed:  # process-wide hooks: torch has no per-module registration hook
        nn.modules.module.register_module_module_registration_hook(_on_registration)
        nn.modules.module.register_module_parameter_registration_hook(_on_registration)
        nn.modules.module.register_module_buffer_registration_hook(_on_registration)
        _hooks_installed = True
    for m in modules:
        _watched.add(m)


def _linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """(storage, bias, type) of a projection the C block can read: a plain fp32 nn.Linear
    (or the native subclass installed for inference; type 0), or a QuantLinear whose
    format the quantized kernel implements (its GGUF blocks, type = the gguf type id);
    None for anything else (bf16, other formats, other modules)."""
    b = module.bias if isinstance(module, (nn.Linear, QuantLinear)) else None
    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
        return None
    if isinstance(module, nn.Linear):
        w = module.weight
        return (w, b, 0) if w.dtype == torch.float32 and w.is_contiguous() else None
    if isinstance(module, QuantLinear) and quant_linear.supported(module.qtype) and module.blocks.is_contiguous():
        return module.blocks, b, module.kernel_type  # the gguf id, or its repacked layout's
    return None


def _norm_weights(module: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """(weight, bias, eps) of an RMSNorm or LayerNorm in fp32. An RMSNorm with an offset
    (Gemma's 1 + weight) gives a new tensor holding offset + weight: the C norm multiplies
    by one factor, and the fold is exact in fp32 (the model adds the offset in fp32 too)."""
    w: torch.Tensor
    if isinstance(module, RMSNorm):
        w, b, eps = module.weight, None, module.eps
        if w.dtype == torch.float32 and module.offset:
            w = module.scale().contiguous()
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        w, b, eps = module.weight, module.bias, module.eps
    else:
        return None
    return (w, b, eps) if w.dtype == torch.float32 and w.is_contiguous() else None


def _block_struct(
    cfg: ModelConfig, blk, layer: int, modules: list[nn.Module], tensors: list[torch.Tensor], keep: list[torch.Tensor]
) -> _Block | None:
    """The C view of one block, read through its public parts: the attention's q/k/v/o
    projections (and q/k norms), the MLP's gate (gated MLPs only)/up/down projections and
    the norms. Appends the modules it read and the model's tensors the view points to (to
    watch), and to `keep` the tensors the view points into that the model does not hold
    (the folded norm weights), which must live as long as the view."""
    a, m = blk.attn, blk.mlp
    projections = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "up": m.up_proj, "down": m.down_proj}
    if cfg.mlp in ("swiglu", "geglu"):
        projections["gate"] = m.gate_proj
    found = {role: _linear_weights(p) for role, p in projections.items()}
    lin = {role: x for role, x in found.items() if x is not None}
    norms = {"attn": blk.attn_norm, "mlp": blk.mlp_norm}
    if cfg.qk_norm:
        norms |= {"q": a.q_norm, "k": a.k_norm}
    if cfg.post_norm:
        norms |= {"post_attn": blk.post_attn_norm, "post_mlp": blk.post_mlp_norm}
    found_norms = {role: _norm_weights(n) for role, n in norms.items()}
    nrm = {role: n for role, n in found_norms.items() if n is not None}
    if len(nrm) < len(found_norms) or len(lin) < len(found):
        return None
    if any(isinstance(n, nn.LayerNorm) for n in (norms.get("q"), norms.get("k"))):
        return None  # the C q/k norms are RMSNorms
    own = {p.data_ptr() for p in blk.parameters()}
    keep += [n[0] for n in nrm.values() if n[0].data_ptr() not in own]
    modules += [blk, a, m, *norms.values(), *projections.values()]
    # watch the model's own norm weights (a folded copy would not see them change)
    norm_tensors = [t for n in norms.values() for t in (n.weight, getattr(n, "bias", None))]
    tensors += [t for t in (*[t for x in lin.values() for t in x[:2]], *norm_tensors) if t is not None]

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    def w(role: str) -> int | None:
        return ptr(lin[role][0]) if role in lin else None

    def b(role: str) -> int | None:
        return ptr(lin[role][1]) if role in lin else None

    def t(role: str) -> int:
        return lin[role][2] if role in lin else 0

    def nw(role: str) -> int | None:
        return ptr(nrm[role][0]) if role in nrm else None

    def nb(role: str) -> int | None:
        return ptr(nrm[role][1]) if role in nrm else None

    struct = _Block(
        cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, nrm["attn"][2], a.scale,
        cfg.window_of(layer) or 0, _NORM[cfg.norm], _mlp_kind(cfg),
        nw("attn"), nb("attn"), w("q"), w("k"), w("v"), b("q"), b("k"), b("v"), w("o"), b("o"),
        nw("mlp"), nb("mlp"), w("gate"), w("up"), w("down"), b("gate"), b("up"), b("down"),
        t("q"), t("k"), t("v"), t("o"), t("gate"), t("up"), t("down"),
        nw("q"), nw("k"), nw("post_attn"), nb("post_attn"), nw("post_mlp"), nb("post_mlp"),
    )  # fmt: skip
    return struct


def _current_view(model) -> _View | None:
    """The C view of each block's weights (see _View), rebuilt when it went stale; None when a
    block does not fit (nothing is cached then: the next step asks again)."""
    view = _views.get(model)
    if view is not None and view.current():
        return view
    registrations = _registrations  # read first: a registration during the build makes it stale
    modules: list[nn.Module] = [model, model.blocks]
    tensors: list[torch.Tensor] = []
    keep: list[torch.Tensor] = []
    out = []
    for layer, blk in enumerate(model.blocks):
        struct = _block_struct(model.cfg, blk, layer, modules, tensors, keep)
        if struct is None:
            return None
        out.append(struct)
    _watch(modules)
    # the model holds the tensors it owns (the view only watches them); the view keeps the rest
    attns = [blk.attn for blk in model.blocks]
    refs, addresses = [weakref.ref(t) for t in tensors], [t.data_ptr() for t in tensors]
    view = _View((_Block * len(out))(*out), attns, registrations, refs, addresses, keep)
    _views[model] = view
    return view


def _kv_scales(cache) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 cache's (k_scale, v_scale), laid out as the C block finds them (a vector's
    scale at its element offset / head_dim: both contiguous, the cache's shape without
    head_dim), or None (no scales, or another layout)."""
    scales = (cache.k_scale, cache.v_scale) if isinstance(cache, Int8KVCache) else getattr(cache, "scales", None)
    if scales is None:
        return None
    fits = all(
        s.dtype == torch.float32 and s.is_contiguous() and s.shape == t.shape[:-1] and t.is_contiguous()
        for s, t in zip(scales, (cache.k, cache.v), strict=True)
    )
    return scales if fits else None


def _kv_layout(cache, B: int):
    """(tables, total, block_size, strides) addressing each row's keys in the cache, or None."""
    if getattr(getattr(cache, "k", None), "dtype", None) not in FUSED_KV_DTYPES.values():
        return None  # other caches attend through the model's path
    if cache.k.dtype == torch.int8 and _kv_scales(cache) is None:
        return None
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
    if T != 1 or tokens.device.type != "cpu" or torch.compiler.is_compiling() or cache.k.device.type != "cpu":
        return None
    if not architecture_fits(model.cfg):
        return None
    view = _current_view(model)
    if view is None or not _state_fits(model, view.attns):
        return None
    layout = _kv_layout(cache, B)
    decode_layers = _decode_kernel()
    if layout is None or decode_layers is None:
        return None
    tables, total, block_size, (block_stride, token_stride, head_stride) = layout
    cfg = model.cfg
    pos = positions.reshape(-1).expand(B) if positions.numel() == 1 else positions.reshape(B)
    x = model.tok_emb(tokens).reshape(B, cfg.d_model).contiguous()
    if cfg.embed_scale != 1.0:
        x *= torch.tensor(cfg.embed_scale, dtype=x.dtype)  # as the model scales it
    cos = sin = local = None
    if cfg.pos == "rope":  # the model's tables, grown first if this step's positions are past them
        glob, loc = model.rope_at(pos)
        cos, sin = glob[0].contiguous(), glob[1].contiguous()
        if loc is not glob:
            local = loc[0].contiguous(), loc[1].contiguous()
    elif cfg.pos == "learned":
        x = x + model.pos_emb(pos)
    elif cfg.pos == "sinusoidal":
        x = x + model.pos_table[pos].to(x.dtype)
    kv = _KV(
        tables=tables.data_ptr(),
        max_blocks=tables.shape[1],
        total=total.data_ptr(),
        block_size=block_size,
        block_stride=block_stride,
        token_stride=token_stride,
        head_stride=head_stride,
    )  # layer 0's K/V (and an int8 cache's scales); the C side steps through the layers
    scales = _kv_scales(cache) if cache.k.dtype == torch.int8 else None
    # each layer's K/V (and scales) by address arithmetic from layer 0's: indexing cache.k[layer]
    # builds a tensor view, ~1.4 us each, 4 a layer
    kv_tensors = (cache.k, cache.v) + (scales if scales is not None else ())
    kv.k, kv.v = cache.k.data_ptr(), cache.v.data_ptr()
    if scales is not None:
        kv.k_scale, kv.v_scale = scales[0].data_ptr(), scales[1].data_ptr()
    layer_bytes = (ctypes.c_int64 * 4)(*[t.stride(0) * t.element_size() for t in kv_tensors])
    angles = (None, None) if cos is None or sin is None else (cos.data_ptr(), sin.data_ptr())
    local_angles = (None, None) if local is None else (local[0].data_ptr(), local[1].data_ptr())
    blocks = view.blocks
    rc = decode_layers(blocks, len(blocks), ctypes.byref(kv), layer_bytes, x.data_ptr(), B, *angles, *local_angles,
                       torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise MemoryError("the fused decode block could not allocate its scratch buffers")
    return model.final_norm(x).view(B, 1, cfg.d_model)
