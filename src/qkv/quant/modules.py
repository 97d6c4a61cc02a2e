"""Modules that keep their weights in a GGUF block format (formats.py), swapped in for
nn.Linear / nn.Embedding as gpt-fast does for int8/int4 (`quantize_model`).

- `QuantLinear.blocks`: uint8 (out_features, row_bytes), each row the weight row's blocks as
  they lie in a GGUF file; the bias, when there is one, stays an fp32 Parameter.
  forward(x) asks the native quantized matvec (qkv.kernels.quant_linear.linear, int8
  activations, 64 rows a call: a decode step, or in inference mode a prompt in slices) first,
  then the native tiled product (tiled_linear: a tile of weight rows dequantized at a time,
  then torch.mm), and otherwise dequantizes the whole weight and calls F.linear; nothing is
  cached, so memory stays at the quantized size plus one tile. Under autograd (QLoRA: a frozen
  quantized base with trainable adapters) the product is differentiable in x, its backward
  dequantizing a tile of rows at a time (_FrozenQuantMatmul); the blocks themselves never get
  gradients.
- `QuantEmbedding.blocks`: the (vocab, row_bytes) table; forward(idx) dequantizes only the rows
  asked for, and project(h) is h @ table.T (a tied output head) through the tiled product.
- Both expose `weight`, the dequantized fp32 matrix, for code that reads a module's weight
  instead of calling it (the model's fused q/k/v and gate/up products, the tied output head).
  It is the slow path: every access dequantizes the whole matrix into a new tensor (natively
  where the kernels are on; the values are the same bit for bit).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.kernels import quant_linear
from qkv.quant import repack
from qkv.quant.formats import block_format, dequantize, quantize


def _dequantize_all(blocks: torch.Tensor, qtype: str, n_cols: int, code: int) -> torch.Tensor:
    """The whole (rows, n_cols) fp32 matrix of blocks in format qtype, laid out as kernel type
    `code` says (quant_linear.kernel_type): the native kernel where it reads these blocks, else torch."""
    if blocks.device.type == "cpu" and blocks.is_contiguous() and blocks.dim() == 2:
        w = quant_linear.dequantize(blocks, code, n_cols)
        if w is not None:
            return w
    return dequantize(repack.unpacked(blocks, qtype) if code & quant_linear.REPACKED else blocks, qtype, n_cols)


class _Repackable(nn.Module):
    """The `blocks` buffer of a quantized module, in the file's layout or (Q8_0 / Q4_0 / Q5_0, after
    `repack()`) sixteen rows interleaved for the native decode kernel (qkv.quant.repack).
    `kernel_type` is the code every kernel call passes; `gguf_blocks()` the file's bytes. A
    state dict always holds the file's layout, and loading one repacks it again."""

    blocks: torch.Tensor
    qtype: str
    repacked: bool = False
    _borrowed: bool = False  # blocks wrap bytes the module does not own (from_blocks): never written

    @property
    def kernel_type(self) -> int:
        return quant_linear.kernel_type(self.qtype, self.repacked)

    def repack(self) -> bool:
        """Interleave the rows in place where the sixteen-row kernel applies (Q8_0 / Q4_0 / Q5_0, CPU,
        at least 16 rows, bytes this module owns, QKV_REPACK not 0); whether they are now repacked."""
        b = self.blocks
        if not self.repacked and not self._borrowed and repack.enabled() and b.device.type == "cpu":
            if repack.repackable(self.qtype, b.shape[0]) and b.is_contiguous():
                repack.repack_(b, self.qtype)
                self.repacked = True
                self.blocks = b  # re-registered: views that cached the old layout's type code (fused decode) rebuild
        return self.repacked

    def unpack(self) -> None:
        """Back to the file's layout, in place."""
        if self.repacked:
            repack.unpack_(self.blocks, self.qtype)
            self.repacked = False
            self.blocks = self.blocks  # re-registered, as in repack()

    def gguf_blocks(self) -> torch.Tensor:
        """The rows in the file's layout: the buffer itself, or an unpacked copy."""
        return repack.unpacked(self.blocks, self.qtype) if self.repacked else self.blocks

    def weight_rows(self) -> BlockRows:
        """The weight lent a tile of rows at a time (the fused loss's WeightRows), so a frozen
        quantized head is never dequantized whole for a training step."""
        return BlockRows(self, (self.blocks.shape[0], self._cols()), quant_linear.INTERLEAVE if self.repacked else 1)

    def _cols(self) -> int:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.repacked and prefix + "blocks" in destination:
            destination[prefix + "blocks"] = self.gguf_blocks()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        was = self.repacked
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if was and prefix + "blocks" in state_dict:  # the buffer now holds the state's file layout
            self.repacked = False
            self.repack()


class BlockRows:
    """A quantized module's (rows, cols) weight, dequantized a tile of rows at a time
    (qkv.model.loss.WeightRows): `group` is 16 for rows repacked sixteen at a time, whose
    tiles must start on a group."""

    def __init__(self, module: _Repackable, shape: tuple[int, int], group: int):
        self.module, self.shape, self.group = module, shape, group

    def rows(self, start: int, stop: int) -> torch.Tensor:
        m = self.module
        return _dequantize_all(m.blocks[start:stop], m.qtype, self.shape[1], m.kernel_type)


# fp32 elements of W dequantized at a time by a frozen quantized linear's autograd path
# (16 MB: a whole projection of a ~100M-parameter model in one tile, one Python step per layer)
GRAD_TILE_ELEMENTS = 1 << 22


class _FrozenQuantMatmul(torch.autograd.Function):
    """x @ W.T for a frozen W held as blocks, differentiable in x only (QLoRA's base layers):
    the forward keeps no dequantized weight for backward, and the backward dequantizes
    GRAD_TILE_ELEMENTS of W at a time (whole rows) for grad_x = grad_y @ W, so training memory
    stays at the quantized size plus one tile instead of a full fp32 copy of every layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, qtype: str, n_cols: int, code: int) -> torch.Tensor:
        ctx.save_for_backward(blocks)
        ctx.qtype, ctx.n_cols, ctx.code = qtype, n_cols, code
        y = quant_linear.tiled_linear(x, blocks, code)
        if y is None:
            out = torch.empty(*x.shape[:-1], blocks.shape[0], dtype=x.dtype, device=x.device)
            for r0, w in _weight_tiles(blocks, qtype, n_cols, x.dtype, code):
                out[..., r0 : r0 + w.shape[0]] = x @ w.T
            y = out
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (blocks,) = ctx.saved_tensors
        grad_x = None
        for r0, w in _weight_tiles(blocks, ctx.qtype, ctx.n_cols, grad_y.dtype, ctx.code):
            part = grad_y[..., r0 : r0 + w.shape[0]] @ w
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None, None


def _weight_tiles(blocks: torch.Tensor, qtype: str, n_cols: int, dtype: torch.dtype, code: int):
    """(first row, dequantized rows) of W, GRAD_TILE_ELEMENTS at a time (whole sixteen-row
    groups where the rows are repacked)."""
    step = repack.INTERLEAVE if code & quant_linear.REPACKED else 1
    rows = max(step, GRAD_TILE_ELEMENTS // n_cols // step * step)
    for r0 in range(0, blocks.shape[0], rows):
        yield r0, _dequantize_all(blocks[r0 : r0 + rows], qtype, n_cols, code).to(dtype)


class QuantLinear(_Repackable):
    """y = x @ W.T + b with W held as GGUF blocks of format `qtype`."""

    blocks: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, qtype: str, bias: bool = False, device: torch.device | None = None
    ):
        super().__init__()
        fmt = block_format(qtype)
        self.in_features, self.out_features, self.qtype = in_features, out_features, fmt.name
        rows = torch.zeros(out_features, fmt.row_bytes(in_features), dtype=torch.uint8, device=device)
        self.register_buffer("blocks", rows)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, qtype, linear.bias is not None, linear.weight.device)
        q.blocks.copy_(quantize(linear.weight, q.qtype))
        if linear.bias is not None and q.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        return q

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None = None):
        """Wrap GGUF bytes (out_features, row_bytes) as they are (no copy)."""
        q = cls(in_features, blocks.shape[0], qtype, bias=False, device=torch.device("meta"))
        q.blocks, q._borrowed = blocks, True
        q.bias = None if bias is None else nn.Parameter(bias.float())
        dequantize(blocks[:0], q.qtype, in_features)  # the row width check
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return _dequantize_all(self.blocks, self.qtype, self.in_features, self.kernel_type)

    def _cols(self) -> int:
        return self.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight (slow path: a full dequantization per access)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training through a frozen quantized layer
            y = _FrozenQuantMatmul.apply(x, self.blocks, self.qtype, self.in_features, self.kernel_type)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        code = self.kernel_type
        y = quant_linear.linear(x, self.blocks, code, self.bias)  # decode: <= 64 rows, int8 x
        if y is None and x.shape[:-1].numel() > quant_linear.MAX_ROWS and torch.is_inference_mode_enabled():
            y = self._row_kernel_in_slices(x)  # prefill: the same kernel, 64 rows a call
        if y is None:
            y = quant_linear.tiled_linear(x, self.blocks, code, self.bias)  # fp32 GEMM per tile
        if y is not None:
            return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def _row_kernel_in_slices(self, x: torch.Tensor) -> torch.Tensor | None:
        """A prompt's many rows through the decode kernel, 64 rows a call. Its integer dot
        products beat dequantizing tiles for an fp32 GEMM (pp128 of SmolLM2 Q8_0 / Q4_0 on an
        AMD EPYC: 1.5-1.9x with VNNI, 1.3-1.7x with plain AVX-512, 1.3x with AVX2), and its
        rows are independent: a token's product is bitwise the same in a prompt, alone, or
        batched with other requests, as llama.cpp's int8 activations in prefill are too.
        Inference mode only (decoding, scoring): a training step's no-grad passes (DPO's
        reference, GRPO's old log-probs) keep the fp32 tiled product its differentiable
        forward computes, so a policy and its reference agree exactly at the start."""
        rows = x.reshape(-1, x.shape[-1])
        parts = []
        for part in rows.split(quant_linear.MAX_ROWS):
            y = quant_linear.linear(part, self.blocks, self.kernel_type, self.bias)
            if y is None:
                return None
            parts.append(y)
        return torch.cat(parts).reshape(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, qtype={self.qtype}, bias={self.bias is not None}"


class QuantEmbedding(_Repackable):
    """Token embedding table held as GGUF blocks; a lookup dequantizes only the rows it reads."""

    blocks: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, device: torch.device | None = None):
        super().__init__()
        fmt = block_format(qtype)
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, fmt.name
        rows = torch.zeros(num_embeddings, fmt.row_bytes(embedding_dim), dtype=torch.uint8, device=device)
        self.register_buffer("blocks", rows)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, qtype: str) -> QuantEmbedding:
        q = cls(embedding.num_embeddings, embedding.embedding_dim, qtype, embedding.weight.device)
        q.blocks.copy_(quantize(embedding.weight, q.qtype))
        return q

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: str, embedding_dim: int) -> QuantEmbedding:
        """Wrap GGUF bytes (num_embeddings, row_bytes) as they are (no copy)."""
        q = cls(blocks.shape[0], embedding_dim, qtype, device=torch.device("meta"))
        q.blocks, q._borrowed = blocks, True
        dequantize(blocks[:0], q.qtype, embedding_dim)  # the row width check
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return _dequantize_all(self.blocks, self.qtype, self.embedding_dim, self.kernel_type)

    def _cols(self) -> int:
        return self.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 table (slow path: a full dequantization per access; the tied
        output head reads it through Transformer.output_weight)."""
        return self.dequantized_weight()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = repack.rows(self.blocks, self.qtype, idx) if self.repacked else self.blocks[idx]
        return dequantize(rows, self.qtype, self.embedding_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h @ table.T, the logits of a tied output head, for any number of rows: a tile of the
        table dequantized at a time (quant_linear.tiled_linear), or the whole table where that
        does not apply. Never rounds h to int8, so a row's logits depend on its batch only
        through the GEMM's float rounding; decode's few rows take quant_linear.linear instead."""
        y = quant_linear.tiled_linear(h, self.blocks, self.kernel_type)
        return y if y is not None else F.linear(h, self.dequantized_weight().to(h.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def quantize_model(
    model: nn.Module, qtype: str, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> nn.Module:
    """Swap, in place, every nn.Linear / nn.Embedding whose qualified name matches a glob in
    `include` and none in `exclude` for its quantized twin; norms, biases and any other
    parameters stay fp32. Returns the model."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    for name, m in targets:
        try:
            q: nn.Module = (
                QuantLinear.from_linear(m, qtype)
                if isinstance(m, nn.Linear)
                else QuantEmbedding.from_embedding(m, qtype)
            )
        except ValueError as e:
            raise ValueError(f"{name}: {e}; or leave it out with exclude=[{name!r}]") from None
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
    return model


def repack_model(model: nn.Module) -> int:
    """Repack (in place) every quantized module's rows that the sixteen-row kernel reads, for
    decode on this CPU (QKV_REPACK=0: none); how many were repacked."""
    return sum(m.repack() for m in model.modules() if isinstance(m, _Repackable) and not m.repacked)
