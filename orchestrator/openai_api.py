"""The OpenAI-compatible HTTP API: HTTP <-> the same `Frontend` the gRPC servicer calls.

1. A request arrives on the orchestrator's HTTP port (uvicorn, in the orchestrator's own
   event loop: orchestrator/http_server.py). `/v1/*` checks the same bearer token as the
   gRPC API; `/health` stays open for probes.
2. The body is validated by its pydantic schema (orchestrator/openai_schemas.py); an
   unknown model, an unsupported parameter or a bad value is a 4xx with an OpenAI-shaped
   error naming it.
3. Each of the `n` choices becomes one `GenerateInput` (seeds `seed`, `seed + 1`, ...) and
   goes through `Frontend.generate`: the same validation, admission queue, deadlines and
   metrics as a gRPC call. Its first response is awaited before any byte is sent, so that
   a refused request gets its real status code, never a 200 with an error inside.
4. Non-streaming: every choice is collected, then one JSON body. Streaming: Server-Sent
   Events, one per response, `data: [DONE]` last; the usage chunk when
   `stream_options.include_usage`. A client that disconnects cancels every choice (the
   stream task is cancelled; `Frontend.generate` frees the decode slot).
5. Logprobs, when asked for, ride on each response's tokens from the engine (their ids
   and values); here they only get their token texts and OpenAI's shapes (`_Logprobs`).

Like a servicer, this module only translates: what a request means is decided in
`Frontend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.admission import QueueFullError
from orchestrator.flow import FinishReason, RequestFailed
from orchestrator.frontend import Frontend, GenerateInput, GenerateOutput, InvalidRequest
from orchestrator.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from shared.chat import ChatMessage
from shared.logprobs import TokenLogprob
from shared.metrics import OrchestratorMetrics
from shared.sampling_params import SamplingError, SamplingParams
from shared.transport.types import StatusCode

# gRPC status -> (HTTP status, OpenAI error type): the same outcome through either door.
HTTP_STATUS = {
    StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    StatusCode.CANCELLED: (499, "cancelled"),
    StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
UNAUTHENTICATED = (401, "authentication_error")  # no domain status: auth is HTTP's own here
RETRY_AFTER_S = 1  # `Retry-After` on a full admission queue
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
# Finish reasons that are failures, not answers: the status the request ends with.
_FAILED = {
    FinishReason.DEADLINE: (StatusCode.DEADLINE_EXCEEDED, "the request's timeout passed"),
    FinishReason.CANCELLED: (StatusCode.CANCELLED, "the request was cancelled"),
    FinishReason.ERROR: (StatusCode.INTERNAL, "a server-side failure ended the request"),
}


class ApiError(Exception):
    """A request that ends with an HTTP error and an OpenAI-shaped body."""

    def __init__(
        self,
        code: StatusCode | tuple[int, str],
        message: str,
        *,
        param: str | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message)
        if isinstance(code, tuple):
            self.status, self.type = code
        else:
            self.status, self.type = HTTP_STATUS.get(code, (500, "server_error"))
        self.message, self.param, self.error_code = message, param, error_code
        self.headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else {}

    def response(self) -> JSONResponse:
        body = ErrorResponse(
            error=ErrorBody(
                message=self.message, type=self.type, param=self.param, code=self.error_code
            )
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def build_openai_app(
    frontend: Frontend, model_name: str, token: str | None, metrics: OrchestratorMetrics
) -> FastAPI:
    """The ASGI app; `token` None means no auth (as for the gRPC API)."""
    app = FastAPI(title="pdserve OpenAI-compatible API", docs_url=None, redoc_url=None)
    api = _Api(frontend, model_name)
    created = int(time.time())

    # A pure ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware
    # hides the client's disconnect from `request.is_disconnected()`, so a non-streamed
    # request whose client went away would run to its end for nobody.
    app.add_middleware(_AuthAndCount, token=token, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid body"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return ApiError(StatusCode.INVALID_ARGUMENT, message, param=param).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if frontend.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> object:
        return await _until_disconnected(request, api.completions(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> object:
        return await _until_disconnected(request, api.chat_completions(body))

    return app


class _AuthAndCount:
    """`/v1/*` needs the bearer token (when one is set); every response is counted by path
    and status (when it starts: a stream's body may run on long after)."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: OrchestratorMetrics) -> None:
        self._app, self._token, self._metrics = app, token, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        counter = self._metrics.http_requests
        if self._token is not None and path.startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                why = "missing bearer token" if not given else "wrong bearer token"
                response = ApiError(UNAUTHENTICATED, why, error_code="invalid_api_key").response()
                counter.labels(path, "401").inc()
                await response(scope, receive, send)
                return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                counter.labels(path, str(message["status"])).inc()
            await send(message)

        await self._app(scope, receive, counted)


DISCONNECT_POLL_S = 0.1


async def _until_disconnected(request: Request, work: Awaitable[object]) -> object:
    """`work`, cancelled if the client goes away first. A streamed response is cancelled by
    Starlette itself once it runs; this covers the wait before it (the first token) and the
    whole of a non-streamed one, which would otherwise run to its end for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()  # Frontend.generate sees the cancel: the slot is freed
                raise ApiError(StatusCode.CANCELLED, "the client disconnected")
    finally:
        if not task.done():
            task.cancel()


class _Api:
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
        streams = await _start(self._frontend, inputs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        logprobs = None if body.logprobs is None else _Logprobs(self._frontend, body.logprobs)
        if body.stream:
            events = _completion_events(streams, rid, created, self._model, body, logprobs)
            return _sse(events)
        results = await asyncio.gather(*(_collect(s) for s in streams))
        return CompletionResponse(
            id=rid,
            created=created,
            model=self._model,
            usage=_usage(results),
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
        streams = await _start(self._frontend, inputs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        logprobs = None if count is None else _Logprobs(self._frontend, count)
        if body.stream:
            return _sse(_chat_events(streams, rid, created, self._model, body, logprobs))
        results = await asyncio.gather(*(_collect(s) for s in streams))
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=self._model,
            usage=_usage(results),
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


# One choice's stream ------------------------------------------------------------------------


class _Choice:
    """A started `Frontend.generate` stream with its first response already read."""

    def __init__(self, stream: AsyncIterator[GenerateOutput], first: GenerateOutput) -> None:
        self.stream, self.first = stream, first

    async def outputs(self) -> AsyncIterator[GenerateOutput]:
        yield self.first
        async for out in self.stream:
            yield out

    async def close(self) -> None:
        await self.stream.aclose()


async def _start(frontend: Frontend, inputs: list[GenerateInput]) -> list[_Choice]:
    """Start every choice and read its first response (so errors are known before any byte
    is sent); on any failure, close the ones started and raise the ApiError."""
    streams = [frontend.generate(i, None) for i in inputs]
    firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
    failure = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failure is None:
        # A first response that is already a failed finish (timeout_seconds passed before
        # the first token): its status, not a 200 stream with an error event inside.
        failed = next((f for f in firsts if f.finish in _FAILED), None)
        if failed is not None:
            code, message = _FAILED[failed.finish]
            failure = ApiError(code, message)
    if failure is not None:
        for stream in streams:
            await stream.aclose()
        raise _api_error(failure)
    return [_Choice(s, f) for s, f in zip(streams, firsts, strict=True)]


async def _first(stream: AsyncIterator[GenerateOutput]) -> GenerateOutput:
    return await anext(stream)


def _api_error(err: BaseException) -> BaseException:
    if isinstance(err, InvalidRequest):
        return ApiError(StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, QueueFullError):
        return ApiError(StatusCode.RESOURCE_EXHAUSTED, str(err), error_code="queue_full")
    if isinstance(err, RequestFailed):
        return ApiError(err.code, err.message)
    return err


@dataclasses.dataclass(slots=True)
class _Result:
    """A whole choice, collected."""

    text: str
    finish: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # one per token id when asked for; empty otherwise


async def _collect(choice: _Choice) -> _Result:
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
    return _Result(
        "".join(parts),
        _finish(last),
        last.prompt_tokens,
        last.completion_tokens,
        token_ids,
        logprobs,
    )


def _finish(out: GenerateOutput) -> str:
    if out.finish in _FAILED:
        code, message = _FAILED[out.finish]
        raise ApiError(code, message)
    return _FINISH[out.finish]


def _usage(results: list[_Result]) -> Usage:
    prompt = results[0].prompt_tokens  # the same prompt for every choice: counted once
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


# Streaming ---------------------------------------------------------------------------------


def _sse(events: AsyncIterator[BaseModel | dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                data = event if isinstance(event, dict) else event.model_dump(mode="json")
                yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """Every choice's responses as they come, tagged with the choice's index. Closing this
    (a client disconnect cancels it) cancels and closes every choice."""
    queue: asyncio.Queue[tuple[int, GenerateOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, choice: _Choice) -> None:
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


def _error_event(err: BaseException) -> dict:
    """An error after the 200 went out: OpenAI's in-stream error event."""
    api = _api_error(err)
    if not isinstance(api, ApiError):
        api = ApiError(StatusCode.INTERNAL, str(err) or type(err).__name__)
    return {"error": ErrorBody(message=api.message, type=api.type).model_dump()}


async def _choice_events(
    choices: list[_Choice],
) -> AsyncIterator[tuple[int, str, str | None, GenerateOutput] | dict]:
    """(index, text, finish_reason, output) per response; an error event on failure."""
    try:
        async for index, out in _merged(choices):
            finish = None if out.finish is None else _finish(out)
            yield index, out.text, finish, out
    except (ApiError, InvalidRequest, QueueFullError, RequestFailed) as err:
        yield _error_event(err)


def _stream_usage(outs: dict[int, GenerateOutput]) -> Usage:
    prompt = next(iter(outs.values())).prompt_tokens if outs else 0
    completion = sum(o.completion_tokens for o in outs.values())
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _completion_events(
    choices: list[_Choice],
    rid: str,
    created: int,
    model: str,
    body: CompletionRequest,
    logprobs: _Logprobs | None,
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


async def _chat_events(
    choices: list[_Choice],
    rid: str,
    created: int,
    model: str,
    body: ChatCompletionRequest,
    logprobs: _Logprobs | None,
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


# Logprobs --------------------------------------------------------------------------------

# OpenAI's stand-in for a logprob too small to write (JSON has no -Infinity).
LOWEST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob > LOWEST_LOGPROB else LOWEST_LOGPROB  # -inf and NaN too


class _Logprobs:
    """The engine's per-token logprobs (ids and values) in OpenAI's two shapes, with each
    token named by its own text (a piece of a multi-byte character decodes to U+FFFD, and
    then its `bytes` are null: they would not be the token's)."""

    def __init__(self, frontend: Frontend, count: int) -> None:
        self._frontend, self._count = frontend, count

    def _text(self, token_id: int) -> str:
        return self._frontend.token_text(token_id)

    def _check(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> None:
        if len(logprobs) != len(token_ids):  # the flow guarantees it; never answer garbage
            raise ApiError(
                StatusCode.INTERNAL, f"{len(token_ids)} tokens came with {len(logprobs)} logprobs"
            )

    def completion(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """The legacy shape for these tokens, their text offsets from `offset` on; and the
        offset after them."""
        self._check(token_ids, logprobs)
        tokens, offsets, tops = [], [], []
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            text = self._text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            top: dict[str, float] = {}
            for alt, value in logprob.top[: self._count]:
                top.setdefault(self._text(alt), _finite(value))  # likeliest first wins a tie
            top.setdefault(text, _finite(logprob.logprob))  # the chosen one, always
            tops.append(top)
        shaped = CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[_finite(lp.logprob) for lp in logprobs],
            top_logprobs=tops,
            text_offset=offsets,
        )
        return shaped, offset

    def chat(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
        self._check(token_ids, logprobs)

        def entry(token_id: int, value: float) -> ChatTopLogprob:
            text = self._text(token_id)
            raw = None if "\ufffd" in text else list(text.encode())
            return ChatTopLogprob(token=text, logprob=_finite(value), bytes=raw)

        content = []
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            chosen = entry(token_id, logprob.logprob)
            top = [entry(alt, value) for alt, value in logprob.top[: self._count]]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)
