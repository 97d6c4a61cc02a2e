"""Tokenizer: a Hugging Face `tokenizers` BPE model plus special tokens and a chat template.

Saved beside the weights in the Hugging Face layout (tokenizer.json and
tokenizer_config.json with `chat_template`), so transformers' AutoTokenizer reads it and
imported models keep their own tokenizer and template. Chat templates are jinja2,
rendered in a sandbox the way transformers does. `encode_chat` also returns the mask of
assistant tokens that SFT trains on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from qkv.io import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.add_bos = add_bos
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and backend.token_to_id(tok) is None:
                raise ValueError(f"{name} {tok!r} is not in the tokenizer's vocabulary")

    # --- ids -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    # --- text <-> ids --------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    # --- chat ----------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template; pass one (tokenizer_config.json "
                "'chat_template') or use plain-text prompts"
            )
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether it belongs to an
        assistant reply (the reply text and the template's end-of-turn after it)."""
        text = self.render_chat(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = len(self.render_chat(messages[:i], add_generation_prompt=True))
            end = len(self.render_chat(messages[: i + 1]))
            spans.append((start, end))
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [any(s <= a and b <= e and b > a for s, e in spans) for a, b in enc.offsets]
        return enc.ids, mask

    # --- files ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self.backend.to_str())
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }
        atomic_write_text(directory / TOKENIZER_CONFIG, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        cfg: dict = {}
        cfg_path = directory / TOKENIZER_CONFIG
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
        template = cfg.get("chat_template")
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        if isinstance(template, list):  # transformers allows named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            add_bos=bool(cfg.get("add_bos_token", False)),
        )


_TEMPLATE_CACHE: dict[str, object] = {}


def _compile_template(source: str):
    if source not in _TEMPLATE_CACHE:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


# --- training a byte-level BPE tokenizer (qkv-trained models) -------------------------------
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # a chat turn: <|im_start|>role\ncontent<|im_end|>\n
SPECIAL_TOKENS = [EOS, BOS, IM_START, IM_END]

# ChatML, as SmolLM2 / Qwen use it: each turn opens with <|im_start|> and its role, ends with
# <|im_end|>; the generation prompt opens an assistant turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(texts, vocab_size: int = 4096, min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte is a base symbol, so any string
    round-trips) on an iterable of strings, with the special tokens and the ChatML template.

    The vocabulary is 256 bytes + the special tokens + learned merges, `vocab_size` in all."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least {minimum}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, chat_template=DEFAULT_CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def bytes_per_token(tokenizer: Tokenizer, texts) -> float:
    """Compression on (held-out) text: UTF-8 bytes divided by tokens."""
    n_bytes = n_tokens = 0
    for ids, text in zip(tokenizer.encode_batch(list(texts)), texts):
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    if n_tokens == 0:
        raise ValueError("no text to measure compression on")
    return n_bytes / n_tokens
