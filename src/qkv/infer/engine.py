"""Serving engine: paged KV cache + continuous-batching scheduler + per-request sampling.

Each `step()` asks the scheduler which sequences run and with how many tokens, builds
one padded batch for the decoding rows (one token each) and a few for prompt chunks
(grouped by length), lets the paged cache attend over each row's blocks, samples every
row whose pending tokens are all in (each with its own torch.Generator, so a seeded
request is reproducible whatever else is batched), and turns new tokens into
`RequestOutput` increments: detokenised text that holds back partial UTF-8 and any
tail that could still become a stop string. A request with n > 1 is prefilled once and
then forked into n sequences that share its blocks (copy-on-write).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qkv import lora
from qkv.infer import backend
from qkv.infer.constraints import ConstraintError, GrammarState, GrammarTokenizer, allowed_tokens, mask_logits
from qkv.infer.detokenize import IncrementalDetokenizer
from qkv.infer.kv_cache import kv_bytes_per_token
from qkv.infer.kv_quant import kv_dtype
from qkv.infer.paged import BlockAllocator, PagedKVCache
from qkv.infer.sampling import (
    SamplingError,
    SamplingParams,
    apply_penalties,
    make_generator,
    sample_seed,
    warp,
)
from qkv.infer.scheduler import Scheduler, Sequence
from qkv.infer.stop_strings import StopStrings


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """One increment for one sample of one request."""

    request_id: str
    index: int  # which of the n samples
    new_token_ids: list[int]
    new_text: str  # detokenized increment (holds back partial UTF-8 / possible stop-string prefixes)
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # why the engine aborted this request (a server fault), if it did
    # on a sample's first output, when asked for: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class GenerationResult:
    """A finished sample: what `Engine.generate` returns."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


# --- the engine ------------------------------------------------------------------------


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stops: set[int]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = stops
        self.seqs: list[Sequence] = []
        self.forked = params.n == 1
        self.stops = StopStrings(params.stop)


class _SeqText:
    """Incremental detokenisation and stop-string state of one sequence."""

    __slots__ = ("detok", "held", "token_emitted", "finish_reason", "stop_token", "prompt_sent")

    def __init__(self, tokenizer):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.held = ""  # decoded text not sent yet: its tail could still grow into a stop string
        self.token_emitted = 0  # output tokens already sent
        self.finish_reason: str | None = None
        self.stop_token = False  # last token is eos/stop id: kept in ids, not in the text
        self.prompt_sent = False  # prompt logprobs (if asked for) went out with an output


class Engine:
    """Continuous-batching inference over a paged KV cache. Not thread-safe: one thread
    calls add_request / step / abort (the server wraps it)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 512,
        cache_dtype: torch.dtype | str | None = None,
        prefix_caching: bool = True,
        kv_memory_bytes: int = 1 << 30,
    ):
        self.model = backend.prepare_for_inference(model.eval())
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # a dtype, or a --kv-dtype name (None/"auto": the weights' float dtype; "int8": see kv_quant)
        cache_dtype = cache_dtype if isinstance(cache_dtype, torch.dtype) else kv_dtype(cache_dtype, self.dtype)
        self.block_size = block_size
        if num_blocks is None:
            # enough for max_num_seqs full contexts, capped by a memory budget, but always
            # at least one full context
            per_block = kv_bytes_per_token(self.cfg, cache_dtype) * block_size
            ctx_blocks = -(-self.cfg.max_seq_len // block_size)
            num_blocks = max(ctx_blocks, min(ctx_blocks * max_num_seqs, kv_memory_bytes // per_block))
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be >= 1")
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_caching)
        self.cache = PagedKVCache(self.cfg, num_blocks, block_size, self.device, cache_dtype)
        self.scheduler = Scheduler(self.allocator, max_num_seqs, max_batch_tokens)
        # a sequence can never hold more tokens than the context or the whole pool
        self.max_len = min(self.cfg.max_seq_len, num_blocks * block_size)
        self.requests: dict[str, _Request] = {}
        self._text: dict[int, _SeqText] = {}
        self._pending: list[RequestOutput] = []  # outputs not yet returned by step()
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.generated_tokens_total = 0
        self.steps_total = 0  # steps that ran a forward
        self.step_rows_total = 0  # sequences run, summed over those steps (mean batch = rows / steps)
        self.step_tokens_total = 0  # tokens fed, summed over those steps (prompt chunks + decode tokens)
        # every id that ends a reply (eos, the file's eot/eom, the chat format's end of turn)
        self.end_ids: frozenset[int] = tokenizer.end_ids if tokenizer is not None else frozenset()
        self._grammar: dict[int, GrammarState] = {}  # seq id -> its grammar state (constrained requests)
        self.adapters = set(lora.adapter_names(self.model))  # LoRA adapters a request may name

    # --- requests --------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Check a request without queueing it; returns the prompt as a list of ints."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt_ids = list(prompt_ids)
        V = self.cfg.vocab_size
        if not prompt_ids:
            raise ValueError("empty prompt; give at least one token")
        if not all(isinstance(t, int) and 0 <= t < V for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {V})")
        # a prompt scored without a reply (max_tokens=0) may fill the whole context
        if len(prompt_ids) >= self.max_len + (params.max_tokens == 0):
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens is too long: the context holds {self.max_len} "
                f"tokens including the reply; shorten the prompt"
            )
        if any(t >= V for t in params.stop_token_ids):
            raise SamplingError("stop_token_ids", f"invalid stop_token_ids: ids must be < vocab size {V}")
        if params.adapter is not None and params.adapter not in self.adapters:
            raise ValueError(f"no LoRA adapter named {params.adapter!r}; this engine has {sorted(self.adapters)}")
        if params.constraint is not None:
            if self.tokenizer is None:
                raise ConstraintError(params.constraint.param, "constrained decoding needs the engine's tokenizer")
            params.constraint.validate()
        return prompt_ids

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Validate everything, then queue. Raises ValueError (SamplingError for a bad
        parameter) before any work is done."""
        prompt_ids = self.validate(prompt_ids, params)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use; pick another")
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self.end_ids
        req = _Request(request_id, prompt_ids, params, stops)
        base_seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)))
        seq = self._new_seq(req, 0, list(prompt_ids), base_seed, next(self._arrivals))
        if params.constraint is not None:
            gtok = GrammarTokenizer.of(self.tokenizer, self.cfg.vocab_size)
            self._grammar[seq.seq_id] = GrammarState(gtok, params.constraint, stops)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    def _new_seq(self, req: _Request, index: int, token_ids: list[int], seed: int, arrival: int) -> Sequence:
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=req.request_id,
            index=index,
            arrival=arrival,
            token_ids=token_ids,
            num_prompt=len(req.prompt_ids),
            generator=None if req.params.greedy else make_generator(sample_seed(seed, index), self.device),
            seed=seed,
            prompt_logprobs=[None] if req.params.prompt_logprobs is not None else None,
            cache_salt=None if req.params.adapter is None else b"lora:" + req.params.adapter.encode(),
        )
        req.seqs.append(seq)
        self._text[seq.seq_id] = _SeqText(self.tokenizer)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks are freed at once and a final output with
        finish_reason "abort" is returned by the next step()."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                seq.finished = True
                self.scheduler.remove(seq)
                st = self._text[seq.seq_id]
                st.finish_reason = "abort"
                out = self._output(req, seq, st, final=True)
                if out is not None:  # a final output always is
                    self._pending.append(out)
            self._text.pop(seq.seq_id, None)
            self._grammar.pop(seq.seq_id, None)
        for i in range(len(req.seqs), req.params.n):  # samples not forked yet
            self._pending.append(
                RequestOutput(
                    request_id,
                    i,
                    [],
                    "",
                    [] if req.params.logprobs is not None else None,
                    True,
                    "abort",
                    len(req.prompt_ids),
                    0,
                )
            )

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    def stats(self) -> dict:
        return dict(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            blocks_total=self.allocator.num_blocks,
            blocks_used=self.allocator.num_used,
            blocks_free=self.allocator.num_free,
            generated_tokens_total=self.generated_tokens_total,
            preemptions_total=self.scheduler.preemptions_total,
            prefix_cache_hits=self.allocator.prefix_hits,
            steps_total=self.steps_total,
            step_rows_total=self.step_rows_total,
            step_tokens_total=self.step_tokens_total,
            max_num_seqs=self.scheduler.max_num_seqs,
        )

    # --- one iteration -----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_work():
            return outputs
        sched = self.scheduler.schedule()
        if sched.scheduled:
            self.steps_total += 1
            self.step_rows_total += len(sched.scheduled)
            self.step_tokens_total += sum(n for _, n in sched.scheduled)
        for src, dst in sched.copies:
            self.cache.copy_block(src, dst)
        # decode rows (one token) and prompt chunks run as separate padded batches, so a
        # long chunk never pads every decoding row to its length
        to_sample: list[tuple[Sequence, torch.Tensor]] = []
        decode = [(s, n) for s, n in sched.scheduled if n == 1]
        chunks = sorted(((s, n) for s, n in sched.scheduled if n > 1), key=lambda x: -x[1])
        groups = [decode] if decode else []
        for s, n in chunks:  # prompt chunks of similar length together: little padding
            if groups and groups[-1][0][1] > 1 and (4 * n > 3 * groups[-1][0][1] or len(groups) >= 4):
                groups[-1].append((s, n))
            else:
                groups.append([(s, n)])
        for group in groups:
            to_sample += self._forward(group)
        for seq, n in sched.scheduled:
            seq.num_computed += n
            self.scheduler.register_computed(seq)
        outputs += self._sample_and_emit(to_sample)
        return outputs

    def _forward(self, group: list[tuple[Sequence, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """One forward over a padded batch; returns last-position logits of the rows
        whose pending tokens are now all computed (they sample next)."""
        dev = self.device
        B = len(group)
        T = max(n for _, n in group)
        start = torch.tensor([s.num_computed for s, _ in group], device=dev)
        lens = torch.tensor([n for _, n in group], device=dev)
        nblk = max(len(s.block_table) for s, _ in group)
        tables = torch.tensor([s.block_table + [0] * (nblk - len(s.block_table)) for s, _ in group], device=dev)
        tok = torch.zeros(B, T, dtype=torch.long)
        for b, (s, n) in enumerate(group):
            tok[b, :n] = torch.tensor(s.token_ids[s.num_computed : s.num_computed + n])
        tok = tok.to(dev)

        self.cache.prepare(tables, start, lens, T)
        # the paged cache attends itself; the plain path (inspection, math attention) asks it
        # for each layer's mask (cache.layer_mask), since each layer may have its own window
        positions = self.cache.pos.clamp(max=self.cfg.max_seq_len - 1)
        adapters = [
            self.requests[s.request_id].params.adapter if s.request_id in self.requests else None for s, _ in group
        ]
        with lora.adapter_rows(self.model, adapters):  # each row its own adapter, or the base
            h = backend.hidden(self.model, tok, positions, self.cache)

        for b, (s, n) in enumerate(group):
            if s.scoring_prompt:
                self._score_prompt(s, h[b, :n])
        rows = [b for b, (s, n) in enumerate(group) if s.num_computed + n == len(s.token_ids)]
        if not rows:
            return []
        r = torch.tensor(rows, device=dev)
        logits = backend.logits(self.model, h[r, lens[r] - 1]).float()
        return [(group[b][0], logits[i]) for i, b in enumerate(rows)]

    def _score_prompt(self, seq: Sequence, h: torch.Tensor) -> None:
        """Prompt logprobs from one prefill chunk's hidden states: position p's logits score
        token p + 1. The chunk starts at seq.num_computed (not advanced yet); after a
        preemption the prompt is computed again but scored only once."""
        req = self.requests.get(seq.request_id)
        scored = seq.prompt_logprobs
        if req is None or scored is None:
            return
        k = req.params.prompt_logprobs or 0
        first = len(scored)  # next prompt position to score
        last = min(seq.num_computed + h.shape[0] + 1, seq.num_prompt)  # exclusive
        if first >= last:
            return
        assert first - 1 >= seq.num_computed, "prompt scoring fell behind the prefill"
        rows = h[first - 1 - seq.num_computed : last - 1 - seq.num_computed]
        lsm = torch.log_softmax(backend.logits(self.model, rows).float(), -1)
        targets = torch.tensor(seq.token_ids[first:last], device=lsm.device)
        chosen = lsm.gather(1, targets[:, None])[:, 0].tolist()
        best = torch.topk(lsm, k)  # k = 0 gives empty rows
        for t, lp, ids, values in zip(targets.tolist(), chosen, best.indices.tolist(), best.values.tolist()):
            scored.append(TokenLogprob(t, lp, list(zip(ids, values))))

    # --- sampling, stopping, detokenising -----------------------------------------------
    def _sample_and_emit(self, to_sample: list[tuple[Sequence, torch.Tensor]]) -> list[RequestOutput]:
        work: list[tuple[_Request, Sequence, torch.Tensor]] = []
        for seq, logits in to_sample:
            req = self.requests.get(seq.request_id)
            if req is None or seq.finished:
                continue
            if not req.forked:  # the prompt is in: n samples now share its blocks
                req.forked = True
                for i in range(1, req.params.n):
                    child = self._new_seq(req, i, list(seq.token_ids), seq.seed, seq.arrival)
                    child.block_table = list(seq.block_table)
                    for b in child.block_table:
                        self.allocator.fork(b)
                    child.num_computed = seq.num_computed
                    child.num_hashed = seq.num_hashed
                    child.block_hashes = list(seq.block_hashes)
                    child.prompt_logprobs = seq.prompt_logprobs  # complete now; read-only
                    if seq.seq_id in self._grammar:
                        self._grammar[child.seq_id] = self._grammar[seq.seq_id].fork()
                    self.scheduler.add_running(child)
                    work.append((req, child, logits))
            work.append((req, seq, logits))
        work.sort(key=lambda w: (w[1].arrival, w[1].index))
        work, raw = self._apply_grammar(work)

        outputs = []
        for req, seq, _ in work:
            if req.params.max_tokens == 0:  # the prompt was only to be scored: done, nothing sampled
                st = self._text[seq.seq_id]
                st.finish_reason = "length"
                outputs.append(self._output(req, seq, st, final=True))
                self._finish(req, seq)
        work = [w for w in work if w[0].params.max_tokens > 0]
        greedy_rows = [i for i, (rq, _, _) in enumerate(work) if rq.params.greedy and not _has_penalty(rq.params)]
        greedy_tok = {}
        if greedy_rows:
            stacked = torch.stack([work[i][2] for i in greedy_rows])
            greedy_tok = dict(zip(greedy_rows, stacked.argmax(-1).tolist()))
        failed: dict[str, str] = {}  # request id -> why its sampling failed
        for i, (req, seq, logits) in enumerate(work):
            if req.request_id in failed:
                continue
            try:
                tok, lp = self._sample(req, seq, logits, greedy_tok.get(i), raw.get(i))
                if seq.seq_id in self._grammar:
                    self._grammar[seq.seq_id].accept(tok)
            except Exception as e:  # one request's numbers must not fail the whole batch
                failed[req.request_id] = f"sampling failed: {type(e).__name__}: {e}"
                continue
            outputs.append(self._append(req, seq, tok, lp))
        for rid, error in failed.items():
            self.abort(rid)  # frees its blocks; its final outputs carry the error
            for o in self._pending:
                if o.request_id == rid:
                    o.error = error
        return [o for o in outputs if o is not None]

    def _apply_grammar(
        self, work: list[tuple[_Request, Sequence, torch.Tensor]]
    ) -> tuple[list[tuple[_Request, Sequence, torch.Tensor]], dict[int, torch.Tensor]]:
        """Constrained rows get their logits masked to what their grammar allows; returns
        the new work list and, per masked row, its unmasked logits (logprobs report the
        model's own distribution, as vLLM does)."""
        rows = [i for i, (_, seq, _) in enumerate(work) if seq.seq_id in self._grammar]
        if not rows:
            return work, {}
        allowed = allowed_tokens([self._grammar[work[i][1].seq_id] for i in rows], work[rows[0]][2].shape[-1])
        allowed = allowed.to(work[rows[0]][2].device)
        raw = {}
        work = list(work)
        for k, i in enumerate(rows):
            req, seq, logits = work[i]
            raw[i] = logits
            work[i] = (req, seq, mask_logits(logits, allowed[k]))
        return work, raw

    def _sample(
        self,
        req: _Request,
        seq: Sequence,
        logits: torch.Tensor,
        greedy_tok: int | None,
        raw: torch.Tensor | None = None,
    ) -> tuple[int, TokenLogprob | None]:
        p = req.params
        if greedy_tok is not None:
            tok = greedy_tok
        else:
            x = apply_penalties(logits, p, req.prompt_ids, seq.output_ids)
            if p.greedy:
                tok = int(x.argmax())
            else:
                tok = int(torch.multinomial(warp(x, p).softmax(-1), 1, generator=seq.generator))
        lp = None
        if p.logprobs is not None:
            lsm = torch.log_softmax(logits if raw is None else raw, -1)
            top = torch.topk(lsm, p.logprobs) if p.logprobs > 0 else None
            lp = TokenLogprob(
                tok,
                float(lsm[tok]),
                [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())),
            )
        return tok, lp

    def _append(self, req: _Request, seq: Sequence, tok: int, lp: TokenLogprob | None) -> RequestOutput | None:
        seq.token_ids.append(tok)
        self.generated_tokens_total += 1
        st = self._text[seq.seq_id]
        if lp is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(lp)
        n_out = len(seq.token_ids) - seq.num_prompt
        if tok in req.stop_ids:
            st.finish_reason, st.stop_token = "stop", True
        elif n_out >= req.params.max_tokens or len(seq.token_ids) >= self.max_len:
            st.finish_reason = "length"
        out = self._output(req, seq, st, final=st.finish_reason is not None)
        if st.finish_reason is not None:
            self._finish(req, seq)
        return out

    def _output(self, req: _Request, seq: Sequence, st: _SeqText, final: bool) -> RequestOutput | None:
        # only the new tokens are decoded (a stop token's text is left out) and only the
        # text not sent yet is searched: a step costs the same at any output length
        n_out = len(seq.token_ids) - seq.num_prompt
        if st.detok is not None:
            n_text = n_out - 1 if st.stop_token else n_out
            st.held += st.detok.push(seq.token_ids[seq.num_prompt + len(st.detok.ids) : seq.num_prompt + n_text])
            if final:
                st.held += st.detok.flush()
        text = st.held
        if req.stops and st.finish_reason != "abort":
            # sent text never holds the start of a stop string (see StopStrings.held), so
            # a match lies wholly in the held text
            hit = req.stops.first_hit(text, 0)
            if hit is not None:
                text = text[:hit]
                st.finish_reason, final = "stop", True
                self._finish(req, seq)
        end = len(text) if final else len(text) - req.stops.held(text, len(text))
        new_text, st.held = text[:end], text[end:]
        new_ids = seq.token_ids[seq.num_prompt + st.token_emitted :]
        st.token_emitted = n_out
        if not final and not new_ids and not new_text:
            return None
        lps = seq.logprobs
        prompt_lps = None
        if not st.prompt_sent and seq.prompt_logprobs is not None:
            prompt_lps, st.prompt_sent = seq.prompt_logprobs, True
        return RequestOutput(
            request_id=req.request_id,
            index=seq.index,
            new_token_ids=new_ids,
            new_text=new_text,
            logprobs=lps[len(lps) - len(new_ids) :] if lps is not None and req.params.logprobs is not None else None,
            finished=final,
            finish_reason=st.finish_reason if final else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=n_out,
            prompt_logprobs=prompt_lps,
        )

    def _finish(self, req: _Request, seq: Sequence) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.scheduler.remove(seq)
        self._grammar.pop(seq.seq_id, None)
        if req.forked and all(s.finished for s in req.seqs) and len(req.seqs) == req.params.n:
            self.requests.pop(req.request_id, None)
            for s in req.seqs:
                self._text.pop(s.seq_id, None)

    # --- conveniences ------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[GenerationResult]]:
        """Run prompts to completion; per prompt, its n samples."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams; give one or one each")
        prompts = [self.validate(prompt, p) for prompt, p in zip(prompts, plist)]  # all, before any work
        ids = []
        for prompt, p in zip(prompts, plist):
            ids.append(self.add_request(prompt, p))
        acc = {
            rid: [GenerationResult([], "", [] if p.logprobs is not None else None, None) for _ in range(p.n)]
            for rid, p in zip(ids, plist)
        }
        left = sum(p.n for p in plist)
        while left:
            for o in self.step():
                if o.request_id not in acc:
                    self._pending.append(o)  # someone else's request: keep it for them
                    continue
                r = acc[o.request_id][o.index]
                r.token_ids += o.new_token_ids
                r.text += o.new_text
                if o.logprobs is not None and r.logprobs is not None:
                    r.logprobs += o.logprobs
                if o.finished:
                    r.finish_reason = o.finish_reason
                    left -= 1
            if left and not self.scheduler.has_work() and not any(o.request_id in acc for o in self._pending):
                raise RuntimeError("engine stopped with unfinished requests (they were aborted?)")
        return [acc[rid] for rid in ids]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Add one request and yield its outputs as they are produced."""
        rid = self.add_request(prompt_ids, params)
        left = params.n
        try:
            while left:
                others = []
                for o in self.step():
                    if o.request_id != rid:
                        others.append(o)
                        continue
                    left -= o.finished
                    yield o
                self._pending = others + self._pending
        finally:
            if left:
                self.abort(rid)
                self._pending = [o for o in self._pending if o.request_id != rid]


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
