"""Incremental detokenization: the text of a growing token sequence, a piece per step.

Decoding the whole output again after every token costs time proportional to its length,
so a reply of n tokens costs O(n^2). Here each step decodes only a short window of recent
tokens, as vLLM's `detokenize_incrementally` and transformers' `TextStreamer` do:

    ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                 context (already sent)   new tokens

    new text = decode(ids[prefix_offset:])  minus  decode(ids[prefix_offset:read_offset])

The context tokens before `read_offset` make a decoder that looks at its neighbours (a
SentencePiece-style decoder drops the leading space of the first token it sees) treat the
new tokens as it would inside the whole text. A byte-level BPE token can end in the middle
of a multi-byte UTF-8 character; the decoder renders the incomplete bytes as U+FFFD, so
text that ends in U+FFFD is held back (what comes before it is sent) until a later token
completes the character. Once the window's text ends in a complete character, the window
moves forward: `prefix_offset` to the old `read_offset`, `read_offset` to the end.

For a decoder that maps bytes to text (byte-level BPE: GPT-2, Llama 3, SmolLM2, Qwen, and
qkv's own tokenizers) the pieces joined are exactly `decode(ids)`, and after every step
they are `decode(ids)` without its trailing U+FFFD characters. A run of invalid bytes keeps
the window open until a valid character follows: each step then costs the run's length.

A sentencepiece vocabulary with byte fallback (Gemma, Llama 2) spells rare characters as
byte tokens <0x00>..<0xFF>, and its decoder (`tokenizers`' ByteFallback) turns a whole run of
consecutive byte tokens into U+FFFD, one per byte, when any byte in the run is not valid
UTF-8: a later byte can change text that already decoded well ("a" then <0xC3><0x41>).
So a trailing run of byte tokens is held back whole until a token that is not a byte ends
it; the pieces joined are again exactly `decode(ids)`, and each piece is final. A special
token that decoding skips does not end a run: the decoder never sees it, so the bytes on
either side of it join ("a" as <0x61>, <eos>, <0xFF> decodes to two U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Text of a token sequence fed a few ids at a time.

    `push(ids)` returns the text those ids complete; `flush()` returns what is still held
    back (an incomplete character at the end) once no more ids will come."""

    def __init__(self, tokenizer: Decoder, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window: context whose text was already sent
        self.read_offset = 0  # text of ids[:read_offset] is final and sent
        self.sent = 0  # characters of the text after read_offset already sent (before a trailing U+FFFD)
        self.byte_ids = byte_fallback_ids(tokenizer)  # ids whose run the decoder reads as one (may be empty)
        # ids a run continues through: the byte tokens, and the special tokens decoding skips
        self.run_ids = self.byte_ids
        if self.byte_ids and skip_special:
            self.run_ids |= skipped_special_ids(tokenizer)

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the text that is now final (possibly "")."""
        self.ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return all text still held back: the sequence is complete."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        stop = len(self.ids)
        if not final:  # an open run of byte-fallback tokens: its text is not known yet
            while stop > self.read_offset and self.ids[stop - 1] in self.run_ids:
                stop -= 1
        window = self.ids[self.prefix_offset : stop]
        text = self._decode(window)
        start = len(self._decode(window[: self.read_offset - self.prefix_offset])) + self.sent
        end = len(text)
        if not final:
            while end > start and text[end - 1] == REPLACEMENT:
                end -= 1
        piece = text[start:end]
        if end == len(text):  # the window ends in a whole character: later tokens cannot change it
            self.prefix_offset, self.read_offset, self.sent = self.read_offset, stop, 0
        else:
            self.sent += len(piece)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """The ids of a byte-fallback vocabulary's byte tokens <0x00>..<0xFF>, when its decoder
    reads them as runs (a `tokenizers` ByteFallback decoder); empty otherwise."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or "ByteFallback" not in repr(getattr(backend, "decoder", None)):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def skipped_special_ids(tokenizer) -> frozenset[int]:
    """The ids `decode(..., skip_special=True)` leaves out: a `tokenizers` backend's special
    added tokens; empty when the tokenizer has no such backend."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return frozenset()
    return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
