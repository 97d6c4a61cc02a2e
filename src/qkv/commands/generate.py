"""Generate text from a prompt with the KV-cached engine (streams tokens as they come).

MODEL is a qkv checkpoint directory, a Hugging Face directory or a GGUF file. With
--chat the prompt is sent as one user message through the model's chat template.
With --draft a smaller model sharing the tokenizer proposes --spec-k tokens at a time
(speculative decoding: same output distribution, fewer target passes).
"""

from __future__ import annotations

import argparse
import sys
import time

from qkv.commands._weights import add_dtype_argument


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, in [-2, 2]")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="qkv checkpoint dir, Hugging Face dir or .gguf file")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message via the chat template")
    p.add_argument("--n", type=int, default=1, help="independent samples of the same prompt (share its KV blocks)")
    p.add_argument("--draft", default=None, help="draft model for speculative decoding (same tokenizer)")
    p.add_argument("--spec-k", type=int, default=4, help="tokens the draft proposes per target pass")
    p.add_argument("--stats", action="store_true", help="print tokens/s and cache figures to stderr")
    add_sampling_arguments(p)
    add_constraint_arguments(p)


# --- structured output: the reply must match a JSON schema, a regex or one of some strings ---


def add_constraint_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE", help="reply is JSON valid under this schema file")
    g.add_argument("--regex", default=None, help="reply matches this regular expression")
    g.add_argument("--choice", default=None, help="reply is one of these comma-separated strings")


def constraint_from_args(args: argparse.Namespace):
    """The Constraint the options ask for (None without one); bad ones fail before loading."""
    import json

    from qkv.infer.constraints import Constraint

    c = None
    if getattr(args, "json_schema", None):
        try:
            with open(args.json_schema, encoding="utf-8") as f:
                c = Constraint("json_schema", json.load(f), "--json-schema")
        except (OSError, ValueError) as e:
            raise ValueError(f"--json-schema {args.json_schema}: cannot read a JSON schema from it ({e})") from None
    elif getattr(args, "regex", None) is not None:
        c = Constraint("regex", args.regex, "--regex")
    elif getattr(args, "choice", None) is not None:
        c = Constraint("choice", [x for x in args.choice.split(",") if x], "--choice")
    if c is not None:
        c.validate()
    return c


def sampling_params(args: argparse.Namespace, **extra):
    from qkv.infer.sampling import SamplingParams

    p = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=list(args.stop),
        seed=args.seed,
        **extra,
    )
    p.validate()
    return p


def load(path: str, dtype: str):
    from qkv.commands.serve import load_for_serving

    return load_for_serving(path, dtype)


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.infer.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    params = sampling_params(args, n=args.n, constraint=constraint_from_args(args))  # fails before the model loads
    model, tok = load(args.model, args.dtype)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:  # the prompt is the user turn's content: special-token text in it stays text
        prompt = tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]
    else:
        prompt = tok.encode(text, add_special=True)
    t0 = time.perf_counter()
    n_out = 0
    if args.draft:
        from qkv.infer.speculative import speculative_generate

        if args.n != 1:
            raise ValueError("--draft generates one sample; drop --n or --draft")
        draft, _ = load(args.draft, args.dtype)
        ids, stats = speculative_generate(model, draft, prompt, params, k=args.spec_k, eos_id=tok.eos_id)
        out = tok.decode(ids, skip_special=True)
        for s in params.stop:
            out = out.split(s)[0]
        print(out)
        n_out = len(ids)
        extra = f", {stats.acceptance_rate:.0%} of drafted tokens accepted"
    else:
        engine = Engine(model, tok, max_num_seqs=max(1, args.n))
        if args.n == 1:
            for o in engine.stream(prompt, params):
                sys.stdout.write(o.new_text)
                sys.stdout.flush()
                n_out = o.completion_tokens
            print()
        else:
            for i, r in enumerate(engine.generate([prompt], params)[0]):
                print(f"--- sample {i} ({r.finish_reason})")
                print(r.text)
                n_out += len(r.token_ids)
        extra = ""
    dt = time.perf_counter() - t0
    if args.stats:
        from qkv.infer.kv_cache import kv_bytes_per_token

        kv = kv_bytes_per_token(model.cfg, next(model.parameters()).dtype)
        print(
            f"[{len(prompt)} prompt + {n_out} generated tokens in {dt:.2f}s, {n_out / dt:.1f} tok/s; "
            f"KV cache {kv / 1024:.1f} KiB/token{extra}]",
            file=sys.stderr,
        )
    return 0
