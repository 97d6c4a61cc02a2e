"""Token shards: a split's tokens as flat binary files read through np.memmap.

    data_dir/train_000.bin ...   uint16 token ids (uint32 when the vocabulary needs it)
    data_dir/val_000.bin
    data_dir/index.json          dtype, vocab, per-shard token counts, bytes per token, ...

Documents are concatenated with the end-of-text token after each, so the model learns
where a text ends. Memory-mapping means a run never loads the corpus into RAM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

INDEX = "index.json"


def shard_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    dtype = np.dtype(requested)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"shard dtype {requested!r}: choose uint16, uint32 or auto")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(
            f"vocab_size={vocab_size} does not fit in {dtype.name} token shards (max {np.iinfo(dtype).max + 1}); "
            "use --shard-dtype uint32 (or auto)"
        )
    return dtype


class ShardWriter:
    """Appends token arrays to name_000.bin, name_001.bin, ... rolling over at shard_tokens."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, shard_tokens: int = 100_000_000):
        self.directory, self.name, self.dtype, self.shard_tokens = Path(directory), name, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def _open(self) -> None:
        fname = f"{self.name}_{len(self.shards):03d}.bin"
        self._tmp = self.directory / f".{fname}.tmp"
        self._final = self.directory / fname
        self._f = open(self._tmp, "wb")
        self._n = 0

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._final)
        self.shards.append({"file": self._final.name, "tokens": self._n})
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            if self._f is None:
                self._open()
            room = self.shard_tokens - self._n
            chunk, ids = ids[:room], ids[room:]
            self._f.write(chunk.tobytes())
            self._n += len(chunk)
            if self._n >= self.shard_tokens:
                self._close()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def write_split(
    directory: Path,
    name: str,
    token_lists: Iterable[list[int]],
    eos_id: int,
    dtype: np.dtype,
    vocab_size: int,
    shard_tokens: int = 100_000_000,
) -> tuple[list[dict], np.ndarray]:
    """Write one split's shards; returns (shard entries, token counts per id)."""
    writer = ShardWriter(directory, name, dtype, shard_tokens)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in token_lists:
        arr = np.asarray(list(ids) + [eos_id], dtype=np.int64)
        counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
        writer.write(arr)
    return writer.finish(), counts


class TokenShards:
    """The memory-mapped shards of one split of a prepared data dir."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.index = read_index(self.data_dir)
        if split not in self.index["splits"]:
            raise ValueError(f"{self.data_dir}: no {split!r} split in {INDEX}")
        dtype = np.dtype(self.index["dtype"])
        self.arrays: list[np.ndarray] = []
        for entry in self.index["splits"][split]["shards"]:
            path = self.data_dir / entry["file"]
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {INDEX} is missing; run `qkv prepare` again")
            expected = entry["tokens"] * dtype.itemsize
            if path.stat().st_size != expected:
                raise ValueError(
                    f"{path}: {path.stat().st_size} bytes, index says {expected}; "
                    "the shard is truncated, run `qkv prepare` again"
                )
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.n_tokens = sum(len(a) for a in self.arrays)

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])


def read_index(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / INDEX
    if not data_dir.exists():
        raise FileNotFoundError(f"{data_dir}: no such data directory; create it with `qkv prepare --out {data_dir}`")
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; {data_dir} is not a prepared data dir (run `qkv prepare --out {data_dir}`)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt ({e}); run `qkv prepare` again") from None


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best model
    that ignores context, the bar a language model must clear."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
