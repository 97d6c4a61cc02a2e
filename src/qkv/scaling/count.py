"""Parameter counts from a config alone: the model is built on the meta device (no memory,
no init), then counted by qkv.model.count_params. Total vs active (MoE: only the top-k
experts a token visits are active), each with and without embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from qkv.config import ModelConfig, preset
from qkv.model import build_model, count_params


@dataclass
class Counts:
    total: int
    active: int
    total_nonembed: int
    active_nonembed: int
    embedding: int

    def as_row(self) -> dict[str, int]:
        """The runs-table columns: N / N_nonembed are per-token (active) counts."""
        return {
            "N": self.active,
            "N_nonembed": self.active_nonembed,
            "N_total": self.total,
            "N_total_nonembed": self.total_nonembed,
        }


def count_config(cfg: ModelConfig | str) -> Counts:
    if isinstance(cfg, str):
        cfg = preset(cfg)
    c = count_params(build_model(cfg, device="meta"))
    return Counts(
        total=c.total,
        active=c.active,
        total_nonembed=c.total_non_embedding,
        active_nonembed=c.active_non_embedding,
        embedding=c.embedding,
    )
