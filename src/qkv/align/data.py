"""Alignment data: the JSONL formats, their validation, tokenisation and batching.

    SFT:         {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    preference:  {"prompt": ..., "chosen": ..., "rejected": ...}   (TRL's format)
                 prompt: a string (one user turn) or a message list;
                 chosen / rejected: a string (one assistant turn) or a message list
    prompts:     {"prompt": ...} (PPO / GRPO), same prompt forms

Bad lines fail loudly with the file and line number, e.g.
    data/prefs.jsonl:12: missing key 'rejected' (a preference line needs prompt, chosen, rejected)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant", "tool")


def _where(path, lineno) -> str:
    return f"{path}:{lineno}"


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{_where(path, lineno)}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{_where(path, lineno)}: each line must be a JSON object")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: the file has no examples")
    return rows


def _messages(value, where: str, key: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty string or a list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: {key}[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: {key}[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_sft_row(row: dict, where: str) -> list[dict]:
    if "messages" not in row:
        raise ValueError(f"{where}: missing key 'messages' (an SFT line is {{\"messages\": [...]}})")
    msgs = _messages(row["messages"], where, "messages", "user")
    answers = [m for m in msgs if m["role"] == "assistant"]
    if not answers:
        raise ValueError(f"{where}: no assistant message; SFT trains on assistant replies only")
    if any(not m["content"].strip() for m in answers):
        raise ValueError(f"{where}: empty assistant response")
    return msgs


@dataclass
class Preference:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


def parse_preference_row(row: dict, where: str) -> Preference:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r} (a preference line needs prompt, chosen, rejected)")
    prompt = _messages(row["prompt"], where, "prompt", "user")
    out = {}
    for key in ("chosen", "rejected"):
        msgs = _messages(row[key], where, key, "assistant")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: {key!r} must end with an assistant message")
        if not msgs[-1]["content"].strip():
            raise ValueError(f"{where}: empty {key} response")
        out[key] = msgs
    return Preference(prompt, out["chosen"], out["rejected"])


def parse_prompt_row(row: dict, where: str) -> list[dict]:
    if "prompt" not in row:
        raise ValueError(f"{where}: missing key 'prompt' (a prompt line is {{\"prompt\": ...}})")
    msgs = _messages(row["prompt"], where, "prompt", "user")
    if not any(m["content"].strip() for m in msgs):
        raise ValueError(f"{where}: empty prompt")
    return msgs


def load_sft(path: str | Path) -> list[list[dict]]:
    return [parse_sft_row(r, _where(path, n)) for n, r in read_jsonl(path)]


def load_preferences(path: str | Path) -> list[Preference]:
    return [parse_preference_row(r, _where(path, n)) for n, r in read_jsonl(path)]


def load_prompts(path: str | Path) -> list[list[dict]]:
    return [parse_prompt_row(r, _where(path, n)) for n, r in read_jsonl(path)]


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# --- tokenisation ---------------------------------------------------------------------
def require_chat_template(tokenizer, source: str = "the tokenizer") -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{source}: the tokenizer has no chat template; alignment stages render conversations "
            "with it. Add 'chat_template' to tokenizer_config.json (e.g. ChatML) or use a chat model's tokenizer"
        )
    if tokenizer.eos_id is None:
        raise ValueError(f"{source}: the tokenizer has no eos_token; responses need an end-of-turn token")


def check_same_vocab(model_a, model_b, name_a: str, name_b: str) -> None:
    va, vb = model_a.cfg.vocab_size, model_b.cfg.vocab_size
    if va != vb:
        raise ValueError(
            f"{name_b} has a vocabulary of {vb} tokens but {name_a} has {va}; the reference/reward "
            "model must share the policy's tokenizer (start both from the same SFT checkpoint)"
        )


def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    return tokenizer.encode_chat(prompt, add_generation_prompt=True)[0]


def encode_response(tokenizer, prompt: list[dict], response: list[dict], max_len: int) -> tuple[list[int], list[bool]]:
    """ids of prompt + response and the mask of the response's assistant tokens (the
    template's end-of-turn included, so the model learns to stop). Truncated to max_len."""
    n_prompt = len(encode_prompt(tokenizer, prompt))
    ids, amask = tokenizer.encode_chat(prompt + response)
    mask = [m and i >= n_prompt for i, m in enumerate(amask)]
    # end at the final EOS, as a sampled response does (the template's text after it,
    # e.g. ChatML's newline, is never generated, so the RM/DPO must not see it either)
    eos = tokenizer.eos_id
    last = max((i for i, t in enumerate(ids) if t == eos and mask[i]), default=len(ids) - 1)
    ids, mask = ids[: last + 1], mask[: last + 1]
    return ids[:max_len], mask[:max_len]


class IndexSampler:
    """Which examples micro-batch (step, micro) gets: walks a fresh seeded permutation per
    epoch, so batches are a pure function of (step, micro) and a resumed run sees exactly
    the data the uninterrupted run would have."""

    def __init__(self, n: int, micro_batch: int, grad_accum: int, seed: int):
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.mb, self.accum, self.seed = n, micro_batch, grad_accum, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def __call__(self, step: int, micro: int) -> list[int]:
        start = (step * self.accum + micro) * self.mb
        return [self._perm(j // self.n)[j % self.n] for j in range(start, start + self.mb)]


def rollout_minibatch(step: int, micro: int, steps_per_iter: int, n_rows: int, cfg) -> tuple[int, torch.Tensor]:
    """(iteration, row indices) for micro-batch `micro` of optimizer step `step` in the RL
    stages (PPO, GRPO): each iteration's `n_rows` rollout rows are reshuffled every epoch
    with a seed derived from (cfg.seed, iteration, epoch), so a resumed run is exact."""
    it, k = divmod(step, steps_per_iter)
    epoch, j = divmod(k, n_rows // cfg.batch_size)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed * 104729 + it * 1000 + epoch))
    mb = cfg.batch_size // cfg.grad_accum
    start = j * cfg.batch_size + micro * mb
    return it, perm[start : start + mb]


def pad(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def batch_sequences(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], pad_id: int) -> dict:
    """Right-padded batch: ids (B, T), key_padding (B, T) True on real tokens, mask (B, T)
    True on trained/scored tokens."""
    lens = torch.tensor([len(s) for s in ids])
    T = int(lens.max())
    return {
        "ids": pad(ids, pad_id, T),
        "key_padding": torch.arange(T)[None] < lens[:, None],
        "mask": pad([[int(m) for m in ms] for ms in masks], 0, T).bool(),
    }


def pack_sequences(
    ids: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], seq_len: int, pad_id: int
) -> list[dict]:
    """Greedy packing of whole conversations into rows of seq_len tokens. Each row keeps
    `doc` (document index per position) so attention stays inside a conversation and
    positions restart at 0 per conversation: packed training sees exactly what unpacked
    training sees, without the padding."""
    rows, cur_ids, cur_mask, cur_doc = [], [], [], []
    for k, (s, m) in enumerate(zip(ids, masks)):
        s, m = list(s)[:seq_len], list(m)[:seq_len]
        if len(cur_ids) + len(s) > seq_len and cur_ids:
            rows.append((cur_ids, cur_mask, cur_doc))
            cur_ids, cur_mask, cur_doc = [], [], []
        cur_ids += s
        cur_mask += m
        cur_doc += [k] * len(s)
    if cur_ids:
        rows.append((cur_ids, cur_mask, cur_doc))
    return [{"ids": a, "mask": b, "doc": c} for a, b, c in rows]


# --- what fits in the training window -------------------------------------------------
@dataclass
class Coverage:
    """How much of a data set (or one side of a preference set) fits in max_len tokens:
    the assistant tokens are the ones trained on (SFT) or scored (DPO, reward model)."""

    examples: int = 0
    tokens: int = 0  # whole rendered examples
    assistant: int = 0  # assistant tokens of the whole examples
    kept: int = 0  # assistant tokens within max_len
    truncated: int = 0  # examples longer than max_len
    emptied: int = 0  # examples that keep no assistant token
    longest: int = 0  # tokens of the longest example

    def add(self, mask: Sequence[bool], max_len: int) -> int:
        """Count one example; returns its assistant tokens within max_len."""
        kept = sum(mask[:max_len])
        self.examples += 1
        self.tokens += len(mask)
        self.assistant += sum(mask)
        self.kept += kept
        self.truncated += len(mask) > max_len
        self.emptied += kept == 0
        self.longest = max(self.longest, len(mask))
        return kept

    def line(self) -> str:
        return f"{self.tokens:,} tokens, {self.assistant:,} assistant tokens, {self.truncated:,} truncated"


@dataclass
class DataFit:
    """Coverage of a data set at one window length; `usable` examples train on something."""

    noun: str  # "conversations" or "pairs"
    max_len: int
    sides: dict[str, Coverage]
    usable: int

    @property
    def examples(self) -> int:
        return next(iter(self.sides.values())).examples

    @property
    def longest(self) -> int:
        return max(c.longest for c in self.sides.values())

    def summary(self) -> str:
        sides = "; ".join(f"{k + ': ' if k else ''}{c.line()}" for k, c in self.sides.items())
        return f"data: {self.examples:,} {self.noun}; {sides} at seq_len {self.max_len}"

    def problem(self, limit: int | None = None) -> tuple[str | None, str | None]:
        """(error, warning): an error when no example keeps an assistant token within max_len
        (training would run on nothing), a warning when some are cut. `limit`: the model's
        longest context, the largest seq_len worth suggesting."""
        need = self.longest if limit is None else min(self.longest, limit)
        fix = f"raise --seq-len to {need}" + (" (the model's longest context)" if need < self.longest else "")
        if self.usable == 0:
            return (
                f"--seq-len {self.max_len} keeps no assistant token of any of the {self.examples:,} {self.noun} "
                f"(the chat template's prompt fills the window; the longest example is {self.longest} tokens): {fix}",
                None,
            )
        cut = max(c.truncated for c in self.sides.values())
        if not cut:
            return None, None
        lost = sum(c.assistant - c.kept for c in self.sides.values())
        total = sum(c.assistant for c in self.sides.values())
        return None, (
            f"warning: {cut:,} of {self.examples:,} {self.noun} are longer than --seq-len {self.max_len} and are cut "
            f"({lost:,} of {total:,} assistant tokens lost; {self.examples - self.usable:,} keep none); "
            f"{fix} to keep them whole"
        )


def sft_fit(tokenizer, conversations: list[list[dict]], max_len: int) -> DataFit:
    """How the conversations fit in max_len tokens, rendered with the tokenizer's chat template."""
    require_chat_template(tokenizer)
    cov = Coverage()
    usable = sum(cov.add(tokenizer.encode_chat(msgs)[1], max_len) > 0 for msgs in conversations)
    return DataFit("conversations", max_len, {"": cov}, usable)


def preference_fit(tokenizer, prefs: list[Preference], max_len: int) -> DataFit:
    """How prompt + chosen and prompt + rejected fit in max_len tokens; a pair is usable when
    both responses keep at least one token."""
    require_chat_template(tokenizer)
    sides = {"chosen": Coverage(), "rejected": Coverage()}
    usable = 0
    for p in prefs:
        kept = [sides[k].add(encode_response(tokenizer, p.prompt, getattr(p, k), 1 << 30)[1], max_len) for k in sides]
        usable += min(kept) > 0
    return DataFit("pairs", max_len, sides, usable)


def epochs_to_steps(cfg, epochs: float | None, n: int, cap: int | None = None):
    """cfg with max_steps covering `epochs` passes over n examples (rows) at cfg.batch_size,
    no more than `cap` steps; cfg unchanged when epochs is None or 0."""
    import math

    if not epochs:
        return cfg
    if epochs < 0:
        raise ValueError(f"--epochs {epochs} must be > 0 (or 0 to train for --max-steps)")
    steps = max(1, math.ceil(epochs * n / cfg.batch_size))
    return cfg.replace(max_steps=min(steps, cap) if cap else steps)


def require_trained_tokens(usable: int, n: int, max_len: int, noun: str) -> None:
    """A clear error instead of a run that trains on nothing: none of the n examples keeps an
    assistant token within max_len (`usable` is how many do)."""
    if usable == 0:
        raise ValueError(
            f"seq_len {max_len} keeps no assistant token of any of the {n:,} {noun} "
            "(the chat template's prompt fills the window): raise seq_len"
        )
