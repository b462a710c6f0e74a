"""The OpenAI-compatible HTTP API's request and response bodies (pydantic).

Requests name every parameter pdserve honours; anything else a client sends is kept aside
(`extra="allow"`) so that `unsupported_parameters` can refuse it by name with a 400, never
ignore it. `top_k` and `timeout_seconds` are pdserve extensions (vLLM takes `top_k` the
same way). Logprobs take OpenAI's two shapes: completions `logprobs: int` (alternatives per
position) answered with parallel lists; chat `logprobs: bool` + `top_logprobs: int`
answered with one object per token.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.logprobs import MAX_TOP_LOGPROBS

# Parameters clients commonly send with their default meaning: accepted when they carry
# exactly that default (the openai SDK and LangChain send some of them unasked).
NEUTRAL_DEFAULTS = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "echo": False,
    "best_of": 1,
    "logit_bias": None,
    "user": None,
    "suffix": None,
    "parallel_tool_calls": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "service_tier": None,
    "store": None,
    "metadata": None,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # pdserve extension: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout_seconds: float | None = Field(default=None, ge=0.0)  # pdserve extension
    ignore_eos: bool = False  # extension (as vLLM's): generate past EOS / end of turn

    def unsupported_parameters(self) -> list[str]:
        """Parameters sent that pdserve does not implement (with a non-default value)."""
        extra = self.model_extra or {}
        return sorted(
            name
            for name, value in extra.items()
            if not (name in NEUTRAL_DEFAULTS and value == NEUTRAL_DEFAULTS[name])
        )

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Common):
    """`POST /v1/completions`: a text prompt (or token ids)."""

    prompt: str | list[int] | list[str]
    # Each token's logprob and this many likeliest tokens at its position (None: none).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str
    name: str | None = None  # accepted only when null: refused by name otherwise (openai_api)


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`: messages rendered with the model's chat template."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None  # each token's logprob in `choices[].logprobs.content`
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token. `top_logprobs[i]` maps
    token text to logprob for the asked-for likeliest tokens, plus the chosen one when it
    is not among them (so up to `logprobs + 1` entries). `text_offset[i]`: where token i's
    text starts in the completion's text (0 = its first character; no echo)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token text's UTF-8 bytes; None when it is not valid text


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
