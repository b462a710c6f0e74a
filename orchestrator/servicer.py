"""`pdserve.v1.Generator` over gRPC: proto <-> domain, errors -> status codes. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from orchestrator.admission import QueueFullError
from orchestrator.flow import FinishReason, RequestFailed
from orchestrator.frontend import Frontend, GenerateInput, InvalidRequest, sampling_from_fields
from shared.chat import ChatMessage
from shared.rpc.pdserve.v1 import generate_pb2, generate_pb2_grpc

_FINISH = {
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: generate_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: generate_pb2.FINISH_REASON_ERROR,
}


def input_from_proto(request: generate_pb2.GenerateRequest) -> GenerateInput:
    prompt = request.WhichOneof("prompt")
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
    )


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            stream = self._frontend.generate(input_from_proto(request), context.time_remaining())
            async for out in stream:
                response = generate_pb2.GenerateResponse(
                    request_id=out.request_id, token_ids=out.token_ids, text=out.text
                )
                if out.finish is not None:
                    response.finish_reason = _FINISH[out.finish]
                    response.usage.prompt_tokens = out.prompt_tokens
                    response.usage.completion_tokens = out.completion_tokens
                yield response
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except RequestFailed as err:
            await context.abort(grpc.StatusCode[err.code.name], err.message)
