"""The OpenAI API's two endpoints in the frontend's terms: a request body -> one
`GenerateInput` per choice -> the response body (or its SSE stream).

Like a servicer, this only translates: what a request means is decided in `Frontend`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

from orchestrator.frontend import Frontend, GenerateInput
from orchestrator.openai_errors import ApiError
from orchestrator.openai_logprobs import Logprobs
from orchestrator.openai_schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from orchestrator.openai_stream import (
    chat_events,
    collect,
    completion_events,
    sse,
    start_choices,
    usage,
)
from shared.chat import ChatMessage
from shared.sampling_params import SamplingError, SamplingParams
from shared.transport.types import StatusCode


class OpenAiRequests:
    def __init__(self, frontend: Frontend, model_name: str) -> None:
        self._frontend, self._model = frontend, model_name

    async def completions(self, body: CompletionRequest) -> object:
        self._check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(
                    StatusCode.INVALID_ARGUMENT,
                    f"prompt is a list of {len(prompt)} strings; send one prompt per request",
                    param="prompt",
                )
            prompt = prompt[0]
        text = prompt if isinstance(prompt, str) else None
        ids = tuple(prompt) if isinstance(prompt, list) else None
        inputs = self._inputs(body, body.max_tokens, body.logprobs, text=text, token_ids=ids)
        streams = await start_choices(self._frontend, inputs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        logprobs = None if body.logprobs is None else Logprobs(self._frontend, body.logprobs)
        if body.stream:
            events = completion_events(streams, rid, created, self._model, body, logprobs)
            return sse(events)
        results = await asyncio.gather(*(collect(s) for s in streams))
        return CompletionResponse(
            id=rid,
            created=created,
            model=self._model,
            usage=usage(results),
            choices=[
                CompletionChoice(
                    index=i,
                    text=r.text,
                    finish_reason=r.finish,
                    logprobs=logprobs and logprobs.completion(r.token_ids, r.logprobs, 0)[0],
                )
                for i, r in enumerate(results)
            ],
        )

    async def chat_completions(self, body: ChatCompletionRequest) -> object:
        self._check(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(
                StatusCode.INVALID_ARGUMENT,
                "give max_tokens or max_completion_tokens, not both",
                param="max_tokens",
            )
        for i, m in enumerate(body.messages):
            # Chat templates have no common slot for a speaker's name (SmolLM2's ChatML
            # drops it): refuse it rather than answer as if it had been read.
            if m.name is not None:
                raise ApiError(
                    StatusCode.INVALID_ARGUMENT,
                    f"messages[{i}].name is not "
                    "supported: the chat template has no place for a speaker's "
                    "name; put it in the content",
                    param=f"messages.{i}.name",
                    error_code="unsupported_parameter",
                )
        messages = tuple(ChatMessage(m.role, m.content) for m in body.messages)
        if not messages:
            raise ApiError(
                StatusCode.INVALID_ARGUMENT,
                "messages is empty: a chat needs at least one message",
                param="messages",
            )
        if body.top_logprobs and not body.logprobs:
            raise ApiError(
                StatusCode.INVALID_ARGUMENT,
                f"top_logprobs={body.top_logprobs} needs logprobs=true",
                param="top_logprobs",
            )
        count = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        inputs = self._inputs(body, max_tokens, count, messages=messages)
        streams = await start_choices(self._frontend, inputs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        logprobs = None if count is None else Logprobs(self._frontend, count)
        if body.stream:
            return sse(chat_events(streams, rid, created, self._model, body, logprobs))
        results = await asyncio.gather(*(collect(s) for s in streams))
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=self._model,
            usage=usage(results),
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatMessageOut(content=r.text),
                    finish_reason=r.finish,
                    logprobs=logprobs and logprobs.chat(r.token_ids, r.logprobs),
                )
                for i, r in enumerate(results)
            ],
        )

    def _check(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model != self._model:
            raise ApiError(
                StatusCode.NOT_FOUND,
                f"model {body.model!r} does not exist; this server serves {self._model!r}",
                param="model",
                error_code="model_not_found",
            )
        unsupported = body.unsupported_parameters()
        if unsupported:
            raise ApiError(
                StatusCode.INVALID_ARGUMENT,
                f"unsupported parameter(s): {', '.join(unsupported)}",
                param=unsupported[0],
                error_code="unsupported_parameter",
            )
        if body.stream_options is not None and not body.stream:
            raise ApiError(
                StatusCode.INVALID_ARGUMENT,
                "stream_options needs stream=true",
                param="stream_options",
            )

    def _inputs(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        max_tokens: int | None,
        logprobs: int | None,
        **prompt: object,
    ) -> list[GenerateInput]:
        # OpenAI's defaults: temperature 1, a fresh seed per request when none is given.
        base_seed = body.seed if body.seed is not None else secrets.randbits(63)
        inputs = []
        for i in range(body.n):
            try:
                sampling = SamplingParams(
                    1.0 if body.temperature is None else body.temperature,
                    body.top_k or 0,
                    1.0 if body.top_p is None else body.top_p,
                    (base_seed + i) % 2**63,
                )
            except SamplingError as err:
                raise ApiError(StatusCode.INVALID_ARGUMENT, str(err)) from None
            inputs.append(
                GenerateInput(
                    request_id=uuid.uuid4().hex,
                    text=prompt.get("text"),
                    token_ids=prompt.get("token_ids"),
                    max_tokens=max_tokens or 0,
                    sampling=sampling,
                    stop=body.stop_strings(),
                    ignore_eos=body.ignore_eos,
                    timeout_seconds=body.timeout_seconds or 0.0,
                    messages=prompt.get("messages"),
                    logprobs=logprobs,
                )
            )
        return inputs
