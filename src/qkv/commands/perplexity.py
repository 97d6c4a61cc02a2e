"""Perplexity of a model on a text file (non-overlapping windows, as llama-perplexity reports it).

Every token of a window but its first is scored; the figure is exp(mean NLL) with its
standard error. Compare formats of one model on the same text (fp32 vs Q8_0 vs Q4_0).
"""

from __future__ import annotations

import argparse

from qkv.commands._weights import add_kv_dtype_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="qkv checkpoint dir, Hugging Face dir or GGUF file")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--threads", type=int, default=None, help="CPU threads; None: torch's own choice")
    add_kv_dtype_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from qkv.eval.perplexity import perplexity
    from qkv.infer.kv_quant import kv_dtype
    from qkv.interop import load

    if args.threads:
        torch.set_num_threads(args.threads)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"{args.text}: no such text file")
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; perplexity needs one to encode the text")
    tokens = tokenizer.encode(text_path.read_text(encoding="utf-8"))
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    cache_dtype = kv_dtype(args.kv_dtype, next(model.parameters()).dtype)
    result = perplexity(model, tokens, args.ctx, progress=not args.no_progress, kv_dtype=cache_dtype)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(
            f"perplexity {result.ppl:.4f} ± {result.ppl_stderr:.4f} "
            f"({result.tokens_scored} tokens scored in {result.windows} windows of {args.ctx})"
        )
    return 0
