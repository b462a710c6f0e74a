"""A small client of the public Generate API, sync and asyncio, for frontends to import.

from shared.client.generator import GeneratorClient
with GeneratorClient("localhost:50051") as client:
    for chunk in client.generate("Hello", max_tokens=32):
        print(chunk.text, end="")
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from shared.logprobs import TokenLogprob
from shared.rpc.pdserve.v1 import generate_pb2, generate_pb2_grpc, sampling_pb2

MAX_MESSAGE_BYTES = 8 << 20

# A prompt: text, token ids, or chat messages ({"role": ..., "content": ...} each), which
# the server renders with the model's chat template.
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


class GenerateError(Exception):
    """The call failed: `code` is the gRPC status name, `message` the server's words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclasses.dataclass(slots=True, frozen=True)
class Chunk:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # "stop", "length", "cancelled", "deadline", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for


def build_request(
    prompt: Prompt,
    *,
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    timeout_seconds: float = 0.0,
    request_id: str = "",
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(
        request_id=request_id,
        max_tokens=max_tokens,
        sampling=sampling_pb2.SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        ),
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        timeout_seconds=timeout_seconds,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        messages = [generate_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
        request.chat.messages.extend(messages)
    else:
        request.tokens.ids.extend(prompt)
    return request


def _chunk(response: generate_pb2.GenerateResponse) -> Chunk:
    finish = None
    if response.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
        name = generate_pb2.FinishReason.Name(response.finish_reason)
        finish = name.removeprefix("FINISH_REASON_").lower()
    logprobs = tuple(
        TokenLogprob(lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
        for lp in response.logprobs
    )
    return Chunk(
        response.request_id,
        tuple(response.token_ids),
        response.text,
        finish,
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
        logprobs,
    )


@dataclasses.dataclass(slots=True, frozen=True)
class ClientTls:
    """TLS to the orchestrator: `ca` is the PEM the server's certificate must chain to (None:
    the system's roots); `cert`/`key` a client certificate, for an orchestrator that asks
    for one; `server_name` the name to verify instead of the target's host."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both its cert and its key file")
        read = lambda p: p.read_bytes() if p is not None else None  # noqa: E731
        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class GeneratorClient:
    """Blocking client; one channel, reused across calls; `tls` None: plaintext.
    `options`: more gRPC channel arguments."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: ClientTls | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        options = [*_OPTIONS, *options]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            options += tls.options()
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self._stub = generate_pb2_grpc.GeneratorStub(self._channel)
        self._metadata = _metadata(token)

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **options: object
    ) -> Iterator[Chunk]:
        """Stream chunks; `timeout` is the call's gRPC deadline. Raises GenerateError."""
        call = self._stub.Generate(
            build_request(prompt, **options), timeout=timeout, metadata=self._metadata
        )
        try:
            for response in call:
                yield _chunk(response)
        except grpc.RpcError as err:
            raise GenerateError(err.code().name, err.details() or "") from None
        finally:
            call.cancel()  # no-op when finished; stops the request when the caller stops early

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGeneratorClient:
    """asyncio client; create and use it inside one event loop."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: ClientTls | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        options = [*_OPTIONS, *options]
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            options += tls.options()
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self._stub = generate_pb2_grpc.GeneratorStub(self._channel)
        self._metadata = _metadata(token)

    async def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **options: object
    ) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(
            build_request(prompt, **options), timeout=timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                yield _chunk(response)
        except grpc.aio.AioRpcError as err:
            raise GenerateError(err.code().name, err.details() or "") from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGeneratorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
