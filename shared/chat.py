"""Chat messages -> one prompt string, with the model's own chat template.

The same semantics as Hugging Face's `apply_chat_template(messages,
add_generation_prompt=True, tokenize=False)`: a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `tojson` filter that keeps
non-ASCII text, `raise_exception` and `strftime_now` globals, and the special tokens
(`bos_token`, `eos_token`) as variables. The rendered text is then tokenized without
adding BOS (the template writes whatever special tokens the model expects), as
transformers does.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Sequence
from typing import Any

from shared.tokenizer import ChatFormat

MAX_MESSAGES = 256


class ChatError(ValueError):
    """Messages the template cannot render; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant", ... (the template decides what it accepts)
    content: str


def render_chat(chat: ChatFormat, messages: Sequence[ChatMessage]) -> str:
    """The prompt text for `messages`, ending with the assistant turn's opening."""
    if not messages:
        raise ChatError("messages is empty: a chat prompt needs at least one message")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"{len(messages)} messages; the limit is {MAX_MESSAGES}")
    for i, message in enumerate(messages):
        if not message.role:
            raise ChatError(f"messages[{i}].role is empty")
    import jinja2

    try:
        return _compiled(chat.template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=chat.bos_token,
            eos_token=chat.eos_token,
        )
    except jinja2.TemplateError as err:
        raise ChatError(f"the chat template refused the messages: {err}") from None


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **kw: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatError(f"the model's chat template does not parse: {err}") from None
