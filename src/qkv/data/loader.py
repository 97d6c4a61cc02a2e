"""Deterministic batches of token windows: batch = f(seed, step, micro), nothing else.

Every optimizer step draws the *global* batch of windows from a generator seeded by
(seed, step, micro) and each process takes its slice. So a resumed run sees exactly the
batches the uninterrupted run saw, and N processes see exactly what one process with the
same global batch sees; no loader state needs saving beyond the step.
"""

from __future__ import annotations

import numpy as np
import torch

from qkv.data.shards import TokenShards

EVAL_STREAM = 1 << 40  # keeps eval windows disjoint from any training step's stream


class WindowSampler:
    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        lengths = np.array([len(a) for a in shards.arrays], dtype=np.int64)
        self.starts_per_shard = np.maximum(lengths - seq_len - 1, 0)
        if self.starts_per_shard.sum() == 0:
            raise ValueError(
                f"{shards.data_dir}: {shards.n_tokens} tokens is fewer than one window of seq_len+1={seq_len + 1}; "
                "use a smaller seq_len or more text"
            )
        self.weights = self.starts_per_shard / self.starts_per_shard.sum()

    def windows(self, stream: tuple[int, ...], n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *stream])
        which = (
            rng.choice(len(self.weights), size=n, p=self.weights)
            if len(self.weights) > 1
            else np.zeros(n, dtype=np.int64)
        )
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for i, s in enumerate(which):
            off = int(rng.integers(0, self.starts_per_shard[s]))
            out[i] = self.shards.arrays[s][off : off + self.seq_len + 1]
        return out

    def batch(self, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        """This process's slice of the global micro-batch (batch_size = global micro-batch)."""
        w = self.windows((step, micro), batch_size)
        per = batch_size // world
        w = torch.from_numpy(w[rank * per : (rank + 1) * per])
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def eval_batch(self, i: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        return self.batch(EVAL_STREAM + i, 0, batch_size, rank, world)
