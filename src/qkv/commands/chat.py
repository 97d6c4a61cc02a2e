"""Chat with a model in the terminal (streams replies; /reset clears, /exit quits).

MODEL is a qkv checkpoint directory, a Hugging Face directory or a GGUF file with a
chat template. The whole conversation is re-sent each turn; the engine's prefix cache
reuses the KV blocks of the turns it has already seen.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands.generate import add_sampling_arguments

    p.add_argument("--model", required=True, help="qkv checkpoint dir, Hugging Face dir or .gguf file")
    p.add_argument("--system", default=None, help="system message to start the conversation with")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.commands.generate import load, sampling_params
    from qkv.infer.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    params = sampling_params(args)
    model, tok = load(args.model, args.dtype)
    if not tok.chat_template:
        raise ValueError(f"{args.model}: the tokenizer has no chat template; use `qkv generate` for plain text")
    engine = Engine(model, tok, max_num_seqs=1)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.encode_chat(messages, add_generation_prompt=True)[0]  # typed special tokens stay text
        if len(prompt) >= engine.max_len:
            print(f"[conversation is {len(prompt)} tokens, over the context of {engine.max_len}; /reset]")
            messages.pop()
            continue
        reply = []
        for o in engine.stream(prompt, params):
            reply.append(o.new_text)
            sys.stdout.write(o.new_text)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
