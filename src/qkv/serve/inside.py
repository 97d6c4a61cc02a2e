"""The server's "inside" view: attention maps and MoE routing for a text, as JSON.

POST /v1/inside/attention  {"text": ..., "layer": 0, "head": 0}
  -> {"tokens": [...], "layer", "head", "n_layer", "n_head",
      "attention": [[...T...] x T], "entropy": nats per query,
      "routing": null | {"n_expert", "top_k", "load": [[...]], "choices": [[[k ids]] per token] per layer}}

The page (static/inside.js) calls it with the last reply. The forward runs on a private
shadow of the served model (shared weights, see qkv.inspect.attention.shadow) in a worker
thread, so it never races with the engine loop; it runs the blocks up to the asked layer
only and keeps only that layer's map. At most MAX_CONCURRENT inspections run at once (they
compete with generation for the CPU); another one meanwhile gets a 429. Bad input
(layer/head out of range, a text longer than the context, empty text) gets an OpenAI-style
error object with status 400.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from qkv.serve.protocol import APIError

router = APIRouter()

MAX_TOKENS = 512  # a T x T map per request: keep the JSON and the page responsive
MAX_CONCURRENT = 2  # inspections running at once per server


class InsideRequest(BaseModel):
    text: str = Field(..., description="text to run through the model")
    layer: int = 0
    head: int = 0


def _served_model(request: Request):
    engine = getattr(request.app.state, "engine", None)
    model = getattr(engine, "model", None) or getattr(request.app.state, "model", None)
    if model is None:
        raise APIError(503, "no model is loaded in this server", type="server_error")
    return model, getattr(request.app.state, "tokenizer", None) or getattr(engine, "tokenizer", None)


def inside_report(model, tokenizer, text: str, layer: int, head: int) -> dict:
    """The JSON the page draws. Raises ValueError with a clear message on bad input."""
    import torch

    from qkv.inspect.attention import check_layer_head, check_length, head_entropy
    from qkv.inspect.routing import routing_report

    check_layer_head(model, layer, head)
    if tokenizer is None:
        raise ValueError("this server has no tokenizer, so text cannot be inspected")
    ids = tokenizer.encode(text, add_special=True)
    check_length(model, len(ids))
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"the text is {len(ids)} tokens; the inside view shows at most {MAX_TOKENS}: shorten it")
    with torch.no_grad():
        probs = layer_attention(model, ids, layer)  # (H, T, T)
        routing: dict | None = routing_report(model, ids) if model.cfg.is_moe else None
    ent = head_entropy(probs[None, head : head + 1], skip_first=0)  # per query below
    p = probs[head]
    per_query = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return {
        "tokens": [tokenizer.decode([i]) for i in ids],
        "layer": layer,
        "head": head,
        "n_layer": model.cfg.n_layer,
        "n_head": model.cfg.n_head,
        "attention": [[round(float(x), 4) for x in row] for row in p],
        "entropy": [round(float(x), 4) for x in per_query],
        "mean_entropy": round(float(ent[0, 0]), 4),
        "routing": routing,
    }


def layer_attention(model, ids: list[int], layer: int):
    """(H, T, T) attention probabilities of one layer: a shadow of the model runs its
    blocks up to `layer` (the later ones cannot change it) and only that layer keeps its
    map, so memory and time do not grow with the layers after it."""
    import torch

    from qkv.inspect.attention import shadow
    from qkv.model.attention import Attention

    m = shadow(model).eval()
    m.blocks = m.blocks[: layer + 1]
    attn = [mod for mod in m.blocks[layer].modules() if isinstance(mod, Attention)]
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.keep_probs = mod is attn[0]
    m.hidden(torch.tensor([ids], device=next(model.parameters()).device))
    return attn[0].last_probs[0].float().cpu()


@router.post("/v1/inside/attention")
async def inside_attention(req: InsideRequest, request: Request):
    model, tokenizer = _served_model(request)
    slots = _slots(request)
    if slots.locked():
        raise APIError(
            429,
            f"the inside view is busy ({MAX_CONCURRENT} inspections running); retry in a moment",
            "rate_limit_error",
            code="inside_busy",
        )
    async with slots:
        try:
            return await run_in_threadpool(inside_report, model, tokenizer, req.text, req.layer, req.head)
        except ValueError as e:
            raise APIError(400, str(e)) from None


def _slots(request: Request) -> asyncio.Semaphore:
    state = request.app.state
    if getattr(state, "inside_slots", None) is None:  # one per app; the event loop is single-threaded
        state.inside_slots = asyncio.Semaphore(MAX_CONCURRENT)
    return state.inside_slots
