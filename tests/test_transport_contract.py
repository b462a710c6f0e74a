"""One contract suite, run against both transports: the in-process fake and real gRPC over
loopback (127.0.0.1), through tests/transport_support.py's harness: round trips, and a
receiver that fails closed. Cancellation and dead peers: tests/test_transport_cancel.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable

import pytest

from shared.kv_transfer.codec import KvPayload, KvRejection, KvSpec
from shared.rpc.pdserve.v1 import kv_pb2
from shared.sampling_params import SamplingParams
from shared.transport.fake import FaultPlan, apply_faults
from shared.transport.types import (
    DecodeFinish,
    KvReceipt,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    PrefillTimings,
    StatusCode,
    TokenBatch,
    TransportError,
)
from tests.kv_fixtures import FINGERPRINT, synthetic_prefix, synthetic_spec
from tests.transport_support import (
    BOUND_S,
    TRANSPORTS,
    Harness,
    StalledSender,
    encode,
    eventually,
    reserve_request,
    run,
)

# Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("finish", [DecodeFinish.LENGTH, DecodeFinish.PREEMPTED])
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_kv_round_trip_and_token_stream(kind: str, finish: DecodeFinish) -> None:
    prefix = synthetic_prefix()

    async def body(h: Harness) -> None:
        h.handler.finish_on_delivery = finish
        lease = await h.decode.reserve(reserve_request())
        stream = h.decode.stream_tokens(lease.lease_id)  # opened before the KV is sent
        first = asyncio.ensure_future(anext(stream))
        payload = encode(prefix, lease.lease_id)
        receipt = await h.decode.transfer_kv(payload.messages())
        assert receipt == KvReceipt(lease.lease_id, payload.nbytes, payload.manifest.chunk_count)
        got = h.handler.delivered[lease.lease_id]
        for layer in (0, 1):
            for name in ("cache_k", "cache_v"):
                sent = prefix.cache["layers"][layer]["attn"][name][:, : prefix.true_length]
                assert (got.cache["layers"][layer]["attn"][name] == sent).all()
        assert (got.true_length, got.first_token, got.sampling) == (11, 42, prefix.sampling)
        batches = [await first] + [b async for b in stream]
        assert batches == [TokenBatch((42,)), TokenBatch((), finish)]
        assert h.handler.inbox.buffered_bytes == 0

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_engine_prefix_over_the_transport(kind: str, engine, params) -> None:
    """A real prefill cache (engine layout, bucket padding) arrives exactly."""
    prefix = engine.prefill(params, [5, 6, 7, 8, 9], sampling=SamplingParams(seed=7))
    spec = KvSpec.from_cache(prefix.cache, FINGERPRINT, 1 << 20)

    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        await h.decode.transfer_kv(encode(prefix, lease.lease_id).messages())
        got = h.handler.delivered[lease.lease_id]
        for layer, leaves in prefix.cache["layers"].items():
            for name, leaf in leaves["attn"].items():
                expect = leaf[:, : prefix.true_length]
                assert (got.cache["layers"][layer]["attn"][name] == expect).all()

    run(kind, body, spec)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_unary_calls_carry_every_field(kind: str) -> None:
    async def body(h: Harness) -> None:
        request = PrefillRequest(
            request_id="p-1",
            prompt_token_ids=(100, 200, 30),
            sampling=SamplingParams(temperature=0.3, top_k=3, top_p=0.7, seed=2**64 - 1),
            decode_target="127.0.0.1:5000",
            lease_id="lease-9",
            deadline=1_900_000_000.5,
            model_fingerprint=FINGERPRINT,
        )
        result = await h.prefill.prefill(request)
        assert result == PrefillResult(330 % 320, PrefillTimings(0.25, 0.5, 0.125, 4096))
        assert h.prefill_handler.seen == [request]
        assert await h.prefill.cancel("p-1") and not await h.prefill.cancel("p-2")
        assert await h.prefill.get_load() == LoadReport(1, 1, 0, 1)
        lease = await h.decode.reserve(reserve_request())
        assert lease.slot == 0 and lease.expire_time > time.time() + 20
        load = await h.decode.get_load()
        assert load == LoadReport(1, 2, 0, 1, free_pages=1, total_pages=9, page_size=16)
        assert load.pages_for(17) == 2
        assert await h.decode.cancel(lease.lease_id)
        assert not await h.decode.cancel(lease.lease_id)  # idempotent

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_handler_errors_keep_their_status(kind: str) -> None:
    async def body(h: Harness) -> None:
        empty = PrefillRequest("p", (), SamplingParams(), "x:1", "lease")
        with pytest.raises(TransportError) as caught:
            await h.prefill.prefill(empty)
        assert caught.value.code is StatusCode.INVALID_ARGUMENT
        assert "prompt_token_ids is empty" in caught.value.message
        for i in range(2):
            await h.decode.reserve(reserve_request(f"r{i}"))
        with pytest.raises(TransportError) as caught:
            await h.decode.reserve(reserve_request("r3"))
        assert caught.value.code is StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(TransportError) as caught:
            await anext(h.decode.stream_tokens("no-such-lease"))
        assert caught.value.code is StatusCode.NOT_FOUND

    run(kind, body)


# Fail closed ---------------------------------------------------------------------------------


def _wrong_model(p: KvPayload) -> KvPayload:
    manifest = kv_pb2.KvManifest()
    manifest.CopyFrom(p.manifest)
    manifest.model_fingerprint = "another-model"
    return dataclasses.replace(p, manifest=manifest)


def _wrong_version(p: KvPayload) -> KvPayload:
    manifest = kv_pb2.KvManifest()
    manifest.CopyFrom(p.manifest)
    manifest.format_version = 99
    return dataclasses.replace(p, manifest=manifest)


def _edit_leaf(field: str, value: object) -> Callable[[KvPayload], KvPayload]:
    def edit(p: KvPayload) -> KvPayload:
        manifest = kv_pb2.KvManifest()
        manifest.CopyFrom(p.manifest)
        if field == "drop":
            manifest.leaves.pop()
        elif field == "shape":
            manifest.leaves[0].shape[0] = 3
        else:
            setattr(manifest.leaves[0], field, value)
        return dataclasses.replace(p, manifest=manifest)

    return edit


FAILS = {
    # name: (payload edit, faults, spec limit, reason, status)
    "format-version": (
        _wrong_version,
        FaultPlan(),
        None,
        KvRejection.FORMAT_VERSION,
        StatusCode.FAILED_PRECONDITION,
    ),
    "fingerprint": (
        _wrong_model,
        FaultPlan(),
        None,
        KvRejection.FINGERPRINT,
        StatusCode.FAILED_PRECONDITION,
    ),
    "unknown-leaf": (
        _edit_leaf("path", "layers/7/mlp"),
        FaultPlan(),
        None,
        KvRejection.UNKNOWN_LEAF,
        StatusCode.FAILED_PRECONDITION,
    ),
    "missing-leaf": (
        _edit_leaf("drop", None),
        FaultPlan(),
        None,
        KvRejection.MISSING_LEAF,
        StatusCode.FAILED_PRECONDITION,
    ),
    "dtype": (
        _edit_leaf("dtype", "int8"),
        FaultPlan(),
        None,
        KvRejection.DTYPE,
        StatusCode.FAILED_PRECONDITION,
    ),
    "shape": (
        _edit_leaf("shape", None),
        FaultPlan(),
        None,
        KvRejection.SHAPE,
        StatusCode.FAILED_PRECONDITION,
    ),
    "corrupt-chunk": (
        None,
        FaultPlan(corrupt_chunk=4),
        None,
        KvRejection.CHECKSUM,
        StatusCode.DATA_LOSS,
    ),
    "dropped-chunk": (
        None,
        FaultPlan(drop_chunk=2),
        None,
        KvRejection.SEQUENCE,
        StatusCode.DATA_LOSS,
    ),
    "reordered-chunk": (
        None,
        FaultPlan(reorder_chunk=5),
        None,
        KvRejection.SEQUENCE,
        StatusCode.DATA_LOSS,
    ),
    "dropped-last-chunk": (
        None,
        FaultPlan(drop_chunk=10),
        None,
        KvRejection.TRUNCATED,
        StatusCode.DATA_LOSS,
    ),
    "truncated": ("truncate", FaultPlan(), None, KvRejection.TRUNCATED, StatusCode.DATA_LOSS),
    "too-large": (None, FaultPlan(), 1000, KvRejection.TOO_LARGE, StatusCode.RESOURCE_EXHAUSTED),
}


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("edit, faults, limit, reason, status", FAILS.values(), ids=FAILS.keys())
def test_receiver_fails_closed(kind, edit, faults, limit, reason, status) -> None:
    spec = synthetic_spec(max_payload_bytes=limit or 1 << 20)

    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        stream = h.decode.stream_tokens(lease.lease_id)
        payload = encode(synthetic_prefix(), lease.lease_id)
        messages = payload.messages()
        if edit == "truncate":
            messages = itertools.islice(messages, 6)  # manifest + 5 chunks, then the end
        elif edit is not None:
            messages = edit(payload).messages()
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await h.decode.transfer_kv(apply_faults(messages, faults))
        assert time.monotonic() - started < BOUND_S
        assert (caught.value.code, caught.value.kv_reason) == (status, reason), caught.value
        assert h.handler.delivered == {}  # nothing reached the engine
        assert h.handler.inbox.buffered_bytes == 0 and h.handler.inbox.receiving == 0
        assert h.handler.rejected[lease.lease_id].reason is reason
        batches = [b async for b in stream]  # the lease's stream ends with ERROR
        assert batches[-1].finish is DecodeFinish.ERROR and reason.value in batches[-1].detail

    run(kind, body, spec)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_unknown_and_duplicate_lease(kind: str) -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(TransportError) as caught:
            await h.decode.transfer_kv(encode(synthetic_prefix(), "nope").messages())
        assert (caught.value.code, caught.value.kv_reason) == (
            StatusCode.NOT_FOUND,
            KvRejection.UNKNOWN_LEASE,
        )
        lease = await h.decode.reserve(reserve_request())
        sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), 3)
        first = asyncio.ensure_future(h.decode.transfer_kv(sender.messages()))
        await eventually(lambda: h.handler.inbox.receiving == 1, "first transfer started")
        with pytest.raises(TransportError) as caught:
            await h.decode.transfer_kv(encode(synthetic_prefix(), lease.lease_id).messages())
        assert caught.value.kv_reason is KvRejection.DUPLICATE
        assert caught.value.code is StatusCode.ALREADY_EXISTS
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    run(kind, body)
