"""The OpenAI API's choices as streams: started, collected, or sent as Server-Sent Events.

Each of a request's `n` choices is one `Frontend.generate` stream. `start_choices` reads
every choice's first response before any byte is sent (a refused request gets its real
status, never a 200 with an error inside); a non-streamed request then `collect`s each
choice whole; a streamed one merges them into SSE chunks (`completion_events`,
`chat_events`, through `sse`), an error after the 200 as OpenAI's in-stream error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from orchestrator.admission import QueueFullError
from orchestrator.flow import RequestFailed
from orchestrator.frontend import Frontend, GenerateInput, GenerateOutput, InvalidRequest
from orchestrator.openai_errors import FAILED, ApiError, api_error, error_event, finish_reason
from orchestrator.openai_logprobs import Logprobs
from orchestrator.openai_schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from shared.logprobs import TokenLogprob
from shared.transport.types import StatusCode

# One choice's stream ------------------------------------------------------------------------


class Choice:
    """A started `Frontend.generate` stream with its first response already read."""

    def __init__(self, stream: AsyncIterator[GenerateOutput], first: GenerateOutput) -> None:
        self.stream, self.first = stream, first

    async def outputs(self) -> AsyncIterator[GenerateOutput]:
        yield self.first
        async for out in self.stream:
            yield out

    async def close(self) -> None:
        await self.stream.aclose()


async def start_choices(frontend: Frontend, inputs: list[GenerateInput]) -> list[Choice]:
    """Start every choice and read its first response (so errors are known before any byte
    is sent); on any failure, close the ones started and raise the ApiError."""
    streams = [frontend.generate(i, None) for i in inputs]
    firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
    failure = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failure is None:
        # A first response that is already a failed finish (timeout_seconds passed before
        # the first token): its status, not a 200 stream with an error event inside.
        failed = next((f for f in firsts if f.finish in FAILED), None)
        if failed is not None:
            code, message = FAILED[failed.finish]
            failure = ApiError(code, message)
    if failure is not None:
        for stream in streams:
            await stream.aclose()
        raise api_error(failure)
    return [Choice(s, f) for s, f in zip(streams, firsts, strict=True)]


async def _first(stream: AsyncIterator[GenerateOutput]) -> GenerateOutput:
    return await anext(stream)


@dataclasses.dataclass(slots=True)
class Result:
    """A whole choice, collected."""

    text: str
    finish: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # one per token id when asked for; empty otherwise


async def collect(choice: Choice) -> Result:
    parts: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    last: GenerateOutput | None = None
    # Read to the end (the finish is the last response), so that the Frontend's stream
    # ends by itself and is accounted as finished, not closed early.
    async with contextlib.aclosing(choice.outputs()) as outputs:
        async for out in outputs:
            parts.append(out.text)
            token_ids.extend(out.token_ids)
            logprobs.extend(out.logprobs)
            last = out
    if last is None or last.finish is None:
        raise ApiError(StatusCode.INTERNAL, "the stream ended without a finish reason")
    return Result(
        "".join(parts),
        finish_reason(last),
        last.prompt_tokens,
        last.completion_tokens,
        token_ids,
        logprobs,
    )


def usage(results: list[Result]) -> Usage:
    prompt = results[0].prompt_tokens  # the same prompt for every choice: counted once
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


# Streaming ---------------------------------------------------------------------------------


def sse(events: AsyncIterator[BaseModel | dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                data = event if isinstance(event, dict) else event.model_dump(mode="json")
                yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """Every choice's responses as they come, tagged with the choice's index. Closing this
    (a client disconnect cancels it) cancels and closes every choice."""
    queue: asyncio.Queue[tuple[int, GenerateOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, choice: Choice) -> None:
        try:
            async with contextlib.aclosing(choice.outputs()) as outputs:
                async for out in outputs:
                    await queue.put((index, out))
            await queue.put((index, None))
        except Exception as err:  # reported in the stream, then it ends
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _choice_events(
    choices: list[Choice],
) -> AsyncIterator[tuple[int, str, str | None, GenerateOutput] | dict]:
    """(index, text, finish_reason, output) per response; an error event on failure."""
    try:
        async for index, out in _merged(choices):
            finish = None if out.finish is None else finish_reason(out)
            yield index, out.text, finish, out
    except (ApiError, InvalidRequest, QueueFullError, RequestFailed) as err:
        yield error_event(err)


def _stream_usage(outs: dict[int, GenerateOutput]) -> Usage:
    prompt = next(iter(outs.values())).prompt_tokens if outs else 0
    completion = sum(o.completion_tokens for o in outs.values())
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def completion_events(
    choices: list[Choice],
    rid: str,
    created: int,
    model: str,
    body: CompletionRequest,
    logprobs: Logprobs | None,
) -> AsyncIterator[BaseModel | dict]:
    last: dict[int, GenerateOutput] = {}
    offsets = [0] * len(choices)  # text_offset runs on across each choice's chunks
    async for event in _choice_events(choices):
        if isinstance(event, dict):
            yield event
            return
        index, text, finish, out = event
        if finish is not None:
            last[index] = out
        # A token whose bytes are held back (an incomplete character) still sends its
        # logprob, in a chunk with no text.
        if text or finish is not None or (logprobs and out.token_ids):
            shaped = None
            if logprobs and out.token_ids:
                shaped, offsets[index] = logprobs.completion(
                    out.token_ids, out.logprobs, offsets[index]
                )
            choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=shaped)
            yield CompletionResponse(id=rid, created=created, model=model, choices=[choice])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield CompletionResponse(
            id=rid, created=created, model=model, choices=[], usage=_stream_usage(last)
        )


async def chat_events(
    choices: list[Choice],
    rid: str,
    created: int,
    model: str,
    body: ChatCompletionRequest,
    logprobs: Logprobs | None,
) -> AsyncIterator[BaseModel | dict]:
    def chunk(
        index: int, delta: ChatDelta, finish: str | None = None, out: GenerateOutput | None = None
    ) -> ChatCompletionChunk:
        shaped = None
        if logprobs and out is not None and out.token_ids:
            shaped = logprobs.chat(out.token_ids, out.logprobs)
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=shaped)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    for index in range(len(choices)):
        yield chunk(index, ChatDelta(role="assistant", content=""))
    last: dict[int, GenerateOutput] = {}
    async for event in _choice_events(choices):
        if isinstance(event, dict):
            yield event
            return
        index, text, finish, out = event
        if finish is not None:
            last[index] = out
        if text or finish is not None or (logprobs and out.token_ids):
            yield chunk(index, ChatDelta(content=text or None), finish, out)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield ChatCompletionChunk(
            id=rid, created=created, model=model, choices=[], usage=_stream_usage(last)
        )
