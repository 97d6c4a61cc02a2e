"""Prepare a pretraining corpus: train a byte-level BPE tokenizer and write train/val token shards.

SOURCE is 'shakespeare' (the bundled default, offline), a .txt file, a folder of .txt files,
or a .jsonl file with a text field. The output dir holds tokenizer.json, *_NNN.bin shards
and index.json (with the tokenizer's bytes/token on held-out text).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        nargs="?",
        default="shakespeare",
        help="'shakespeare', a .txt file, a folder of .txt, or a .jsonl file",
    )
    p.add_argument("--out", default="data/shakespeare", help="output data directory")
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size (incl. 256 bytes and special tokens)"
    )
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction held out for validation")
    p.add_argument("--text-field", default="text", help="field holding the text in a .jsonl source")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer dir instead of training one")
    p.add_argument(
        "--shard-dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token id type in shards"
    )
    p.add_argument("--force", action="store_true", help="rebuild an already prepared output dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    from qkv.data.prepare import prepare

    prepare(
        args.source,
        args.out,
        vocab_size=args.vocab_size,
        val_frac=args.val_frac,
        text_field=args.text_field,
        tokenizer_dir=args.tokenizer,
        dtype=args.shard_dtype,
        force=args.force,
    )
    return 0
