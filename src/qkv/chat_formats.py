"""Known chat formats, for a model file that ships a vocabulary with turn tokens but no template.

A base model's GGUF (Gemma 3 270M's, for one) often carries no `tokenizer.chat_template`, yet its
vocabulary holds the turn tokens its instruction-tuned sibling was trained with. `fallback` picks
the format those tokens imply, so `qkv chat` and `qkv serve` can hold a conversation with it, and
makes the format's end-of-turn token the tokenizer's end of sequence: a reply ends where the turn
does, and at the file's own end-of-document token too (it stays among the tokenizer's end tokens).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from qkv.tokenizer import Tokenizer

# Gemma's turn format (as its instruction-tuned models' template renders it): roles user and
# model, a system message folded into the first user turn, contents trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    turn_tokens: tuple[str, ...]  # the vocabulary must hold all of these
    end_of_turn: str


KNOWN = (ChatFormat("Gemma", GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),)


def fallback(tok: Tokenizer) -> tuple[Tokenizer, str | None]:
    """(tokenizer, note): `tok` itself and None when it has a template or no known turn tokens;
    else a copy with the known format's template and its end-of-turn as end of sequence, and a
    one-line note saying so."""
    if tok.chat_template:
        return tok, None
    for fmt in KNOWN:
        if all(tok.token_id(t) is not None for t in fmt.turn_tokens):
            chat = copy.copy(tok)  # shares the backend; the caller's tokenizer keeps its own settings
            chat.chat_template, chat.eos_token = fmt.template, fmt.end_of_turn
            if tok.eos_token is not None and tok.eos_token != fmt.end_of_turn:
                chat.end_tokens = (*tok.end_tokens, tok.eos_token)
            note = (
                f"the model file has no chat template; its vocabulary has {fmt.name}'s turn tokens, so "
                f"{fmt.name}'s turn format is used, and a reply ends at {fmt.end_of_turn}"
            )
            return chat, note
    return tok, None
