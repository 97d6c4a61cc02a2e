"""Continuous-batching scheduler: which sequences run this step, with how many tokens.

Every step has a token budget (`max_batch_tokens`). Running sequences go first, in
arrival order (FCFS): a decoding sequence needs one token, a sequence still in its
prompt gets the next chunk of it (chunked prefill, so a long prompt never stalls the
decoders). Waiting sequences are then admitted in arrival order while budget, batch
slots and KV blocks last.

When the pool runs out of blocks, the most recently arrived running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the
waiting queue with all its tokens (prompt + generated so far), to be prefilled again
later. Nothing is lost and a seeded request still produces the same tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from qkv.infer.paged import BlockAllocator, NoFreeBlocks, block_content, block_hash


@dataclass(eq=False)
class Sequence:
    """One stream of tokens with its own KV blocks (a request has n of them)."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    arrival: int  # admission order (FCFS and preemption priority)
    token_ids: list[int]  # prompt + generated
    num_prompt: int
    generator: torch.Generator | None = None
    seed: int = 0  # sample i of a request draws from a generator seeded with seed + i
    logprobs: list | None = None  # TokenLogprob per generated token, when asked for
    # per prompt position (None for the first token), when asked for: filled by the prefill
    prompt_logprobs: list | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_hashed: int = 0  # leading full blocks already named in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)
    finished: bool = False
    # the first block's parent in the prefix-cache chain: differs between LoRA adapters (their
    # K/V differ for the same tokens), so each adapter reuses only its own cached blocks
    cache_salt: bytes | None = None

    @property
    def num_pending(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs asked for and not all computed yet."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]]  # (sequence, tokens to feed this step)
    copies: list[tuple[int, int]]  # copy-on-write block copies (src, dst) to do first
    preempted: list[Sequence]


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 512,
    ):
        self.alloc = allocator
        self.bs = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order
        self.preemptions_total = 0

    # --- queues ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample joins its parent in the running set (keeps arrival order)."""
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival > seq.arrival:
            i -= 1
        self.running.insert(i, seq)

    def remove(self, seq: Sequence) -> None:
        """Finish or abort: drop from the queues and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.alloc.free_all(seq.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- blocks ----------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        need = -(-(seq.num_computed + n) // self.bs) - len(seq.block_table)
        i = seq.num_computed // self.bs
        if seq.num_computed % self.bs and i < len(seq.block_table) and self.alloc.refcount[seq.block_table[i]] > 1:
            need += 1  # copy-on-write of the shared, partly filled block
        return need

    def _reserve(self, seq: Sequence, n: int, copies: list[tuple[int, int]]) -> None:
        """Make room for n more tokens (caller checked that enough blocks are free)."""
        i = seq.num_computed // self.bs
        if seq.num_computed % self.bs and i < len(seq.block_table):
            b, copy = self.alloc.writable(seq.block_table[i])
            if copy:
                copies.append((seq.block_table[i], b))
                seq.block_table[i] = b
        while len(seq.block_table) * self.bs < seq.num_computed + n:
            seq.block_table.append(self.alloc.allocate())

    def _match_prefix(self, seq: Sequence) -> None:
        """Reuse cached full blocks for the start of a (re)admitted sequence. At least one
        token is always left to compute, since its logits are needed to sample. A sequence
        still scoring its prompt bypasses the cache: a cached block has K/V but no logits."""
        assert not seq.block_table and seq.num_computed == 0
        bs = self.bs
        self.hash_blocks(seq)
        if seq.scoring_prompt:
            return
        for i in range((len(seq.token_ids) - 1) // bs):
            b = self.alloc.lookup(seq.block_hashes[i], self._content(seq, i))
            if b is None:
                break
            seq.block_table.append(b)
        seq.num_computed = len(seq.block_table) * bs
        seq.num_hashed = len(seq.block_table)

    def hash_blocks(self, seq: Sequence) -> None:
        """Extend the chain hashes over every full block of the sequence's tokens."""
        bs = self.bs
        while (len(seq.block_hashes) + 1) * bs <= len(seq.token_ids):
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def _content(self, seq: Sequence, i: int) -> bytes:
        parent = seq.block_hashes[i - 1] if i else seq.cache_salt
        return block_content(parent, seq.token_ids[i * self.bs : (i + 1) * self.bs])

    def register_computed(self, seq: Sequence) -> None:
        """After a step: name newly completed full blocks in the prefix cache."""
        if not self.alloc.prefix_caching:
            return
        full = seq.num_computed // self.bs
        if full > seq.num_hashed:
            self.hash_blocks(seq)
            for i in range(seq.num_hashed, full):
                self.alloc.register(seq.block_table[i], seq.block_hashes[i], self._content(seq, i))
            seq.num_hashed = full

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.alloc.free_all(seq.block_table)
        seq.num_computed = 0
        seq.num_hashed = 0
        self.waiting.appendleft(seq)
        self.preemptions_total += 1

    # --- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_batch_tokens
        scheduled: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            while self._blocks_needed(seq, n) > self.alloc.num_free:
                victim = self.running[-1]  # latest arrival loses its blocks first
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._reserve(seq, n, copies)
                scheduled.append((seq, n))
                budget -= n
                i += 1

        # admit waiting sequences FCFS; not in a step that had to preempt (no thrashing)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            self._match_prefix(seq)
            n = min(seq.num_pending, budget)
            if self._blocks_needed(seq, n) > self.alloc.num_free:
                self.alloc.free_all(seq.block_table)  # give back the prefix hits; retry later
                seq.num_computed = seq.num_hashed = 0
                break
            self.waiting.popleft()
            self.alloc.record_prefix_hits(seq.num_hashed)  # the blocks _match_prefix reused
            self._reserve(seq, n, copies)
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n

        if not scheduled and self.waiting and not self.running:
            # a lone sequence that needs more blocks than the pool has: cannot happen if
            # the engine validated the prompt against the pool size
            raise NoFreeBlocks("a single sequence does not fit in the KV block pool")
        return SchedulerOutput(scheduled, copies, preempted)
