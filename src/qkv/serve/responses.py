"""OpenAI response bodies from engine outputs: a whole reply, or server-sent events.

`ChatFormat` and `CompletionFormat` turn `RequestOutput` increments into the two endpoints'
choices; `complete` collects a whole reply and `sse` streams chunks ending with
`data: [DONE]`. Both abort the generation when the client goes away (results() aborts the
requests it stops reading), and neither ever sends exception text to the client: the log
gets the details.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from qkv.serve.async_engine import EngineDead
from qkv.serve.metrics import Metrics
from qkv.serve.protocol import error_body, new_id, now, usage
from qkv.serve.tools import ReplyStream, ToolPlan, parse_reply

log = logging.getLogger("qkv.serve")


class _Format:
    """Turns RequestOutputs into OpenAI choices (whole or as stream chunks)."""

    object_full: str
    object_chunk: str
    prefix: str

    def __init__(self, tokenizer, model_name: str, n: int):
        self.tok, self.model, self.n = tokenizer, model_name, n
        self.id, self.created = new_id(self.prefix), now()
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[tuple[str, int], int] = {}

    def choice_index(self, out) -> int:
        return out.index

    def account(self, out) -> None:
        if out.prompt_tokens:
            self.prompt_tokens[out.request_id] = out.prompt_tokens
        key = (out.request_id, out.index)
        counted = self.completion_tokens.get(key, 0) + len(out.new_token_ids)
        self.completion_tokens[key] = max(counted, out.completion_tokens or 0)

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens.values()), sum(self.completion_tokens.values()))

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def chunk_choices(self, index: int, text: str, lps, finish: str | None, first: bool) -> list[dict]:
        """The stream chunks' choices for one output (one, unless tool calls end the reply)."""
        return [self.chunk_choice(index, text, lps, finish, first)]

    def envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def plain_frame(self, index: int, text: str, finish: str | None) -> str | None:
        """The SSE event of a chunk that carries only text (no logprobs, not a choice's first),
        written from a template: the same bytes as json.dumps of the chunk at a fraction of
        the cost, since a stream sends one per token. None where a chunk needs more."""
        return None

    def _frame_head(self) -> str:
        if not hasattr(self, "_head"):  # the envelope up to the choice's index, serialized once
            body = json.dumps(self.envelope(self.object_chunk, []), ensure_ascii=False)
            self._head = "data: " + body[: -len("]}")] + '{"index": '
        return self._head


class ChatFormat(_Format):
    prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, model_name: str, n: int, tools: ToolPlan | None = None):
        super().__init__(tokenizer, model_name, n)
        self.tools = tools if tools is not None and tools.parses else None  # parse tool calls out of replies
        self.streams: dict[int, ReplyStream] = {}

    def logprobs(self, lps) -> dict | None:
        if lps is None:
            return None
        content = []
        for lp in lps:
            tok = self.token_text(lp.token_id)
            content.append(
                {
                    "token": tok,
                    "logprob": lp.logprob,
                    "bytes": list(tok.encode("utf-8")),
                    "top_logprobs": [
                        {"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                        for i, v in lp.top
                    ],
                }
            )
        return {"content": content}

    def full_choice(self, index: int, text: str, lps, finish: str | None) -> dict:
        message: dict = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, calls = parse_reply(text, self.tools)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        return {"index": index, "message": message, "logprobs": self.logprobs(lps), "finish_reason": finish}

    def plain_frame(self, index: int, text: str, finish: str | None) -> str | None:
        if self.tools is not None:  # tool calls are parsed out of the text as it streams
            return None
        delta = '{"content": ' + json.dumps(text, ensure_ascii=False) + "}" if text else "{}"
        return (
            f'{self._frame_head()}{index}, "delta": {delta}, "logprobs": null, '
            f'"finish_reason": {json.dumps(finish)}}}]}}\n\n'
        )

    def chunk_choice(self, index: int, text: str, lps, finish: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": self.logprobs(lps), "finish_reason": finish}

    def chunk_choices(self, index: int, text: str, lps, finish: str | None, first: bool) -> list[dict]:
        if self.tools is None:
            return [self.chunk_choice(index, text, lps, finish, first)]
        stream = self.streams.setdefault(index, ReplyStream(self.tools))
        content = stream.push(text)
        if finish is None:
            return [self.chunk_choice(index, content, lps, None, first)]
        rest, calls = stream.finish()
        if not calls:
            return [self.chunk_choice(index, content + rest, lps, finish, first)]
        out = [self.chunk_choice(index, content, lps, None, first)]
        out += [{"index": index, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None} for d in calls]
        out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"})
        return out


class CompletionFormat(_Format):
    prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"

    def __init__(
        self,
        tokenizer,
        model_name: str,
        n: int,
        request_ids: list[str],
        echo: list[tuple[str, list[int]]] | None = None,
        want_logprobs: bool = False,
    ):
        """`echo`: per prompt, its text and ids, to put in front of each choice (echo=true);
        `want_logprobs`: the request asked for logprobs (a choice with no generated token
        still carries its prompt's)."""
        super().__init__(tokenizer, model_name, n)
        self.prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self.offsets: dict[int, int] = {}
        self.echo, self.want_logprobs = echo, want_logprobs
        self.prompt_lps: dict[int, list] = {}  # choice index -> the engine's prompt logprobs

    def account(self, out) -> None:
        super().account(out)
        if out.prompt_logprobs is not None:
            self.prompt_lps[self.choice_index(out)] = out.prompt_logprobs

    def choice_index(self, out) -> int:  # choices are ordered prompt-major, as OpenAI does
        return self.prompt_index[out.request_id] * self.n + out.index

    def logprobs(self, lps, index: int) -> dict | None:
        if lps is None:
            return None
        res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            tok = self.token_text(lp.token_id)
            res["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(tok)
            res["tokens"].append(tok)
            res["token_logprobs"].append(lp.logprob)
            res["top_logprobs"].append({self.token_text(i): v for i, v in lp.top})
        return res

    def full_choice(self, index: int, text: str, lps, finish: str | None) -> dict:
        if self.echo is not None:
            return self._echoed(index, text, lps, finish)
        return {"index": index, "text": text, "logprobs": self.logprobs(lps, index), "finish_reason": finish}

    def plain_frame(self, index: int, text: str, finish: str | None) -> str | None:
        if self.want_logprobs:  # every chunk carries its logprobs object, even an empty one
            return None
        return (
            f'{self._frame_head()}{index}, "text": {json.dumps(text, ensure_ascii=False)}, "logprobs": null, '
            f'"finish_reason": {json.dumps(finish)}}}]}}\n\n'
        )

    def chunk_choice(self, index: int, text: str, lps, finish: str | None, first: bool) -> dict:
        if self.echo is not None and first:  # the prompt goes out with a choice's first chunk
            return self._echoed(index, text, lps, finish)
        return {"index": index, "text": text, "logprobs": self.logprobs(lps, index), "finish_reason": finish}

    # --- echo=true: the prompt, then the completion ------------------------------------------

    def _echoed(self, index: int, text: str, lps, finish: str | None) -> dict:
        prompt_text, prompt_ids = self.echo[index // self.n]
        logprobs = None
        if self.want_logprobs:
            logprobs = self._prompt_logprobs(index, prompt_ids)
            self.offsets[index] = len(prompt_text)  # the completion's offsets follow the prompt text
            for key, values in self.logprobs(lps or [], index).items():
                logprobs[key] += values
        return {"index": index, "text": prompt_text + text, "logprobs": logprobs, "finish_reason": finish}

    def _prompt_logprobs(self, index: int, prompt_ids: list[int]) -> dict:
        """OpenAI's legacy shape for the prompt: no logprob for the first token; each
        position's top alternatives plus the prompt's own token (up to logprobs + 1)."""
        scored = self.prompt_lps.get(index) or [None] * len(prompt_ids)
        res: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for tok_id, lp in zip(prompt_ids, scored):
            tok = self.token_text(tok_id)
            res["tokens"].append(tok)
            res["text_offset"].append(offset)
            offset += len(tok)
            if lp is None:
                res["token_logprobs"].append(None)
                res["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for i, v in lp.top:  # best first; ids that decode alike keep the best one's logprob
                top.setdefault(self.token_text(i), v)
            top.setdefault(tok, lp.logprob)
            res["token_logprobs"].append(lp.logprob)
            res["top_logprobs"].append(top)
        return res


async def complete(fmt: _Format, gen: AsyncIterator, metrics: Metrics, request: Request, endpoint: str) -> JSONResponse:
    """Collect a whole response; abort the generation if the client goes away first."""
    t0 = time.perf_counter()
    texts: dict[int, list[str]] = {}
    lps: dict[int, list | None] = {}
    finish: dict[int, str | None] = {}

    async def collect():
        first = True
        try:
            async for batch in gen:
                for out in batch:
                    if first and out.new_token_ids:
                        metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    i = fmt.choice_index(out)
                    fmt.account(out)
                    texts.setdefault(i, []).append(out.new_text)
                    if out.logprobs is not None:
                        lps.setdefault(i, []).extend(out.logprobs)
                    if out.finished:
                        finish[i] = out.finish_reason
        finally:
            await gen.aclose()

    task = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:  # client gone: cancelling runs results()' finally -> engine.abort
        task.cancel()
        metrics.requests.labels(f"/v1/{endpoint}", "499").inc()
        return JSONResponse(error_body("client disconnected", code="client_closed"), status_code=499)
    task.result()  # an engine failure propagates as a 500
    metrics.latency.observe(time.perf_counter() - t0)
    metrics.requests.labels(f"/v1/{endpoint}", "200").inc()
    choices = [fmt.full_choice(i, "".join(texts.get(i, [])), lps.get(i), finish.get(i)) for i in sorted(texts)]
    body = fmt.envelope(fmt.object_full, choices)
    body["usage"] = fmt.usage()
    return JSONResponse(body)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(fmt: _Format, gen: AsyncIterator, metrics: Metrics, request: Request, stream_options, endpoint: str):
    include_usage = bool(stream_options and stream_options.include_usage)

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def body() -> AsyncIterator[str]:
        t0 = time.perf_counter()
        started: set[int] = set()
        first_token = True
        status = "200"
        try:
            async for batch in gen:
                frames = []  # what arrived since the last write goes out in one write
                for out in batch:
                    if first_token and out.new_token_ids:
                        metrics.ttft.observe(time.perf_counter() - t0)
                        first_token = False
                    i = fmt.choice_index(out)
                    fmt.account(out)
                    first = i not in started
                    if not (out.new_text or out.finished or out.logprobs or first):
                        continue
                    started.add(i)
                    finish = out.finish_reason if out.finished else None
                    frame = None if first or out.logprobs else fmt.plain_frame(i, out.new_text, finish)
                    if frame is not None:
                        frames.append(frame)
                        continue
                    for choice in fmt.chunk_choices(i, out.new_text, out.logprobs, finish, first):
                        frames.append(event(fmt.envelope(fmt.object_chunk, [choice])))
                if frames:
                    yield "".join(frames)
            if include_usage:
                chunk = fmt.envelope(fmt.object_chunk, [])
                chunk["usage"] = fmt.usage()
                yield event(chunk)
            metrics.latency.observe(time.perf_counter() - t0)
        except asyncio.CancelledError:  # client disconnected: results() aborts the request
            status = "499"
            raise
        except Exception as e:  # an engine failure after the headers went out: say so in-band
            status = "503" if isinstance(e, EngineDead) else "500"
            log.exception("stream failed")  # the details go to the log, never to the client
            yield event(error_body(f"generation failed: internal server error: {type(e).__name__}", "server_error"))
        finally:
            await gen.aclose()
            metrics.requests.labels(f"/v1/{endpoint}", status).inc()
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
