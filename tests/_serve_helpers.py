"""Test helpers: run a real qkv server in-process, a tiny random chat model and a background
uvicorn.

Used by the server and page tests and benchmarks/bench_serve.py (which puts tests/ on its
path). The model is random (its replies are gibberish) but everything around it is real: a
trained byte-level BPE tokenizer, a ChatML template, a saved qkv checkpoint, the engine,
and uvicorn listening on a loopback port.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "A language model predicts the next token from the tokens before it, one step at a time.",
    "Attention lets every position look back at every earlier position with learned queries and keys.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about?",
    "Numbers like 1, 2, 3, 42 and 1024 appear in text too, as do symbols: #, $, %, &, (, ), [, ].",
]


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE (any text encodes) with ChatML special tokens and template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from qkv.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    return Tokenizer(backend, chat_template=CHATML, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_tiny_checkpoint(directory: str | Path, *, max_seq_len: int = 256, seed: int = 0, **cfg_overrides) -> Path:
    """Save a random tiny Llama-style model + tiny tokenizer as a qkv checkpoint."""
    import torch

    from qkv.checkpoint import save_model
    from qkv.config import preset
    from qkv.model import build_model

    tok = tiny_tokenizer()
    overrides = dict(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=max_seq_len)
    overrides.update(cfg_overrides)
    cfg = preset("tiny", **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    return save_model(directory, model, tok)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 from a daemon thread; a context manager.

    with BackgroundServer(app) as srv:
        httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port()
        config = uvicorn.Config(
            app, host=self.host, port=self.port, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="qkv-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
