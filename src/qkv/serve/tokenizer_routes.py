"""The served model's tokenizer over HTTP, in vLLM's shapes (what lm-evaluation-harness's
remote tokenizer backend and other clients of vLLM servers call):

POST /tokenize     {"prompt": str, "add_special_tokens": true} or {"messages": [...], "add_generation_prompt": true}
                   -> {"count", "max_model_len", "tokens": [ids], "token_strs": [str] (if return_token_strs)}
POST /detokenize   {"tokens": [ids]} -> {"prompt": str}
GET  /tokenizer_info -> {"tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token",
                        "chat_template", "model_max_length", "vocab_size"}

Special-token text in a prompt (e.g. "<|im_end|>") encodes to its special id, as in vLLM,
so a client can find the end-of-sequence id by tokenizing the eos_token string.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from qkv.serve.protocol import APIError, ChatMessage


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def tokenizer_router(tokenizer, model_name: str, max_model_len: int) -> APIRouter:
    router = APIRouter()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{model_name}' (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def tokenize(req: TokenizeRequest) -> list[int]:
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt (text) or messages (a chat)", param="prompt")
        if req.prompt is not None:
            return tokenizer.encode(req.prompt, add_special=req.add_special_tokens)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return tokenizer.encode_chat(messages, add_generation_prompt=req.add_generation_prompt)[0]
        except Exception as e:  # template errors are the request's fault
            raise APIError(400, f"could not apply the chat template to messages: {e}", param="messages") from None

    @router.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest):
        check_model(req.model)
        ids = await run_in_threadpool(tokenize, req)  # off the loop: a long text never stalls streams
        body = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.decode([i]) for i in ids]
        return body

    @router.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest):
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param="tokens"
            )
        return {"prompt": await run_in_threadpool(tokenizer.decode, req.tokens)}

    @router.get("/tokenizer_info")
    async def tokenizer_info():
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": None,
            "chat_template": tokenizer.chat_template,
            "model_max_length": max_model_len,
            "vocab_size": tokenizer.vocab_size,
        }

    return router
