"""The OpenAI API's errors: one status per outcome, the same through gRPC and HTTP.

A domain status (`StatusCode`) maps to an HTTP status and OpenAI error type
(`HTTP_STATUS`); `ApiError` is a request that ends with one, in OpenAI's error body. A
finish reason that is a failure (a timeout, a cancel, an error) ends the request with
its status too, never a 200 (`finish_reason`).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from orchestrator.admission import QueueFullError
from orchestrator.flow import FinishReason, RequestFailed
from orchestrator.frontend import GenerateOutput, InvalidRequest
from orchestrator.openai_schemas import ErrorBody, ErrorResponse
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
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
# Finish reasons that are failures, not answers: the status the request ends with.
FAILED = {
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


def api_error(err: BaseException) -> BaseException:
    """The frontend's refusal as the HTTP API's error (anything else: unchanged)."""
    if isinstance(err, InvalidRequest):
        return ApiError(StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, QueueFullError):
        return ApiError(StatusCode.RESOURCE_EXHAUSTED, str(err), error_code="queue_full")
    if isinstance(err, RequestFailed):
        return ApiError(err.code, err.message)
    return err


def error_event(err: BaseException) -> dict:
    """An error after the 200 went out: OpenAI's in-stream error event."""
    api = api_error(err)
    if not isinstance(api, ApiError):
        api = ApiError(StatusCode.INTERNAL, str(err) or type(err).__name__)
    return {"error": ErrorBody(message=api.message, type=api.type).model_dump()}


def finish_reason(out: GenerateOutput) -> str:
    """OpenAI's finish_reason of a stream's last response; a failed finish raises its
    ApiError instead."""
    if out.finish in FAILED:
        code, message = FAILED[out.finish]
        raise ApiError(code, message)
    return FINISH[out.finish]
