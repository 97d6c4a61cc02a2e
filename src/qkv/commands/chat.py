"""Chat with a model in the terminal (streams replies; /help lists the commands, /exit quits).

MODEL is a qkv checkpoint directory, a Hugging Face directory, a GGUF file or a model name
(`qkv models`) with a chat template. Lines starting with / are commands, never sent to the
model. A reply cut short by --max-tokens or the context ends with a marker saying so. The
whole conversation is re-sent each turn; the engine's prefix cache reuses the KV blocks of
the turns it has already seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands.generate import MODEL_HELP, add_sampling_arguments

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system message to start the conversation with (default: none)")
    add_sampling_arguments(p)


COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (keeps --system)",
    "/exit": "quit (also /quit or Ctrl-D)",
}


def help_text() -> str:
    return "\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items())


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv import chat_formats
    from qkv.commands.generate import (
        describe_stop,
        fit_max_tokens,
        load,
        model_sampling_defaults,
        sampling_params,
        stop_reason,
    )
    from qkv.infer.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    sampling_params(args)  # bad options fail before anything is read
    params = sampling_params(args, model_sampling_defaults(args.model))
    model, tok = load(args.model, args.dtype)
    tok, note = chat_formats.fallback(tok)  # a known turn format for a file without a template
    if note:
        print(f"qkv chat: {note}", file=sys.stderr)
    if not tok.chat_template:
        raise ValueError(f"{args.model}: the tokenizer has no chat template; use `qkv generate` for plain text")
    engine = Engine(model, tok, max_num_seqs=1, cache_dtype=args.kv_dtype)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"qkv chat: {args.model} (context {engine.max_len} tokens, temperature {params.temperature:g}, "
            f"top-k {params.top_k}, top-p {params.top_p:g}, min-p {params.min_p:g}). /help for commands."
        )
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(start)
            print("[conversation cleared]")
            continue
        if command == "/help":
            print(help_text())
            continue
        if command.startswith("/") and command.split()[0] not in COMMANDS:
            print(f"[unknown command {command.split()[0]}; /help lists them]")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.encode_chat(messages, add_generation_prompt=True)[0]  # typed special tokens stay text
        if len(prompt) >= engine.max_len:
            print(f"[conversation is {len(prompt)} tokens, over the context of {engine.max_len}; /reset]")
            messages.pop()
            continue
        turn = dataclasses.replace(params)
        fit_max_tokens(turn, len(prompt), engine.max_len)  # the reply's marker says when the context cut it
        reply, last, finish, n_out = [], None, None, 0
        for o in engine.stream(prompt, turn):
            reply.append(o.new_text)
            sys.stdout.write(o.new_text)
            sys.stdout.flush()
            last = o.new_token_ids[-1] if o.new_token_ids else last
            finish, n_out = o.finish_reason or finish, o.completion_tokens
        print()
        reason = stop_reason(finish, last, len(prompt) + n_out, engine.max_len, turn, tok)
        if reason in ("length", "context"):
            print(describe_stop(reason, n_out))
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
