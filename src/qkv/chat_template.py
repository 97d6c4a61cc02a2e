"""Chat templates: jinja2 in an immutable sandbox (as transformers renders them) with a render budget.

A template comes with the model (tokenizer_config.json, a GGUF's metadata), so it is untrusted
code. The sandbox keeps it away from Python internals; the budget keeps one render from
running for hours or filling memory:

- steps: every call, attribute or item lookup, filter, `*`/`**`/`%` and every iteration of
  `range(...)` or of the `messages` list counts one step; a render takes at most MAX_STEPS
  steps and MAX_SECONDS seconds.
- size: the rendered text is at most MAX_CHARS characters (checked while it streams out), and
  no single operation may build more: `'x' * n`, `range(n)`, a filter or method given a
  number above MAX_CHARS, or a printf/format width of 8+ digits is refused before it runs.
- depth: a template that recurses (a macro calling itself) stops at Python's recursion limit.

A template over budget raises TemplateError (a ValueError) naming the limit. Real templates
(ChatML, Llama 3, Qwen, Mistral with tools) use a few steps per message, far below the limits.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Any

MAX_STEPS = 250_000
MAX_SECONDS = 5.0  # the same bound in time, for steps that are slow (deep macro calls)
MAX_CHARS = 1 << 22  # 4 Mi characters: above any context a served model has, far below memory trouble
_WIDE_FORMAT = re.compile(r"\d{8,}")  # a printf or str.format width/precision of 10^7 or more


class TemplateError(ValueError):
    """A chat template that failed or went over its render budget."""


def render(source: str, **context: Any) -> str:
    """Render the template `source` with `context` within the budget."""
    env, template = _compiled(source)
    env.begin()
    if isinstance(context.get("messages"), list):
        context["messages"] = _CountedList(context["messages"], env)
    out, size = [], 0
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_CHARS:
                raise TemplateError(f"chat template output exceeds {MAX_CHARS} characters; it loops or repeats")
            out.append(piece)
    except RecursionError:
        raise TemplateError("chat template recursed too deeply; the template calls itself without end") from None
    return "".join(out)


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
    env = _BudgetedSandbox()
    return env, env.from_string(source)


def _raise_exception(message):
    raise TemplateError(f"chat template error: {message}")


def _too_big(value: Any) -> bool:
    """A number no template needs: a width, count or range end above MAX_CHARS."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS


def _wide_format(value: Any) -> bool:
    """A printf / str.format string with a width or precision of 10^7 or more."""
    return isinstance(value, str) and ("%" in value or "{" in value) and _WIDE_FORMAT.search(value) is not None


def _refuse(value: Any) -> None:
    shown = repr(value[:40]) if isinstance(value, str) else value
    raise TemplateError(f"chat template asks for a value too large to build ({shown})")


def _make_sandbox_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedSandbox(ImmutableSandboxedEnvironment):
        """ImmutableSandboxedEnvironment that counts steps (per thread: the server renders in
        worker threads) and refuses operations that would build huge values."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True)
            self._state = threading.local()
            self.globals["raise_exception"] = _raise_exception
            self.globals["range"] = self._range
            self.filters = {name: self._budgeted_filter(f, name) for name, f in self.filters.items()}

        def begin(self) -> None:
            self._state.steps = 0
            self._state.deadline = time.monotonic() + MAX_SECONDS

        def step(self) -> None:
            state = self._state
            state.steps = steps = getattr(state, "steps", 0) + 1
            if steps > MAX_STEPS:
                raise TemplateError(f"chat template takes more than {MAX_STEPS} steps to render; it loops too long")
            if steps % 256 == 0 and time.monotonic() > getattr(state, "deadline", float("inf")):
                raise TemplateError(f"chat template takes more than {MAX_SECONDS:g} s to render; it loops too long")

        def check(self, args, kwargs=None) -> None:
            for value in (*args, *(kwargs or {}).values()):
                if _too_big(value):
                    _refuse(value)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            __self.step()
            __self.check(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            receiver = getattr(value, "__self__", None)
            if getattr(value, "__name__", "") in ("format", "format_map") and _wide_format(receiver):
                _refuse(receiver)  # '{:>99999999}'.format(x)
            return super().wrap_str_format(value)

        def getattr(self, obj, attribute):
            self.step()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.step()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            self.step()
            if operator == "*" and isinstance(left, int | float) and isinstance(right, str | list | tuple):
                left, right = right, left
            if operator == "*" and isinstance(left, str | list | tuple) and isinstance(right, int):
                if len(left) * right > MAX_CHARS:
                    raise TemplateError(f"chat template repeats a value to more than {MAX_CHARS} items")
            if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
                raise TemplateError(f"chat template raises to the power {right}; at most 64 is allowed")
            if operator == "%" and _wide_format(left):
                _refuse(left)  # '%099999999d' % x
            return super().call_binop(context, operator, left, right)

        def _range(self, *args):
            self.check(args)
            return _CountedRange(range(*args), self)

        def _budgeted_filter(self, f, name: str):
            @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
            def budgeted(*args, **kwargs):
                self.step()
                self.check(args, kwargs)  # center(n), indent(n), truncate(n), wordwrap(n), batch(n)...
                if name == "format" and any(_wide_format(a) for a in args):
                    _refuse(next(a for a in args if _wide_format(a)))
                return f(*args, **kwargs)

            return budgeted

    return BudgetedSandbox


class _CountedList(list):
    """The messages list: iterating it costs one render step per item (a list still, so
    `|tojson`, `+` and slicing behave as templates expect)."""

    def __init__(self, items, env) -> None:
        super().__init__(items)
        self._env = env

    def __iter__(self):
        for item in super().__iter__():
            self._env.step()
            yield item


class _CountedRange:
    """range(...) in a template: lazy, one render step per item."""

    def __init__(self, items: range, env) -> None:
        self._items, self._env = items, env

    def __iter__(self):
        for item in self._items:
            self._env.step()
            yield item

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        return self._items[index]


_BudgetedSandbox = _make_sandbox_class()  # jinja2 is imported on first use of this module only
