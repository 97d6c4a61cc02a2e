"""Serve a model over the OpenAI API (chat + completions, streaming) with a chat page at /.

Loads a qkv checkpoint directory, a Hugging Face directory, a GGUF file or a model name
(`qkv models`), wraps it in the
continuous-batching engine and serves it with uvicorn. Binds 127.0.0.1 unless --host says
otherwise; with --api-key (or QKV_API_KEY) every API request must send
`Authorization: Bearer KEY` (the chat page has a field for it). Answers only requests whose
Host header is a loopback name or --host, unless --allowed-hosts says otherwise (a web page
whose name resolves to 127.0.0.1 must not reach the server through the visitor's browser).
"""

from __future__ import annotations

import argparse
import os

from qkv.commands._weights import add_dtype_argument, add_kv_dtype_argument


def port_number(text: str) -> int:
    """argparse type of --port: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; choose one in 1-65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; choose one in 1-65535")
    return port


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.commands.generate import MODEL_HELP

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535")
    p.add_argument(
        "--api-key", default=None, help="require this bearer key on the API (default: env QKV_API_KEY, else none)"
    )
    p.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: the model's file/dir name)"
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (PEFT dir) as model 'SERVED_NAME:NAME', batched with base requests; repeatable",
    )
    p.add_argument(
        "--max-num-seqs",
        "--max-concurrency",
        dest="max_num_seqs",
        type=int,
        default=32,
        help="sequences decoded together in one engine step; more wait their turn",
    )
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before new ones get 429")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=512,
        help="tokens one engine step feeds the model: decoding sequences first (one each), then prompt chunks; "
        "a long prompt is prefilled over several steps, so decoding never waits for all of it",
    )
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: the engine's choice)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="largest context served, in tokens: lowers the model's own (a smaller KV cache; default: the model's)",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body accepted (413 above)")
    p.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header names clients reach the server by, '*' for any "
        "(default: localhost, 127.0.0.1, ::1 and --host)",
    )
    p.add_argument("--metrics-auth", action="store_true", help="require the API key on /metrics too (default: public)")
    p.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="read special-token text inside chat messages (e.g. <|im_start|>) as control tokens, letting clients "
        "write whole turns (default: it is plain text, so a message cannot forge a system turn)",
    )
    add_dtype_argument(p)
    add_kv_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def allowed_hosts(args: argparse.Namespace) -> list[str]:
    """The Host names the server answers to: --allowed-hosts, else loopback plus --host."""
    from qkv.serve.guard import LOOPBACK_HOSTS

    if args.allowed_hosts:
        return [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    hosts = list(LOOPBACK_HOSTS)
    if args.host not in ("0.0.0.0", "::", ""):  # a wildcard bind has no name of its own
        hosts.append(args.host)
    return hosts


def load_for_serving(path: str, dtype: str = "auto"):
    """(model, tokenizer) for a checkpoint dir, HF dir or GGUF file, in eval mode, its
    weights stored as `dtype` says (qkv.interop.load.load_for_inference)."""
    from qkv.interop.load import load_for_inference

    model, tokenizer = load_for_inference(path, dtype)
    if tokenizer is None:
        raise ValueError(f"{path}: has no tokenizer; save one beside the weights (tokenizer.json)")
    return model.eval(), tokenizer


def cap_context(model, max_model_len: int | None) -> int:
    """Lower the model's context to `max_model_len` (never raise it) before the engine sizes
    its KV cache from it; returns the context served."""
    if max_model_len is not None:
        if max_model_len < 1:
            raise ValueError(f"--max-model-len {max_model_len} must be >= 1")
        model.cfg.max_seq_len = min(model.cfg.max_seq_len, max_model_len)
    return model.cfg.max_seq_len


def check_port_free(host: str, port: int) -> None:
    """Fail now, before the model loads, when the address cannot be listened on (the port is
    taken or the host is not this machine's), the way uvicorn would bind it."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror}); pass an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(
                f"cannot listen on {host}:{port}: {e.strerror}; pass another --port or stop what uses this one"
            ) from None


def build_engine(args: argparse.Namespace):
    """(engine, tokenizer): the model loaded, capped, with its adapters, and the engine over it."""
    from qkv import chat_formats
    from qkv.infer.engine import Engine

    model, tokenizer = load_for_serving(args.model, args.dtype)
    tokenizer, note = chat_formats.fallback(tokenizer)
    if note:
        print(f"note: {note}")
    cap_context(model, args.max_model_len)
    if args.lora:
        from qkv.lora.peft_format import load_serving_adapters

        load_serving_adapters(model, args.lora)
    engine_kwargs = dict(
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens,
        cache_dtype=args.kv_dtype,
    )
    if args.num_blocks:
        engine_kwargs["num_blocks"] = args.num_blocks
    engine = Engine(model, tokenizer, **engine_kwargs)
    # llguidance's view of the vocabulary (its token trie) holds the GIL while it builds, ~0.7 s
    # of CPU for SmolLM2's 49k tokens and ~6 s for Gemma 3's 262k: built now, so the first
    # constrained request does not freeze every running stream for that long
    from qkv.infer.constraints import GrammarTokenizer

    GrammarTokenizer.of(engine.tokenizer, engine.cfg.vocab_size)
    return engine, tokenizer


def run(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port)  # before the slow imports and the model load
    from pathlib import Path

    import torch
    import uvicorn

    from qkv.commands.generate import model_sampling_defaults
    from qkv.interop.registry import MODELS
    from qkv.serve.app import create_app
    from qkv.serve.async_engine import on_passing_thread

    if args.threads:
        torch.set_num_threads(args.threads)
    # set up on a thread that exits: the engine thread will own the process's only OpenMP team
    engine, tokenizer = on_passing_thread(lambda: build_engine(args))
    model = engine.model
    default_name = args.model if args.model in MODELS else Path(args.model).resolve().name.removesuffix(".gguf")
    name = args.served_model_name or default_name
    api_key = args.api_key or os.environ.get("QKV_API_KEY") or None
    app = create_app(
        engine,
        name,
        api_key=api_key,
        max_queue=args.max_queue,
        tokenizer=tokenizer,
        max_model_len=model.cfg.max_seq_len,
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=allowed_hosts(args),
        metrics_auth=args.metrics_auth,
        allow_special_in_content=args.allow_special_tokens_in_content,
        sampling_defaults=model_sampling_defaults(args.model),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it")
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        print("note: only loopback Host names are answered; pass --allowed-hosts with the names clients use")
    print(f"serving '{name}' on http://{args.host}:{args.port}  (chat page at /, API at /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
