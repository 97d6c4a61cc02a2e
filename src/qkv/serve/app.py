"""The OpenAI-compatible HTTP server: `create_app(engine, model_name, ...)` -> FastAPI app.

Routes: GET /v1/models, POST /v1/completions (echo=true returns the prompt's logprobs, as
lm-evaluation-harness needs), POST /v1/chat/completions (streamed as server-sent events
ending with `data: [DONE]`), POST /v1/embeddings (serve/embeddings.py), POST /tokenize,
POST /detokenize, GET /tokenizer_info (serve/tokenizer_routes.py), POST
/v1/inside/attention (the page's inside view, serve/inside.py), GET /health, GET /metrics,
and the chat page at GET /.
All generation goes through one `AsyncEngine` (one thread, continuous batching); handlers
only tokenize (in a worker thread, so one long prompt never freezes the other streams),
submit and format (serve/responses.py). Every request first passes the guard
(serve/guard.py): Host allow-list, API key, JSON-only bodies, body size.

Every failure a client can cause is an OpenAI error object {"error": {message, type,
param, code}} with a 4xx status: 400 bad parameters / prompt longer than the context,
401 missing or wrong API key, 404 unknown model or route, 413 body too large, 415 an API
body not sent as application/json, 421 a Host header not in the allow-list (DNS
rebinding), 429 queue full. A user error is never a 500, and nothing a client sends stops
the server; a request the engine fails on is a 500 for that request alone, and a stopped
engine is a 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkv.infer.constraints import Constraint, ConstraintError, GrammarTokenizer
from qkv.infer.sampling import DEFAULT_SAMPLING, SamplingDefaults, SamplingError
from qkv.serve import tools
from qkv.serve.async_engine import AsyncEngine, EngineDead, QueueFull
from qkv.serve.embeddings import embedding_card, embedding_router
from qkv.serve.guard import Guard
from qkv.serve.inside import router as inside_router
from qkv.serve.metrics import CONTENT_TYPE, Metrics
from qkv.serve.protocol import (
    MAX_TOP_LOGPROBS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    model_card,
    now,
)
from qkv.serve.responses import ChatFormat, CompletionFormat, complete, sse
from qkv.serve.tokenizer_routes import tokenizer_router

log = logging.getLogger("qkv.serve")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 4 * 2**20


@dataclass
class _Served:
    """What the routes of one app share."""

    aengine: AsyncEngine
    tokenizer: object
    model_name: str
    max_model_len: int
    max_queue: int
    metrics: Metrics
    created: int
    allow_special_in_content: bool = False
    sampling_defaults: SamplingDefaults = DEFAULT_SAMPLING  # for the sampling fields a request omits


def create_app(
    engine,
    model_name: str,
    api_key: str | None = None,
    max_queue: int = 256,
    *,
    tokenizer=None,
    max_model_len: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    allowed_hosts: Iterable[str] | None = None,
    metrics_auth: bool = False,
    allow_special_in_content: bool = False,
    sampling_defaults: SamplingDefaults = DEFAULT_SAMPLING,
) -> FastAPI:
    """Wrap `engine` (a qkv.infer.Engine) in the OpenAI API. The engine loop starts with the
    app (lifespan) and stops with it. `tokenizer`/`max_model_len` default to the engine's;
    `allowed_hosts` (Host header names served; "*" = any) defaults to the loopback names;
    `metrics_auth` makes /metrics require the API key too; `allow_special_in_content` lets
    special-token text inside chat messages act as control tokens (off: clients cannot forge turns);
    `sampling_defaults` fills the sampling fields a request leaves out (the model's own, else
    qkv's shared set, as `qkv generate` uses)."""
    if metrics_auth and not api_key:
        raise ValueError("metrics_auth needs an API key to check: pass api_key (qkv serve --api-key)")
    aengine = AsyncEngine(engine, max_queue=max_queue)
    served = _Served(
        aengine=aengine,
        tokenizer=tokenizer if tokenizer is not None else engine.tokenizer,
        model_name=model_name,
        max_model_len=max_model_len or engine.model.cfg.max_seq_len,
        max_queue=max_queue,
        metrics=Metrics(aengine, model_name),
        created=now(),
        allow_special_in_content=allow_special_in_content,
        sampling_defaults=sampling_defaults,
    )
    app = FastAPI(title="qkv", lifespan=_engine_running(aengine), docs_url=None, redoc_url=None)
    app.state.engine, app.state.aengine, app.state.tokenizer = engine, aengine, served.tokenizer
    app.state.model_name, app.state.metrics = model_name, served.metrics
    app.add_middleware(
        Guard, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts, metrics_auth=metrics_auth
    )
    _add_error_handlers(app, served.metrics)
    app.include_router(_service_routes(served))
    app.include_router(_model_routes(served))
    app.include_router(_generation_routes(served))
    app.include_router(inside_router)
    app.include_router(tokenizer_router(served.tokenizer, model_name, served.max_model_len))
    app.include_router(embedding_router(model_name, served.max_model_len))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _engine_running(aengine: AsyncEngine):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        try:
            yield
        finally:
            aengine.shutdown()

    return lifespan


# --- errors: always an OpenAI error object ----------------------------------------------------


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e.status, e.body(), metrics, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(400, _validation_body(e), metrics, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(e.status_code, error_body(str(e.detail), kind), metrics, request)

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, e: EngineDead):
        return _error_response(503, error_body(str(e), "server_error", code="engine_unavailable"), metrics, request)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(
            500, error_body(f"internal server error: {type(e).__name__}", "server_error"), metrics, request
        )


# --- the page, liveness and metrics -------------------------------------------------------------


def _service_routes(served: _Served) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @router.get("/health")
    async def health():
        aengine = served.aengine
        if not aengine.alive:
            reason = type(aengine.error).__name__ if aengine.error is not None else "shut down"
            return JSONResponse({"status": "engine stopped", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @router.get("/metrics")
    async def prometheus():
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    return router


# --- /v1/models ---------------------------------------------------------------------------------


def _model_routes(served: _Served) -> APIRouter:
    router = APIRouter()
    card = model_card(served.model_name, served.max_model_len, served.created)
    card["embeddings"] = embedding_card(served.aengine.engine.model)  # how /v1/embeddings pools
    cards = {served.model_name: card}
    for a in sorted(_adapters(served)):  # LoRA adapters: "base:name", served by the same engine
        cards[f"{served.model_name}:{a}"] = {
            **model_card(f"{served.model_name}:{a}", served.max_model_len, served.created),
            "parent": served.model_name,
        }

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": list(cards.values())}

    @router.get("/v1/models/{name:path}")
    async def get_model(name: str):
        _check_model(name, served.model_name, _adapters(served))
        return cards[name]

    return router


# --- /v1/chat/completions and /v1/completions ---------------------------------------------------


def _generation_routes(served: _Served) -> APIRouter:
    router = APIRouter()
    tokenizer, model_name, ctx = served.tokenizer, served.model_name, served.max_model_len

    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        adapter = _check_model(req.model, model_name, _adapters(served))
        # off the loop: streams keep flowing (a first grammar request also builds the token trie)
        prompt, tool_plan, constraint = await run_in_threadpool(_structured_chat, served, req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(
                400,
                f"invalid top_logprobs: {req.top_logprobs}; must be in [0, {MAX_TOP_LOGPROBS}]",
                param="top_logprobs",
            )
        explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = _budget(len(prompt), explicit, ctx, "messages")
        params = _params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, served.sampling_defaults)
        params.constraint, params.adapter = constraint, adapter
        rids, q = await _submit_all(served, [prompt], params)
        gen = served.aengine.results(rids, q)
        fmt = ChatFormat(tokenizer, req.model, req.n, tool_plan)  # the name asked for: base or base:adapter
        if req.stream:
            return sse(fmt, gen, served.metrics, request, req.stream_options, "chat")
        return await complete(fmt, gen, served.metrics, request, "chat")

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter = _check_model(req.model, model_name, _adapters(served))
        if req.suffix:
            raise APIError(400, "suffix is not supported by this model", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(
                400, f"invalid logprobs: {req.logprobs}; must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs"
            )
        _check_prompt_count(req.prompt, served.max_queue, served.aengine.in_flight)  # before any tokenizing
        prompts = await run_in_threadpool(_completion_prompts, req.prompt, tokenizer)
        longest = max(len(p) for p in prompts)
        if req.echo:
            max_tokens = _echo_budget(longest, req.max_tokens, ctx)
        else:
            max_tokens = _budget(longest, req.max_tokens, ctx, "prompt", default=16)
        params = _params(req, max_tokens, req.logprobs, served.sampling_defaults)
        constraint = req.constraint()
        if constraint is not None:  # compiling a grammar is work for a thread; no grammar, no hop
            params.constraint = await run_in_threadpool(_checked_constraint, served, constraint)
        params.adapter = adapter
        echo = await run_in_threadpool(_echo_texts, req.prompt, prompts, tokenizer) if req.echo else None
        rids, q = await _submit_all(served, prompts, params)
        gen = served.aengine.results(rids, q)
        fmt = CompletionFormat(tokenizer, req.model, req.n, rids, echo, want_logprobs=req.logprobs is not None)
        if req.stream:
            return sse(fmt, gen, served.metrics, request, req.stream_options, "completions")
        return await complete(fmt, gen, served.metrics, request, "completions")

    return router


async def _submit_all(served: _Served, prompts: list[list[int]], params) -> tuple[list[str], asyncio.Queue]:
    """Submit every prompt; wait until the engine accepted all of them, so a refusal is a
    proper 4xx even for a stream (whose headers have not gone out yet)."""
    q: asyncio.Queue = asyncio.Queue()
    rids, futures = [], []
    try:
        for ids in prompts:
            rid, _, fut = served.aengine.submit(ids, params, q)
            rids.append(rid)
            futures.append(fut)
        await asyncio.gather(*futures)
    except BaseException as e:
        for rid in rids:
            served.aengine.abort(rid)
        if isinstance(e, QueueFull):
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        if isinstance(e, EngineDead):
            raise APIError(503, str(e), "server_error", code="engine_unavailable") from None
        if isinstance(e, ValueError):  # the engine's own validation: the client's fault
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None
        raise
    for ids in prompts:
        served.metrics.prompt_tokens.inc(len(ids))
    return rids, q


# --- request checks ------------------------------------------------------------------------


def _adapters(served: _Served) -> set[str]:
    return getattr(served.aengine.engine, "adapters", set())


def _check_model(name: str, model_name: str, adapters: set[str] = frozenset()) -> str | None:
    """The LoRA adapter a request's model name asks for ("base:name"), None for the base; a 404
    for any other name."""
    if name == model_name:
        return None
    base, _, adapter = name.rpartition(":")
    if base == model_name and adapter in adapters:
        return adapter
    raise APIError(
        404,
        f"the model '{name}' does not exist; this server serves '{model_name}' (see GET /v1/models)",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def _budget(prompt_len: int, requested: int | None, ctx: int, param: str, default: int | None = None) -> int:
    """max_tokens for a prompt: the request's (which must fit the context) or what is left."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty; send at least one token", param=param)
    if prompt_len >= ctx:
        raise APIError(
            400,
            f"this model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens; shorten it",
            param=param,
            code="context_length_exceeded",
        )
    left = ctx - prompt_len
    if requested is None:
        return left if default is None else min(default, left)
    if requested < 1:
        raise APIError(400, f"invalid max_tokens: {requested}; must be >= 1", param="max_tokens")
    if requested > left:
        raise APIError(
            400,
            f"this model's maximum context length is {ctx} tokens; you requested {prompt_len + requested} "
            f"({prompt_len} in the prompt, {requested} for the completion); lower max_tokens or shorten "
            "the prompt",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _echo_budget(prompt_len: int, requested: int | None, ctx: int) -> int:
    """max_tokens with echo=true: 0 is allowed (score the prompt only), and then the prompt
    may fill the whole context; otherwise as without echo."""
    if requested != 0:
        return _budget(prompt_len, requested, ctx, "prompt", default=16)
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty; send at least one token", param="prompt")
    if prompt_len > ctx:
        raise APIError(
            400,
            f"this model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens; shorten it",
            param="prompt",
            code="context_length_exceeded",
        )
    return 0


def _echo_texts(prompt, prompts: list[list[int]], tokenizer) -> list[tuple[str, list[int]]]:
    """Per prompt, the text echoed in front of its choices: a string prompt as sent, a
    token-id prompt decoded."""
    if isinstance(prompt, str):
        prompt = [prompt]
    texts = [p if isinstance(p, str) else None for p in prompt] if prompt and isinstance(prompt[0], str) else []
    return [(texts[i] if i < len(texts) else tokenizer.decode(ids), ids) for i, ids in enumerate(prompts)]


def _params(req, max_tokens: int, logprobs: int | None, defaults: SamplingDefaults):
    try:
        return req.sampling_params(max_tokens, logprobs, defaults)
    except SamplingError as e:
        raise APIError(400, str(e), param=e.param) from None


def _chat_prompt(tokenizer, messages: list[dict], allow_special_in_content: bool = False) -> list[int]:
    try:
        return tokenizer.encode_chat(
            messages, add_generation_prompt=True, allow_special_in_content=allow_special_in_content
        )[0]
    except Exception as e:  # template errors (raise_exception, bad roles) are the request's fault
        raise APIError(400, f"could not apply the chat template to messages: {e}", param="messages") from None


def _check_prompt_count(prompt, max_queue: int, in_flight: int) -> None:
    """Each prompt of a list is one request in the queue: refuse a list that cannot be
    admitted before spending time on tokenizing it."""
    many = isinstance(prompt, list) and bool(prompt) and not all(isinstance(p, int) for p in prompt)
    count = len(prompt) if many else 1
    if count > max_queue:
        raise APIError(
            400,
            f"the prompt list has {count} prompts; this server takes at most {max_queue} per request: split it",
            param="prompt",
        )
    if count > max_queue - in_flight:
        raise APIError(
            429,
            f"server is at capacity ({in_flight} of {max_queue} requests in flight, {count} asked); retry later",
            "rate_limit_error",
            code="queue_full",
        )


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = tokenizer.encode(p, add_special=True) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param="prompt"
            )
        out.append(ids)
    return out


def _validation_body(e: RequestValidationError) -> dict:
    err = e.errors()[0] if e.errors() else {}
    if err.get("type") == "json_invalid":
        return error_body(
            f"could not parse the request body as JSON: {err.get('ctx', {}).get('error', 'invalid JSON')}",
            code="invalid_json",
        )
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None  # the top-level field; the full path goes in the message
    if err.get("type") == "extra_forbidden":
        return _unsupported_field_body(loc)
    msg = err.get("msg", "invalid request")
    if err.get("type") == "missing":
        msg = "missing required field"
    if param is None:
        return error_body(f"the request body must be a JSON object: {msg}")
    return error_body(f"invalid {'.'.join(loc)}: {msg}", param=param)


# --- structured output and tools ---------------------------------------------------------------


def _unsupported_field_body(loc: list[str]) -> dict:
    name = ".".join(loc)
    return error_body(f"unsupported field {name!r}: this server does not implement it; remove it", param=loc[0])


def _checked_constraint(served: _Served, constraint: Constraint | None) -> Constraint | None:
    """Compile the constraint now (a bad one is a 400 before any generation) and make sure
    the tokenizer's grammar view exists (`qkv serve` builds it at startup: its build holds
    the GIL, so done here it would stall every running stream)."""
    if constraint is None:
        return None
    try:
        constraint.validate()
    except ConstraintError as e:
        raise APIError(400, str(e), param=e.param.split("[")[0].split(".")[0]) from None
    engine = served.aengine.engine
    GrammarTokenizer.of(engine.tokenizer, engine.cfg.vocab_size)
    return constraint


def _structured_chat(
    served: _Served, req: ChatCompletionRequest
) -> tuple[list[int], tools.ToolPlan, Constraint | None]:
    """The prompt (tools rendered in), the tool plan and the grammar of a chat request."""
    tools.check_messages(req)
    try:
        plan = tools.plan(req)
    except ConstraintError as e:
        raise APIError(400, str(e), param="tools") from None
    asked, forced = req.constraint(), tools.constraint(plan)
    if asked is not None and forced is not None:
        raise APIError(
            400, f"{asked.param} and a forced tool call both constrain the reply; send one", param=asked.param
        )
    messages = []
    for m in req.messages:
        d: dict = {"role": m.role, "content": m.text() if m.content is not None else None}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        messages.append(d)
    uses_tools = bool(plan.tools) or any(m.role == "tool" or m.tool_calls for m in req.messages)
    if not uses_tools:
        prompt = _chat_prompt(served.tokenizer, messages, served.allow_special_in_content)
    elif tools.template_takes_tools(served.tokenizer):
        try:
            prompt = tools.encode_native(served.tokenizer, messages, plan, served.allow_special_in_content)
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"could not apply the chat template to messages: {e}", param="messages") from None
    else:
        generic = tools.messages_for_template(messages, plan, native=False)
        prompt = _chat_prompt(served.tokenizer, generic, served.allow_special_in_content)
    return prompt, plan, _checked_constraint(served, forced or asked)


_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings")


def _error_response(status: int, body: dict, metrics: Metrics, request: Request) -> JSONResponse:
    path = request.url.path if request.url.path in _ENDPOINTS else "other"  # bounded label values
    metrics.requests.labels(path, str(status)).inc()
    return JSONResponse(body, status_code=status)
