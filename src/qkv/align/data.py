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
