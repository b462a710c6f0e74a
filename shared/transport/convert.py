"""Domain types <-> worker.proto messages. The only module that knows both."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from shared.kv_transfer.codec import sampling_from_proto, sampling_to_proto
from shared.logprobs import TokenLogprob
from shared.rpc.pdserve.v1 import kv_pb2, sampling_pb2, worker_pb2
from shared.transport.types import (
    DecodeFinish,
    GenerationLimits,
    KvReceipt,
    Lease,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    PrefillTimings,
    ReserveRequest,
    TokenBatch,
)

_FINISH_TO_PROTO = {
    None: worker_pb2.DECODE_FINISH_REASON_UNSPECIFIED,
    DecodeFinish.STOP: worker_pb2.DECODE_FINISH_REASON_STOP,
    DecodeFinish.LENGTH: worker_pb2.DECODE_FINISH_REASON_LENGTH,
    DecodeFinish.CANCELLED: worker_pb2.DECODE_FINISH_REASON_CANCELLED,
    DecodeFinish.DEADLINE: worker_pb2.DECODE_FINISH_REASON_DEADLINE,
    DecodeFinish.LEASE_EXPIRED: worker_pb2.DECODE_FINISH_REASON_LEASE_EXPIRED,
    DecodeFinish.ERROR: worker_pb2.DECODE_FINISH_REASON_ERROR,
    DecodeFinish.PREEMPTED: worker_pb2.DECODE_FINISH_REASON_PREEMPTED,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _seconds(message: timestamp_pb2.Timestamp) -> float:
    return message.ToNanoseconds() / 1e9


def _optional_time(parent: Message, field: str) -> float | None:
    return _seconds(getattr(parent, field)) if parent.HasField(field) else None


def logprob_to_proto(logprob: TokenLogprob) -> sampling_pb2.TokenLogprob:
    top = [sampling_pb2.TopLogprob(token_id=t, logprob=v) for t, v in logprob.top]
    return sampling_pb2.TokenLogprob(logprob=logprob.logprob, top=top)


def logprob_from_proto(message: sampling_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(message.logprob, tuple((t.token_id, t.logprob) for t in message.top))


def _logprobs_option(logprobs: int | None) -> dict[str, object]:
    """`logprobs: int | None` as the proto's (logprobs, top_logprobs) fields."""
    return {} if logprobs is None else {"logprobs": True, "top_logprobs": logprobs}


def _logprobs_field(message: Message) -> int | None:
    return message.top_logprobs if message.logprobs else None  # type: ignore[attr-defined]


def reserve_to_proto(request: ReserveRequest) -> worker_pb2.ReserveRequest:
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(round(request.ttl_seconds * 1e9))
    limits = request.limits
    return worker_pb2.ReserveRequest(
        request_id=request.request_id,
        ttl=ttl,
        limits=worker_pb2.GenerationLimits(
            max_tokens=limits.max_tokens,
            stop_token_ids=limits.stop_token_ids,
            stop_on_eos=limits.stop_on_eos,
        ),
        prompt_length=request.prompt_length,
        deadline=_timestamp(request.deadline),
        **_logprobs_option(request.logprobs),
    )


def reserve_from_proto(message: worker_pb2.ReserveRequest) -> ReserveRequest:
    """Raises ValueError for out-of-range values (the servicer answers INVALID_ARGUMENT)."""
    limits = message.limits
    return ReserveRequest(
        request_id=message.request_id,
        prompt_length=message.prompt_length,
        limits=GenerationLimits(
            max_tokens=limits.max_tokens,
            stop_token_ids=tuple(limits.stop_token_ids),
            stop_on_eos=limits.stop_on_eos,
        ),
        ttl_seconds=message.ttl.ToNanoseconds() / 1e9,
        deadline=_optional_time(message, "deadline"),
        logprobs=_logprobs_field(message),
    )


def lease_to_proto(lease: Lease) -> worker_pb2.ReserveResponse:
    return worker_pb2.ReserveResponse(
        lease_id=lease.lease_id, slot=lease.slot, expire_time=_timestamp(lease.expire_time)
    )


def lease_from_proto(message: worker_pb2.ReserveResponse) -> Lease:
    return Lease(message.lease_id, message.slot, _seconds(message.expire_time))


def tokens_to_proto(batch: TokenBatch) -> worker_pb2.StreamTokensResponse:
    return worker_pb2.StreamTokensResponse(
        token_ids=batch.token_ids,
        finish_reason=_FINISH_TO_PROTO[batch.finish],
        detail=batch.detail,
        logprobs=[logprob_to_proto(lp) for lp in batch.logprobs],
    )


def tokens_from_proto(message: worker_pb2.StreamTokensResponse) -> TokenBatch:
    return TokenBatch(
        tuple(message.token_ids),
        _FINISH_FROM_PROTO[message.finish_reason],
        message.detail,
        tuple(logprob_from_proto(lp) for lp in message.logprobs),
    )


def load_to_proto(load: LoadReport) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(
        free_slots=load.free_slots,
        total_slots=load.total_slots,
        queue_depth=load.queue_depth,
        live_requests=load.live_requests,
        free_pages=load.free_pages,
        total_pages=load.total_pages,
        page_size=load.page_size,
        max_seq_len=load.max_seq_len,
    )


def load_from_proto(message: worker_pb2.LoadReport) -> LoadReport:
    return LoadReport(
        message.free_slots,
        message.total_slots,
        message.queue_depth,
        message.live_requests,
        message.free_pages,
        message.total_pages,
        message.page_size,
        message.max_seq_len,
    )


def receipt_to_proto(receipt: KvReceipt) -> kv_pb2.KvReceipt:
    return kv_pb2.KvReceipt(
        lease_id=receipt.lease_id,
        bytes_received=receipt.bytes_received,
        chunks_received=receipt.chunks_received,
    )


def receipt_from_proto(message: kv_pb2.KvReceipt) -> KvReceipt:
    return KvReceipt(message.lease_id, message.bytes_received, message.chunks_received)


def prefill_to_proto(request: PrefillRequest) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling=sampling_to_proto(request.sampling),
        decode_target=request.decode_target,
        lease_id=request.lease_id,
        deadline=_timestamp(request.deadline),
        model_fingerprint=request.model_fingerprint,
        resume=request.resume,
        **_logprobs_option(request.logprobs),
    )


def prefill_from_proto(message: worker_pb2.PrefillRequest) -> PrefillRequest:
    """Raises ValueError (SamplingError) for out-of-range sampling parameters."""
    return PrefillRequest(
        request_id=message.request_id,
        prompt_token_ids=tuple(message.prompt_token_ids),
        sampling=sampling_from_proto(message.sampling),
        decode_target=message.decode_target,
        lease_id=message.lease_id,
        deadline=_optional_time(message, "deadline"),
        model_fingerprint=message.model_fingerprint,
        resume=message.resume,
        logprobs=_logprobs_field(message),
    )


def prefill_result_to_proto(result: PrefillResult) -> worker_pb2.PrefillResponse:
    t = result.timings
    return worker_pb2.PrefillResponse(
        first_token=result.first_token,
        timings=worker_pb2.PrefillTimings(
            queue_seconds=t.queue_seconds,
            prefill_seconds=t.prefill_seconds,
            transfer_seconds=t.transfer_seconds,
            kv_bytes=t.kv_bytes,
            cached_tokens=t.cached_tokens,
        ),
        first_logprob=(
            logprob_to_proto(result.first_logprob) if result.first_logprob is not None else None
        ),
    )


def prefill_result_from_proto(message: worker_pb2.PrefillResponse) -> PrefillResult:
    t = message.timings
    timings = PrefillTimings(
        t.queue_seconds, t.prefill_seconds, t.transfer_seconds, t.kv_bytes, t.cached_tokens
    )
    first_logprob = None
    if message.HasField("first_logprob"):
        first_logprob = logprob_from_proto(message.first_logprob)
    return PrefillResult(message.first_token, timings, first_logprob)
