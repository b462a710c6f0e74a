"""The load generator's client for the OpenAI-compatible HTTP API (`pdserve bench --api
openai`): the same `generate(...)` as `AsyncGeneratorClient`, so one runner drives both
front doors with the same workload.

`POST /v1/completions` with `stream: true` and `stream_options.include_usage`; each
Server-Sent Event becomes a `Chunk`. SSE carries text, not token ids: a content event
counts as one token when it arrives, and the final usage event corrects the count (tokens
whose text was held back, e.g. half a UTF-8 character, arrive with a later event), so TTFT
and throughput are exact and TPOT is the mean over the events' arrival times.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import httpx

from shared.client.generator import Chunk, GenerateError

# HTTP status -> the gRPC status name the load report uses for the same outcome.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_PLACEHOLDER = -1  # a token id we do not know (SSE carries text)


class AsyncOpenAIClient:
    """One HTTP/1.1 connection pool to `base_url` (e.g. http://127.0.0.1:8000)."""

    def __init__(self, base_url: str, token: str | None = None, model: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, limits=limits, timeout=None
        )
        self._model = model

    async def model(self) -> str:
        if self._model is None:
            response = await self._http.get("/v1/models")
            _raise_for(response.status_code, response.text)
            self._model = response.json()["data"][0]["id"]
        return self._model

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 0,
        ignore_eos: bool = False,
        timeout: float | None = None,
        temperature: float = 0.0,
    ) -> AsyncIterator[Chunk]:
        body = {
            "model": await self.model(),
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": max_tokens or None,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": ignore_eos,
        }
        counted, finish = 0, None
        request = self._http.stream("POST", "/v1/completions", json=body, timeout=timeout)
        try:
            async with request as response:
                if response.status_code != 200:
                    _raise_for(response.status_code, (await response.aread()).decode())
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise GenerateError("INTERNAL", event["error"]["message"])
                    for choice in event.get("choices") or ():
                        finish = choice.get("finish_reason") or finish
                        tokens = (_PLACEHOLDER,) if choice["text"] else ()
                        counted += len(tokens)
                        yield Chunk("", tokens, choice["text"], None)
                    usage = event.get("usage")
                    if usage:  # the last event: the true counts and the finish
                        extra = max(0, usage["completion_tokens"] - counted)
                        yield Chunk(
                            "",
                            (_PLACEHOLDER,) * extra,
                            "",
                            finish,
                            usage["prompt_tokens"],
                            usage["completion_tokens"],
                        )
        except httpx.TimeoutException as err:
            raise GenerateError("DEADLINE_EXCEEDED", str(err)) from None
        except httpx.HTTPError as err:
            raise GenerateError("UNAVAILABLE", str(err)) from None

    async def __aenter__(self) -> AsyncOpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()


def _raise_for(status: int, text: str) -> None:
    if status == 200:
        return
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    raise GenerateError(_STATUS_NAMES.get(status, f"HTTP_{status}"), message)
