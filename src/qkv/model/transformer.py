"""The decoder-only transformer: embeddings -> N x (attention + MLP/MoE) -> norm -> logits.

Each block is pre-norm:   h = x + Attn(Norm(x));   out = h + MLP(Norm(h))
(mlp="none" drops the MLP and its norm: out = h, the attention-only model of
interpretability work, e.g. the induction-head toy in tests/test_inspect_induction.py.)
With post_norm (Gemma's "sandwich"), each sub-block's output is normalised again before
the residual add: h = x + Norm(Attn(Norm(x))). Local layers (cfg.window_of) may rotate
with their own RoPE base (rope_local_theta); the logits may be soft-capped (final_softcap).

Initialisation (GPT-2 style, in one place, `init_weights`): every Linear and Embedding
~ N(0, init_std), biases zero, norm weights one; the projections that write into the
residual stream (o_proj, down_proj, expert w_down) use init_std / sqrt(2 * n_layer) so
the residual's variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.model.attention import Attention, KVCacheLike, causal_mask
from qkv.model.layers import RMSNorm, make_mlp, make_norm
from qkv.model.loss import WeightRows, fused_linear_cross_entropy
from qkv.model.moe import MoE
from qkv.model.positions import rope_table, sinusoidal_table

# Rows of RoPE cos/sin the model computes when built; `rope_at` doubles the tables (up to
# max_seq_len) when a position past them comes. Full tables for a long-context model are
# large next to its weights (Gemma 3 270M: four of 32768 x 256 fp32, 134 MB) and a short
# chat reads a few hundred rows of them.
ROPE_ROWS_AT_BUILD = 1024


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = None if cfg.mlp == "none" else make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe else make_mlp(cfg)
        self.post_attn_norm = make_norm(cfg) if cfg.post_norm else None
        self.post_mlp_norm = make_norm(cfg) if cfg.post_norm and self.mlp is not None else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rope=None, mask=None, cache=None):
        a = self.attn(self.attn_norm(x), rope, mask, cache)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + self.dropout(a)
        if self.mlp is None or self.mlp_norm is None:  # attention-only
            return x
        m = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + self.dropout(m)


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its own normal_ init (init_weights gives every weight its init).
    On the meta device, where loaders build a model before assigning its weights, torch's
    normal_ imports torch._dynamo: about 2 s that every command paid."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Transformer(nn.Module):
    # position tables, registered as non-persistent buffers for the `pos` kinds that use them
    # (the RoPE ones cover the positions seen so far: see rope_at)
    pos_table: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    rope_local_cos: torch.Tensor
    rope_local_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = _embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = _embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        elif cfg.pos == "rope":
            for name, table in self._rope_tables(min(cfg.max_seq_len, ROPE_ROWS_AT_BUILD)).items():
                self.register_buffer(name, table.to(torch.get_default_device()), persistent=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    # --- initialisation ------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, m in self.named_modules():
            if any(p.is_meta for p in m.parameters(recurse=False)):
                continue
            if isinstance(m, nn.Linear):
                writes_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(m.weight, 0.0, resid_std if writes_residual else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, 1.0 - m.offset)  # an identity scale either way
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                bias = getattr(m, "bias", None)  # LayerNorm's, when it has one
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
            elif isinstance(m, MoE):
                nn.init.normal_(m.w_gate, 0.0, std)
                nn.init.normal_(m.w_up, 0.0, std)
                nn.init.normal_(m.w_down, 0.0, resid_std)
        if self.cfg.pos == "rope" and not self.rope_cos.is_meta:
            for name, table in self._rope_tables(self.rope_cos.shape[0]).items():
                getattr(self, name).copy_(table)

    # --- RoPE tables ---------------------------------------------------------------
    def _rope_tables(self, rows: int) -> dict[str, torch.Tensor]:
        """The cos/sin tables (global, and local when local layers have their own base) for
        positions 0..rows-1. Each row depends only on its position, so a longer table's first
        rows are bitwise a shorter one's (tests/test_model.py holds it to that). Computed on the
        CPU whatever the model's device: the same values everywhere, and a model built on the
        meta device (as loaders build one) runs none of torch's meta-tensor Python, which
        imports torch._dynamo (about 2 s)."""
        cfg = self.cfg
        with torch.device("cpu"):
            cos, sin = rope_table(cfg.head_dim, rows, cfg.rope_theta, cfg.rope_scaling)
            tables = {"rope_cos": cos, "rope_sin": sin}
            if cfg.rope_local_theta is not None:
                cos, sin = rope_table(cfg.head_dim, rows, cfg.rope_local_theta)
                tables |= {"rope_local_cos": cos, "rope_local_sin": sin}
        return tables

    def grow_rope_tables(self, rows: int) -> None:
        """Cover positions up to rows - 1: double the tables until they do (at most to
        max_seq_len), cast to the tables' dtype and put on their device, as built."""
        if rows <= self.rope_cos.shape[0]:
            return
        if torch.compiler.is_compiling():  # a compiled forward breaks here; its guards see the new tables
            _grow_outside_the_graph(self, rows)
        else:
            self._grow_rope_tables(rows)

    def _grow_rope_tables(self, rows: int) -> None:
        have = self.rope_cos.shape[0]
        while have < rows:
            have *= 2
        old = self.rope_cos
        # never inference tensors, which a later training step could not use
        with torch.inference_mode(False), torch.no_grad():
            tables = self._rope_tables(min(have, self.cfg.max_seq_len))
            for name, table in tables.items():
                setattr(self, name, table.to(device=old.device, dtype=old.dtype))

    def rope_at(self, positions: torch.Tensor, rows: int | None = None):
        """(cos, sin) of the global and of the local RoPE tables gathered at `positions`
        (same shape + head_dim); the tables grow first if `positions` reach past them.
        `rows`: a bound on the positions when the caller knows one (no read of the max)."""
        if rows is None:
            if torch.compiler.is_compiling():  # a traced graph cannot branch on the positions' values
                rows = self.cfg.max_seq_len
            else:
                rows = int(positions.max()) + 1 if positions.numel() else 0
        if rows > self.rope_cos.shape[0]:
            self.grow_rope_tables(rows)
        glob = (self.rope_cos[positions], self.rope_sin[positions])
        if self.cfg.rope_local_theta is None:
            return glob, glob
        return glob, (self.rope_local_cos[positions], self.rope_local_sin[positions])

    # --- forward -------------------------------------------------------------------
    def hidden(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        key_padding: torch.Tensor | None = None,
        collect: list | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d).

        positions: (T,) or (B, T) absolute positions; default 0..T-1.
        mask: bool (B or 1, 1, T, S), True = may attend; default causal (see attention.py).
        key_padding: bool (B, T), False marks padding (no cache): combined with the causal mask.
        collect: if a list is given, the residual stream after each block is appended to it.
        """
        B, T = idx.shape
        rows = None  # a bound on the positions, when known without reading them
        if positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the model's context "
                    f"max_seq_len={self.cfg.max_seq_len}; truncate the input"
                )
            positions, rows = torch.arange(T, device=idx.device), T
        if mask is None and cache is None and key_padding is not None:
            mask = causal_mask(T, T, idx.device)[None, None]  # each layer narrows it to its window
            if key_padding is not None:
                eye = torch.eye(T, dtype=torch.bool, device=idx.device)
                mask = mask & (key_padding[:, None, None, :].bool() | eye)  # a pad query still sees itself

        x = self.tok_emb(idx)
        if self.cfg.embed_scale != 1.0:  # a scalar of the embedding's dtype, as transformers' Gemma
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = rope_local = None
        if self.cfg.pos == "learned":
            x = x + self.pos_emb(positions)
        elif self.cfg.pos == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        elif self.cfg.pos == "rope":
            pos = positions if positions.dim() == 2 else positions[None]
            glob, local = self.rope_at(pos, rows)
            rope = rope_local = (glob[0].unsqueeze(2), glob[1].unsqueeze(2))
            if local is not glob:
                rope_local = (local[0].unsqueeze(2), local[1].unsqueeze(2))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope if self.cfg.window_of(i) is None else rope_local, mask, cache)
            if collect is not None:
                collect.append(x)
        return self.final_norm(x)

    @property
    def output_weight(self) -> torch.Tensor:
        """(vocab, d) unembedding: the token embedding when tied, else lm_head's weight."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def loss_weight(self) -> torch.Tensor | WeightRows:
        """The head's weight for the fused loss. A head module that lends its weight a tile of
        rows at a time (`weight_rows()`: quantized blocks, frozen) is read that way, so a step
        never holds the whole table in fp32; any other head gives output_weight."""
        head = self.tok_emb if self.lm_head is None else self.lm_head
        lend = getattr(head, "weight_rows", None)
        return lend() if callable(lend) else self.output_weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from hidden states (tied: the token embedding matrix)."""
        return self.softcap(F.linear(h, self.output_weight.to(h.dtype)))

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """cap * tanh(logits / cap) when cfg.final_softcap is set (Gemma 2), else the logits."""
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        key_padding: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position when last_only."""
        h = self.hidden(idx, positions, mask, cache, key_padding)
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    def loss(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_padding: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy, plus the MoE router losses in training.
        Uses the fused linear + cross-entropy (loss.py): the (B, T, vocab) logits are never
        stored whole."""
        h = self.hidden(idx, positions, key_padding=key_padding)
        if self.cfg.final_softcap is None:
            loss = fused_linear_cross_entropy(h, self.loss_weight(), targets, ignore_index)
        else:  # the fused loss has no soft-cap: the logits are stored whole
            logits = self.head(h).float()
            loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
        aux = self.aux_loss() if self.training else None
        return loss if aux is None else loss + aux

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' router losses from the last training forward (None if dense)."""
        losses = [
            b.mlp.last_aux_loss for b in self.blocks if isinstance(b.mlp, MoE) and b.mlp.last_aux_loss is not None
        ]
        return torch.stack(losses).sum() if losses else None


@dataclass
class ParamCounts:
    total: int
    active: int  # per token: only top-k experts count in MoE layers
    embedding: int  # token + position embeddings, and the output head when untied

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def count_params(model: Transformer) -> ParamCounts:
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_emb.weight.numel()
    if cfg.pos == "learned":
        embedding += model.pos_emb.weight.numel()
    if model.lm_head is not None:
        embedding += model.lm_head.weight.numel()
    inactive = 0
    for b in model.blocks:
        if isinstance(b.mlp, MoE):
            per_expert = (b.mlp.w_gate.numel() + b.mlp.w_up.numel() + b.mlp.w_down.numel()) // cfg.n_expert
            inactive += (cfg.n_expert - cfg.n_expert_per_token) * per_expert
    return ParamCounts(total=total, active=total - inactive, embedding=embedding)


def _grow_outside_the_graph(model: Transformer, rows: int) -> None:
    """Transformer._grow_rope_tables run eagerly from a compiled forward (torch.compiler.disable,
    applied here because only a compiled forward gets here and torch._dynamo is then loaded)."""
    torch.compiler.disable(model._grow_rope_tables)(rows)


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Build on any device; 'meta' builds the module tree without memory (for counting)."""
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype) if dtype != torch.float32 else model
