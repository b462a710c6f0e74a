"""The OpenAI-compatible HTTP API: HTTP <-> the same `Frontend` the gRPC servicer calls.

1. A request arrives on the orchestrator's HTTP port (uvicorn, in the orchestrator's own
   event loop: orchestrator/http_server.py). `/v1/*` checks the same bearer token as the
   gRPC API; `/health` stays open for probes.
2. The body is validated by its pydantic schema (orchestrator/openai_schemas.py); an
   unknown model, an unsupported parameter or a bad value is a 4xx with an OpenAI-shaped
   error naming it (orchestrator/openai_errors.py: one status per outcome, as in gRPC).
3. Each of the `n` choices becomes one `GenerateInput` (seeds `seed`, `seed + 1`, ...;
   orchestrator/openai_requests.py) and goes through `Frontend.generate`: the same
   validation, admission queue, deadlines and metrics as a gRPC call. Its first response
   is awaited before any byte is sent, so that a refused request gets its real status
   code, never a 200 with an error inside (orchestrator/openai_stream.py).
4. Non-streaming: every choice is collected, then one JSON body. Streaming: Server-Sent
   Events, one per response, `data: [DONE]` last; the usage chunk when
   `stream_options.include_usage`. A client that disconnects cancels every choice (the
   stream task is cancelled; `Frontend.generate` frees the decode slot).
5. Logprobs, when asked for, ride on each response's tokens from the engine (their ids
   and values); they only get their token texts and OpenAI's shapes
   (orchestrator/openai_logprobs.py).

This module holds the routes, the bearer-token check and the disconnect watch; like a
servicer, the API only translates: what a request means is decided in `Frontend`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.frontend import Frontend
from orchestrator.openai_errors import UNAUTHENTICATED, ApiError
from orchestrator.openai_requests import OpenAiRequests
from orchestrator.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from shared.metrics import OrchestratorMetrics
from shared.transport.types import StatusCode


def build_openai_app(
    frontend: Frontend, model_name: str, token: str | None, metrics: OrchestratorMetrics
) -> FastAPI:
    """The ASGI app; `token` None means no auth (as for the gRPC API)."""
    app = FastAPI(title="pdserve OpenAI-compatible API", docs_url=None, redoc_url=None)
    api = OpenAiRequests(frontend, model_name)
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
