"""Constrained decoding: a grammar per request turned into a token mask per step.

A `Constraint` says what the output must be (a JSON schema, any JSON object, a regex, one
of fixed strings, or a grammar in llguidance's Lark dialect). It is checked and compiled
when the request arrives, so a bad one is refused before any generation. Each sequence
then carries a `GrammarState` (an llguidance matcher): before each sampling step the
engine asks `allowed_tokens` for one boolean mask per constrained row (True = the
grammar lets this token come next), fills the rest with -inf, samples as usual, and
feeds the chosen token back with `GrammarState.accept`.

llguidance computes a mask by walking the tokenizer's token trie against the parser's
lexer state; it needs tens of microseconds per step for typical JSON schemas at a 49k
vocabulary, small beside a forward pass (docs/serving.md has the comparison with
xgrammar and outlines-core and the measured overhead).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class ConstraintError(ValueError):
    """A constraint the grammar library refuses; `.param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match. `spec` is a schema dict (json_schema), None
    (json_object), a regex string, a list of strings (choice) or a Lark grammar (grammar).
    `param` is the request field it came from, named in errors."""

    kind: str
    spec: Any = None
    param: str = "response_format"

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint (raises ConstraintError)."""
        import llguidance

        g = llguidance.LLMatcher
        try:
            if self.kind == "json_schema":
                if not isinstance(self.spec, dict):
                    raise ConstraintError(self.param, f"invalid {self.param}: the JSON schema must be an object")
                # compact JSON: no runs of whitespace that eat the token budget
                return g.grammar_from_json_schema(self.spec, defaults={"whitespace_flexible": False})
            if self.kind == "json_object":
                return g.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
            if self.kind == "regex":
                if not isinstance(self.spec, str):
                    raise ConstraintError(self.param, f"invalid {self.param}: a regex must be a string")
                return g.grammar_from_regex(self.spec)
            if self.kind == "choice":
                if not isinstance(self.spec, list) or not self.spec or not all(isinstance(c, str) for c in self.spec):
                    raise ConstraintError(self.param, f"invalid {self.param}: give a non-empty list of strings")
                alternatives = " | ".join(json.dumps(c) for c in self.spec)
                return g.grammar_from_lark(f"start: {alternatives}")
            if self.kind == "grammar":
                if not isinstance(self.spec, str):
                    raise ConstraintError(self.param, f"invalid {self.param}: the grammar must be a string")
                return g.grammar_from_lark(self.spec)
        except ValueError as e:
            if isinstance(e, ConstraintError):
                raise
            raise ConstraintError(self.param, f"invalid {self.param}: {e}") from None
        raise ConstraintError(self.param, f"unknown constraint kind {self.kind!r}; use one of {', '.join(KINDS)}")

    def validate(self) -> None:
        """Compile the grammar without a tokenizer: refuses unsupported schemas, bad regexes."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(self.grammar())
        if error:
            first = error.strip().splitlines()[0]
            raise ConstraintError(self.param, f"invalid {self.param}: the grammar library refuses it: {first}")


class GrammarTokenizer:
    """llguidance's view of one tokenizer (its token trie); built once (~1-3 s), shared."""

    _cache: dict[int, tuple[object, GrammarTokenizer]] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.vocab_size = vocab_size
        self.eos_id = tokenizer.eos_id
        self.ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id)

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> GrammarTokenizer:
        key = id(tokenizer)
        with cls._lock:
            hit = cls._cache.get(key)
            if hit is None or hit[0] is not tokenizer or hit[1].vocab_size != vocab_size:
                hit = (tokenizer, cls(tokenizer, vocab_size))
                cls._cache[key] = hit
            return hit[1]


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, gtok: GrammarTokenizer, constraint: Constraint, extra_stops: Collection[int] = ()):
        import llguidance

        self.gtok = gtok
        self.matcher = llguidance.LLMatcher(gtok.ll, constraint.grammar(), log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(constraint.param, f"invalid {constraint.param}: {self.matcher.get_error()}")
        # other stop tokens of the request may end it wherever the grammar may end
        self.extra_stops = sorted(t for t in extra_stops if t != gtok.eos_id and 0 <= t < gtok.vocab_size)

    def fork(self) -> GrammarState:
        twin = object.__new__(GrammarState)
        twin.gtok, twin.matcher, twin.extra_stops = self.gtok, self.matcher.deep_copy(), self.extra_stops
        return twin

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. A stop token ends the sequence and is not fed."""
        if token_id in self.extra_stops or (token_id == self.gtok.eos_id and self.matcher.is_accepting()):
            return
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()


def allowed_tokens(states: list[GrammarState], vocab_size: int) -> torch.Tensor:
    """(len(states), vocab_size) bool: which tokens each state allows next. llguidance
    writes one bit per token (little-endian 32-bit words); numpy unpacks them. Rows are
    filled one after another: llguidance's thread pool (LLExecutor) was no faster on a
    2-core machine and its first call took seconds."""
    words = (vocab_size + 31) // 32
    # not llguidance.torch's helpers: importing that module pulls in torch.compile (seconds)
    bitmask = np.full((len(states), words), -1, dtype=np.int32)
    for i, s in enumerate(states):
        s.matcher.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, words * 4)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    # a numpy view as bool, not torch's .bool(): on a busy machine torch's threads spin for a tiny copy
    allowed = torch.from_numpy(np.ascontiguousarray(bits).view(np.bool_))
    for i, s in enumerate(states):
        if s.extra_stops and s.matcher.is_accepting():
            allowed[i, s.extra_stops] = True
    return allowed


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with every token the grammar forbids at -inf."""
    return logits.masked_fill(~allowed, float("-inf"))
