"""POST /v1/embeddings: one vector per input, in OpenAI's shape.

An embedding is the mean over the input's tokens of the model's final hidden states, taken
after the final norm (the vectors the LM head reads), in float32: d_model numbers. The
model is a causal LM, not trained for retrieval, so the vectors are a faithful view of the
model rather than a tuned sentence embedding; /v1/models states the pooling.

    {"model", "input": str | [str] | [ids] | [[ids]], "encoding_format": "float" | "base64"}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
        "usage": {"prompt_tokens", "total_tokens"}}

base64 is the little-endian float32 bytes, as OpenAI sends them (the openai client decodes
it). Each input runs alone through a private shadow of the served model (shared weights,
see qkv.inspect.attention.shadow) in a worker thread, so no padding changes a vector and
nothing races with the engine loop; one embedding request computes at a time.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from qkv.serve.protocol import APIError, usage

MAX_INPUTS = 256  # per request; more would hold the model for long


def embedding_card(model) -> dict:
    """What /v1/models says about this endpoint's vectors."""
    return {"dimensions": model.cfg.d_model, "pooling": "mean", "layer": "final hidden states after the final norm"}


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def embedding_router(model_name: str, max_model_len: int) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        if req.model != model_name:
            raise APIError(
                404,
                f"the model '{req.model}' does not exist; this server serves '{model_name}' (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        state = request.app.state
        model, tokenizer = state.engine.model, state.tokenizer
        if req.dimensions is not None and req.dimensions != model.cfg.d_model:
            raise APIError(
                400,
                f"invalid dimensions: {req.dimensions}; this model's embeddings have {model.cfg.d_model} "
                "(leave dimensions out)",
                param="dimensions",
            )
        inputs = await run_in_threadpool(_token_lists, req.input, tokenizer, max_model_len)
        if getattr(state, "embedding_lock", None) is None:  # one per app; the event loop is single-threaded
            state.embedding_lock = asyncio.Lock()
            state.embedding_model = None
        async with state.embedding_lock:
            if state.embedding_model is None:
                state.embedding_model = await run_in_threadpool(_private_copy, model)
            vectors = await run_in_threadpool(mean_pooled, state.embedding_model, inputs)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        n = sum(len(ids) for ids in inputs)
        u = usage(n, 0)
        return {
            "object": "list",
            "data": data,
            "model": model_name,
            "usage": {k: u[k] for k in ("prompt_tokens", "total_tokens")},
        }

    return router


def _private_copy(model):
    from qkv.inspect.attention import shadow

    return shadow(model).eval()


@torch.inference_mode()
def mean_pooled(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Per input, the float32 mean of its final-norm hidden states (d_model,)."""
    device = next(model.parameters()).device
    return [model.hidden(torch.tensor([ids], device=device))[0].float().mean(0).cpu() for ids in inputs]


def _token_lists(inp, tokenizer, max_model_len: int) -> list[list[int]]:
    if isinstance(inp, str) or (inp and all(isinstance(t, int) for t in inp)):
        inp = [inp]
    if not inp:
        raise APIError(400, "input is an empty list; send at least one string or token list", param="input")
    if len(inp) > MAX_INPUTS:
        raise APIError(400, f"input has {len(inp)} items; send at most {MAX_INPUTS} per request", param="input")
    out = []
    for i, x in enumerate(inp):
        ids = tokenizer.encode(x, add_special=True) if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, f"input[{i}] is empty; every input needs at least one token", param="input")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param="input"
            )
        if len(ids) > max_model_len:
            raise APIError(
                400,
                f"input[{i}] has {len(ids)} tokens; this model's maximum context length is {max_model_len}: shorten it",
                param="input",
                code="context_length_exceeded",
            )
        out.append(ids)
    return out


def _encode(v: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()
