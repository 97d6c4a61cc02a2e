"""Tokenizer: a Hugging Face `tokenizers` BPE model plus special tokens and a chat template.

Saved beside the weights in the Hugging Face layout (tokenizer.json and
tokenizer_config.json with `chat_template`), so transformers' AutoTokenizer reads it and
imported models keep their own tokenizer and template. Chat templates are jinja2,
rendered in a sandbox the way transformers does, within a render budget
(qkv.chat_template). `encode_chat` also returns the mask of assistant tokens that SFT
trains on.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from qkv.chat_template import render as render_template
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
        self._text_only: HFTokenizer | None = None  # made on first use by _text_only_backend
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

    # tokens other than eos that the model file declares as ending a reply (a GGUF's eot/eom
    # ids, generation_config.json's eos_token_id list); set by the loaders
    end_tokens: tuple[str, ...] = ()

    @property
    def end_ids(self) -> frozenset[int]:
        """Every token id that ends generation (see `end_of_generation_ids`)."""
        return end_of_generation_ids(self)

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
        return render_template(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, allow_special_in_content: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether it belongs to an
        assistant reply (the reply text and the template's end-of-turn after it).

        Special tokens come only from the template: a message's content is encoded as text,
        so `<|im_start|>system` typed by a user stays text and cannot forge a turn.
        `allow_special_in_content=True` parses special-token strings inside contents too."""
        text = self.render_chat(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = len(self.render_chat(messages[:i], add_generation_prompt=True))
            end = len(self.render_chat(messages[: i + 1]))
            spans.append((start, end))
        if allow_special_in_content or not any(self._holds_special(m.get("content")) for m in messages):
            enc = self.backend.encode(text, add_special_tokens=False)
            ids, offsets = enc.ids, enc.offsets
        else:
            ids, offsets = self._encode_with_contents_as_text(messages, add_generation_prompt, text)
        mask = [any(s <= a and b <= e and b > a for s, e in spans) for a, b in offsets]
        return ids, mask

    def _holds_special(self, content) -> bool:
        return isinstance(content, str) and any(t in content for t in self._special_strings())

    def _special_strings(self) -> list[str]:
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    def _encode_with_contents_as_text(
        self, messages: list[dict], add_generation_prompt: bool, text: str
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Render with a placeholder where each content holding a special-token string goes,
        encode the template's pieces as usual and those contents with special tokens as text.
        Only such contents are cut out, so every other token is encoded as in one piece."""
        nonce = secrets.token_hex(8)  # unguessable: a message cannot contain another's placeholder
        marks, marked = {}, []
        for i, m in enumerate(messages):
            if self._holds_special(m.get("content")):
                mark = f"\x00{nonce}:{i}\x00"
                # the mark stands for the content without its outer whitespace, which stays
                # around it: templates that trim contents (Llama 3's) render the mark alike
                lead, core, trail = re.fullmatch(r"(\s*)(.*?)(\s*)", m["content"], re.DOTALL).groups()
                marks[mark] = core
                m = {**m, "content": lead + mark + trail}
            marked.append(m)
        pieces = re.split(f"(\x00{nonce}:\\d+\x00)", self.render_chat(marked, add_generation_prompt))
        if "".join(marks.get(p, p) for p in pieces) != text:
            raise ValueError(
                "this chat template changes message contents, so special-token text inside them cannot be kept "
                "as text: remove special tokens from the messages (or allow them in content explicitly)"
            )
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        at = 0
        for p in pieces:
            content = marks.get(p)
            piece = content if content is not None else p
            if piece:
                enc = (self._text_only_backend() if content is not None else self.backend).encode(
                    piece, add_special_tokens=False
                )
                ids += enc.ids
                offsets += [(a + at, b + at) for a, b in enc.offsets]
            at += len(piece)
        return ids, offsets

    def _text_only_backend(self) -> HFTokenizer:
        """A copy of the backend that reads special-token strings as plain text (a copy, not a
        flag flipped on the shared one: the server tokenizes on several threads)."""
        if self._text_only is None:
            backend = HFTokenizer.from_str(self.backend.to_str())
            backend.encode_special_tokens = True
            self._text_only = backend
        return self._text_only

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
        tok = cls(
            backend,
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            add_bos=bool(cfg.get("add_bos_token", False)),
        )
        tok.end_tokens = declared_end_tokens(directory, backend)
        return tok


# --- the tokens that end generation ---------------------------------------------------------
GENERATION_CONFIG = "generation_config.json"


def end_of_generation_ids(tok: Tokenizer) -> frozenset[int]:
    """Every token id that ends a reply, the one set the engine, `qkv generate`/`chat`/`serve` and
    eval stop on: eos, the end tokens the model file declares (`tok.end_tokens`) and the end of
    turn of its chat format (the template's, else a known format's its vocabulary holds the turn
    tokens of: Gemma's base file stops on <eos> and on <end_of_turn>). Worked out once per
    tokenizer and kept while eos, the declared tokens and the template stay the same."""
    key = (tok.eos_token, tok.end_tokens, tok.chat_template)
    cached = tok.__dict__.get("_end_ids")
    if cached is None or cached[0] != key:
        names = (tok.eos_token, *tok.end_tokens, _chat_end_of_turn(tok))
        cached = key, frozenset(i for i in map(tok.token_id, names) if i is not None)
        tok.__dict__["_end_ids"] = cached
    return cached[1]


def _chat_end_of_turn(tok: Tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant reply, or None."""
    from qkv import chat_formats  # imports this module

    chat, _ = chat_formats.fallback(tok)
    if not chat.chat_template:
        return None
    probe = "qkv0end0probe"
    try:
        text = chat.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
    except Exception:  # a template that wants another conversation shape: no end of turn found
        return None
    after = text.split(probe, 1)[1].lstrip() if probe in text else ""
    found = [s for s in chat._special_strings() if after.startswith(s)]
    return max(found, key=len) if found else None


def declared_end_tokens(directory: Path, backend: HFTokenizer) -> tuple[str, ...]:
    """The end tokens generation_config.json's `eos_token_id` (an id or a list) names."""
    path = directory / GENERATION_CONFIG
    try:
        ids = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    except (ValueError, AttributeError):  # not a JSON object: nothing declared
        return ()
    ids = ids if isinstance(ids, list) else [ids]
    names = (backend.id_to_token(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))
    return tuple(n for n in names if n is not None)


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
