"""`pdserve.v1.Generator` over gRPC: proto <-> domain, errors -> status codes. Nothing else.

The request is parsed here rather than by gRPC's generated deserializer: bytes that are not
a valid GenerateRequest (invalid UTF-8 in `text` or `stop`, a truncated message) get
INVALID_ARGUMENT naming the parse error, where gRPC's own would answer INTERNAL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from orchestrator.admission import QueueFullError
from orchestrator.flow import FinishReason, RequestFailed
from orchestrator.frontend import (
    Frontend,
    GenerateInput,
    GenerateOutput,
    InvalidRequest,
    sampling_from_fields,
)
from orchestrator.limits import StreamsPerConnection, TooManyStreams
from shared.chat import ChatMessage
from shared.rpc.pdserve.v1 import generate_pb2, generate_pb2_grpc
from shared.transport.convert import logprob_to_proto
from shared.transport.server import Service

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name

_FINISH = {
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: generate_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: generate_pb2.FINISH_REASON_ERROR,
}


@dataclasses.dataclass(slots=True, frozen=True)
class Unparsable:
    """Request bytes that are not a GenerateRequest."""

    error: str


def parse_request(data: bytes) -> generate_pb2.GenerateRequest | Unparsable:
    try:
        return generate_pb2.GenerateRequest.FromString(data)
    except DecodeError as err:
        return Unparsable(str(err))


def input_from_proto(request: generate_pb2.GenerateRequest) -> GenerateInput:
    """Raises InvalidRequest for fields that contradict each other."""
    prompt = request.WhichOneof("prompt")
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequest(f"top_logprobs={request.top_logprobs} needs logprobs=true")
    sampling = None
    if request.HasField("sampling"):
        s = request.sampling
        sampling = sampling_from_fields(s.temperature, s.top_k, s.top_p, s.seed)
    return GenerateInput(
        request_id=request.request_id,
        text=request.text if prompt == "text" else None,
        token_ids=tuple(request.tokens.ids) if prompt == "tokens" else None,
        messages=(
            tuple(ChatMessage(m.role, m.content) for m in request.chat.messages)
            if prompt == "chat"
            else None
        ),
        max_tokens=request.max_tokens,
        sampling=sampling,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        timeout_seconds=request.timeout_seconds,
        logprobs=request.top_logprobs if request.logprobs else None,
    )


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, frontend: Frontend, streams: StreamsPerConnection) -> None:
        self._frontend, self._streams = frontend, streams

    async def Generate(
        self,
        request: generate_pb2.GenerateRequest | Unparsable,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        if isinstance(request, Unparsable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a valid GenerateRequest: {request.error}"
            )
        try:
            with self._streams.hold(context.peer()):
                stream = self._frontend.generate(
                    input_from_proto(request), context.time_remaining()
                )
                async for out in stream:
                    yield _response(out)
        except (InvalidRequest, TooManyStreams) as err:
            code = grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(err, TooManyStreams):
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, str(err))
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except RequestFailed as err:
            await context.abort(grpc.StatusCode[err.code.name], err.message)


def _response(out: GenerateOutput) -> generate_pb2.GenerateResponse:
    response = generate_pb2.GenerateResponse(
        request_id=out.request_id,
        token_ids=out.token_ids,
        text=out.text,
        logprobs=[logprob_to_proto(lp) for lp in out.logprobs],
    )
    if out.finish is not None:
        response.finish_reason = _FINISH[out.finish]
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
    return response


def generator_service(servicer: GeneratorServicer) -> Service:
    """The Generator service with our own request parser (see the module docstring)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_request,
            response_serializer=generate_pb2.GenerateResponse.SerializeToString,
        )
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    return Service(SERVICE_NAME, register)
