"""`qkv prepare`: corpus -> trained BPE tokenizer -> train/val token shards + index.json.

The tokenizer is trained on the train split only, and its compression (bytes per token)
is measured on the held-out val split. Everything is validated before the first file is
written, and index.json is written last: a directory without it is not a data dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qkv.data.corpus import load_documents, split_documents
from qkv.data.shards import INDEX, shard_dtype, unigram_entropy, write_split
from qkv.io import atomic_write_text


def prepare(
    source: str = "shakespeare",
    out_dir: str | Path = "data/shakespeare",
    vocab_size: int = 4096,
    val_frac: float = 0.1,
    text_field: str = "text",
    tokenizer_dir: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    shard_tokens: int = 100_000_000,
    log=print,
) -> dict:
    from qkv.tokenizer import Tokenizer, bytes_per_token, train_bpe

    out_dir = Path(out_dir)
    if (out_dir / INDEX).exists() and not force:
        raise ValueError(f"{out_dir} already holds prepared data; pass --force to rebuild it (nothing was overwritten)")
    if tokenizer_dir is None and vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} is too large")
    if tokenizer_dir is None:
        np_dtype = shard_dtype(vocab_size, dtype)  # fail before any work
    t0 = time.perf_counter()
    docs = load_documents(source, text_field)
    train, val = split_documents(docs, val_frac)
    log(
        f"corpus {source}: {len(docs)} documents, {sum(len(d.text) for d in docs):,} chars; "
        f"train {len(train)} / val {len(val)} documents"
    )
    if tokenizer_dir:
        tok = Tokenizer.load(tokenizer_dir)
    else:
        tok = train_bpe((d.text for d in train), vocab_size=vocab_size)
    vocab = tok.vocab_size
    np_dtype = shard_dtype(vocab, dtype)
    eos = tok.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX).unlink(missing_ok=True)  # invalid until the new index is written
    for old in out_dir.glob("*_[0-9][0-9][0-9].bin"):
        old.unlink()
    tok.save(out_dir)
    splits = {}
    counts = None
    for name, part in (("train", train), ("val", val)):
        texts = [d.text for d in part]
        ids = tok.encode_batch(texts)
        shards, c = write_split(out_dir, name, ids, eos, np_dtype, vocab, shard_tokens)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(s["tokens"] for s in shards)
        splits[name] = {"shards": shards, "tokens": n_tokens, "bytes": n_bytes, "documents": [d.name for d in part]}
        if name == "train":
            counts = c
    bpt = bytes_per_token(tok, [d.text for d in val])
    index = {
        "format": "qkv-shards-1",
        "source": source,
        "dtype": np_dtype.name,
        "vocab_size": vocab,
        "eos_id": eos,
        "val_frac": val_frac,
        "bytes_per_token": bpt,  # on held-out val text
        "unigram_entropy": unigram_entropy(counts),  # nats/token, train split
        "splits": splits,
    }
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1) + "\n")
    log(
        f"tokenizer: vocab {vocab}, {bpt:.2f} bytes/token on held-out text; "
        f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens ({np_dtype.name}); "
        f"unigram entropy {index['unigram_entropy']:.3f} nats/token; {time.perf_counter() - t0:.1f}s -> {out_dir}"
    )
    return index
