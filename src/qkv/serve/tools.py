"""Tool calling: tools into the prompt, a grammar for forced calls, calls out of the reply.

The prompt: a chat template that takes `tools` (it mentions them) renders them itself.
Otherwise (SmolLM2's GGUF template among them) the tools go into the system message
with this generic instruction, and past calls and results are rendered in the same
format, so the model sees one convention throughout:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Tool results (`role: "tool"` messages) become user turns wrapped in
`<tool_response>...</tool_response>`, as Qwen's and Hermes' templates do.

The reply: with `tool_choice` "required" or a named function, the whole reply is
grammar-constrained to `{"name": ..., "arguments": {...}}` whose arguments follow the
function's JSON schema (with parallel calls under "required": a JSON array of such
objects), so it always parses. With "auto" the model writes freely and every well-formed
`<tool_call>` block becomes a call; the text outside them is the message content. With
"none" the tools are left out of the prompt and nothing is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from qkv.infer.constraints import Constraint
from qkv.serve.protocol import APIError, ChatCompletionRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

GENERIC_PROMPT = (
    "You can call functions. The available functions are, as JSON schemas:\n{tools}\n\n"
    "To call a function, reply with one block per call, exactly in this form:\n"
    "<tool_call>\n"
    '{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n'
    "</tool_call>\n"
    "Function results come back inside <tool_response></tool_response>. "
    "If no function is needed, answer normally."
)


@dataclass
class ToolPlan:
    """What a chat request's tools mean for its prompt, its grammar and its reply."""

    tools: list[dict] = field(default_factory=list)  # OpenAI tool objects, as sent
    choice: str = "none"  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def plan(req: ChatCompletionRequest) -> ToolPlan:
    """Check the request's tools and tool_choice; 400 naming the field on a bad one."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions share a name; give each a unique name", param="tools")
    for i, t in enumerate(tools):
        params = t["function"].get("parameters")
        if params is not None:
            Constraint("json_schema", params, f"tools[{i}].function.parameters").validate()
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names function {choice.function.name!r}, which is not in tools ({', '.join(names)})",
                param="tool_choice",
            )
        return ToolPlan(tools, "named", choice.function.name, req.parallel_tool_calls)
    if choice in ("auto", "required") and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools; send tools or drop tool_choice", param="tool_choice")
    return ToolPlan(tools, choice, None, req.parallel_tool_calls)


def check_messages(req: ChatCompletionRequest) -> None:
    """Message shapes the template cannot guess at: 400 naming the message."""
    for i, m in enumerate(req.messages):
        if m.role in ("user", "system", "developer", "tool") and m.content is None:
            raise APIError(400, f"messages[{i}] ({m.role}) has no content; give it a content", param="messages")
        if m.role == "assistant" and m.content is None and not m.tool_calls:
            raise APIError(400, f"messages[{i}] (assistant) has neither content nor tool_calls", param="messages")
        for j, call in enumerate(m.tool_calls or []):
            try:
                args = json.loads(call.function.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise APIError(
                    400,
                    f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object in a string",
                    param="messages",
                )


def constraint(p: ToolPlan) -> Constraint | None:
    """The grammar of a forced call (None when the model chooses)."""
    if not p.forced:
        return None
    chosen = [t for t in p.tools if p.choice == "required" or t["function"]["name"] == p.named]
    one = [_call_schema(t["function"]) for t in chosen]
    schema = one[0] if len(one) == 1 else {"anyOf": one}
    if p.choice == "required" and p.parallel:
        schema = {"type": "array", "items": schema, "minItems": 1}
    return Constraint("json_schema", schema, "tools")


def _call_schema(fn: dict) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn["name"]},
            "arguments": fn.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


# --- the prompt --------------------------------------------------------------------------------


def template_takes_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def messages_for_template(messages: list[dict], p: ToolPlan, native: bool) -> list[dict]:
    """Messages as the chat template should see them. `messages` are plain dicts with the
    request's role/content/tool_calls/tool_call_id."""
    if native:  # the template renders tools, calls and results itself
        return messages
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [
                f"{CALL_OPEN}\n"
                + json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
                + f"\n{CALL_CLOSE}"
                for c in m["tool_calls"]
            ]
            out.append(
                {"role": "assistant", "content": "\n".join(([m["content"]] if m.get("content") else []) + blocks)}
            )
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if p.choice != "none" and p.tools:
        described = "\n".join(json.dumps(t["function"]) for t in p.tools)
        system = GENERIC_PROMPT.format(tools=described)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


# --- the reply ---------------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def parse_reply(text: str, p: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply."""
    known = {t["function"]["name"] for t in p.tools}
    if p.forced:  # the grammar made it one call object, or an array of them
        try:
            obj = json.loads(text)
        except ValueError:  # cut off by max_tokens: no call, the text is the content
            return text, []
        calls = [c for c in map(_as_call, obj if isinstance(obj, list) else [obj]) if c is not None]
        return (None, calls) if calls else (text, [])
    content, calls, at = [], [], 0
    while True:
        start = text.find(CALL_OPEN, at)
        if start < 0:
            content.append(text[at:])
            break
        end = text.find(CALL_CLOSE, start)
        body = text[start + len(CALL_OPEN) : end if end >= 0 else len(text)]
        try:
            call = _as_call(json.loads(body))
        except ValueError:
            call = None
        if call is None or call["function"]["name"] not in known:
            content.append(text[at:])  # not a call after all: keep it as text
            break
        content.append(text[at:start])
        calls.append(call)
        if not p.parallel or end < 0:
            break
        at = end + len(CALL_CLOSE)
    joined = "".join(content).strip()
    return (joined or None) if calls else text, calls


class ReplyStream:
    """Streams one choice of a chat reply that may hold tool calls: content passes through
    until it could be the start of a call; calls are sent when the reply ends, each as a
    delta with its id and name followed by its arguments."""

    def __init__(self, p: ToolPlan):
        self.plan = p
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.holding = p.forced  # a forced reply is all call: never stream it as content

    def push(self, new_text: str) -> str:
        """Content to send now."""
        self.text += new_text
        if self.holding:
            return ""
        at = self.text.find(CALL_OPEN, self.sent)
        if at >= 0:
            self.holding = True
            out, self.sent = self.text[self.sent : at], at
            return out
        # hold back a tail that could grow into "<tool_call>"
        keep = next((k for k in range(len(CALL_OPEN) - 1, 0, -1) if self.text.endswith(CALL_OPEN[:k])), 0)
        end = max(self.sent, len(self.text) - keep)
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, tool call deltas) at the end of the reply."""
        content, calls = parse_reply(self.text, self.plan)
        if not calls:
            return self.text[self.sent :], []
        deltas = []
        for i, c in enumerate(calls):
            fn = c["function"]
            deltas.append(
                {"index": i, "id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
            )
            args = fn["arguments"]
            step = max(1, -(-len(args) // 4))  # the arguments in a few pieces, as OpenAI streams them
            deltas += [{"index": i, "function": {"arguments": args[k : k + step]}} for k in range(0, len(args), step)]
        return "", deltas


def encode_native(tokenizer, messages: list[dict], p: ToolPlan, allow_special_in_content: bool) -> list[int]:
    """Prompt ids from a chat template that renders `tools` itself."""
    from qkv.tokenizer import _compile_template

    if not allow_special_in_content:
        specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
        if any(s in (m.get("content") or "") for m in messages for s in specials):
            raise APIError(400, "a message holds special-token text; remove it", param="messages")
    text = _compile_template(tokenizer.chat_template).render(
        messages=messages,
        tools=p.tools if p.choice != "none" else None,
        add_generation_prompt=True,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )
    return tokenizer.backend.encode(text, add_special_tokens=False).ids
