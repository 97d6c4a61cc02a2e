"""Preparing a model for inference: which implementation runs each of its modules.

The model (qkv/model) is plain PyTorch: nn.Linear, RMSNorm, the attention written out.
Faster implementations are installed *behind* those modules by the inference side, once,
when a model is prepared (gpt-fast swaps in its quantized linears the same way):

- backend "native": each nn.Linear becomes a `NativeLinear` and each RMSNorm a
  `NativeRMSNorm` (same parameters, same state-dict names; the few-row products and norms
  of decode go to qkv's C kernels, everything else to PyTorch). Decode steps of the
  architectures the fused block covers run one C call per block (fused_decode.py), and
  the logits projection runs the native linear kernel.
- backend "torch": PyTorch's ops only, the reference every native path is tested against.

`prepare_for_inference(model)` is idempotent and cheap to call again; the engine and
`generate` call it. The swapped modules fall back to PyTorch whenever autograd, another
dtype or device, or torch.compile is involved, so a prepared model can still be trained.
"""

from __future__ import annotations

import weakref
from typing import Literal, TypeVar

import torch
import torch.nn as nn

from qkv.infer import fused_decode
from qkv.kernels import cpu_linear, decode_ops, native, quant_linear
from qkv.model.layers import RMSNorm
from qkv.quant.modules import QuantEmbedding, QuantLinear, repack_model

Backend = Literal["native", "torch"]
M = TypeVar("M", bound=nn.Module)


class NativeLinear(nn.Linear):
    """nn.Linear whose few-row inference products go to the native kernel (kernels/linear_f32.c)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, self.weight, self.bias)


class NativeRMSNorm(RMSNorm):
    """RMSNorm with the native kernel for the few rows of a decode step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset and decode_ops.applies(x, self.weight, rows=x.numel() // x.shape[-1]):
            return decode_ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


# plain module type -> its native counterpart (the reverse map restores the plain one)
_NATIVE: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: NativeLinear, RMSNorm: NativeRMSNorm}
_PLAIN = {v: k for k, v in _NATIVE.items()}

_prepared: weakref.WeakKeyDictionary[nn.Module, Backend] = weakref.WeakKeyDictionary()


def default_backend() -> Backend:
    """ "native" where the kernels can run here (x86 with AVX2/FMA, QKV_NATIVE not 0)."""
    return "native" if native.enabled() else "torch"


def prepare_for_inference(model: M, backend: Backend | None = None) -> M:
    """Install `backend`'s implementations behind the model's modules (in place) and
    return the model. Parameters are shared, never copied. backend=None keeps the one the
    model was prepared with, or takes `default_backend()` for a model not prepared yet."""
    backend = backend or _prepared.get(model) or default_backend()
    if backend not in ("native", "torch"):
        raise ValueError(f"unknown inference backend {backend!r}; choose native or torch")
    if _prepared.get(model) == backend:
        return model
    table = _NATIVE if backend == "native" else _PLAIN
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            target = table.get(type(child))
            if target is not None:
                setattr(parent, name, _rebuild(child, target))
    if backend == "native":  # Q8_0 / Q4_0 rows interleaved for the decode kernel, once (QKV_REPACK=0: not)
        repack_model(model)
    _prepared[model] = backend
    return model


def backend_of(model: nn.Module) -> Backend | None:
    """The backend a model was prepared with, or None."""
    return _prepared.get(model)


def _rebuild(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of class `cls` holding the same parameters, buffers and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)  # parameters, buffers, hooks and plain attributes
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


@torch.inference_mode()
def hidden(model, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None = None):
    """Final-norm hidden states of one forward at `positions` through `cache`: one native
    call per block for decode steps where the fused path applies (it applies the model's
    sliding window itself), else the model's own forward with `mask`."""
    h = None
    if _prepared.get(model) == "native":
        h = fused_decode.hidden(model, tokens, positions, cache)
    if h is None:
        h = model.hidden(tokens, positions=positions, mask=mask, cache=cache)
    return h


def logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's head on hidden states: the native kernels (fp32 or quantized) for a
    decode step's rows; a quantized head is read as blocks, never dequantized per step."""
    head = model.tok_emb if model.lm_head is None else model.lm_head
    if isinstance(head, QuantLinear):
        y = head(h)
    elif isinstance(head, QuantEmbedding):  # a tied, quantized embedding
        y = quant_linear.linear(h, head.blocks, head.kernel_type) if _prepared.get(model) == "native" else None
        y = y if y is not None else head.project(h)
    elif _prepared.get(model) == "native":
        y = cpu_linear.linear(h, model.output_weight.to(h.dtype))
    else:
        return model.head(h)
    return model.softcap(y)  # the model's final soft-cap (Gemma 2), when it has one
