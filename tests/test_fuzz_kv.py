"""Fuzzing the KV codec's receiving side (hypothesis): whatever arrives, the receiver
answers with a typed `KvError` or a prefix that matches its own manifest; no other
exception escapes, nothing hangs, and a refused stream holds no buffer.

The streams start from a valid encoded prefix and are then damaged the ways a network, a
buggy sender or an attacker would: manifest fields set to random (huge, negative, wrong)
values, chunks truncated, reordered, duplicated or dropped, bytes flipped, messages
replaced by random bytes that happen to parse. Run through the `KvAssembler` and through
the decode worker's `KvInbox` (which also must forget the lease and report the rejection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from shared.kv.prefix import Prefix
from shared.kv_transfer.assembler import AssemblyState, KvAssembler
from shared.kv_transfer.codec import KvError, encode_prefix, flatten_cache
from shared.kv_transfer.inbox import KvInbox
from shared.rpc.pdserve.v1 import kv_pb2
from tests.fuzzing import fuzz_settings
from tests.kv_fixtures import CHUNK, FINGERPRINT, synthetic_prefix, synthetic_spec

pytestmark = pytest.mark.fuzz

SPEC = synthetic_spec(max_payload_bytes=1 << 16)
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)


def valid_stream() -> list[kv_pb2.KvTransfer]:
    payload = encode_prefix(
        synthetic_prefix(),
        fingerprint=FINGERPRINT,
        request_id="r",
        lease_id="lease-1",
        chunk_bytes=CHUNK,
    )
    return [kv_pb2.KvTransfer.FromString(m.SerializeToString()) for m in payload.messages()]


MANIFEST_FIELDS = {
    "format_version": st.integers(0, 2**32 - 1),
    "model_fingerprint": st.text(max_size=40),
    "lease_id": st.sampled_from(["lease-1", "other", ""]),
    "true_length": INT32,
    "first_token": INT32,
    "total_bytes": INT64,
    "chunk_bytes": INT64,
    "chunk_count": INT64,
}
LEAF_FIELDS = {
    "path": st.text(max_size=30),
    "dtype": st.sampled_from(["float32", "bfloat16", "int8", "float64", "", "object"]),
    "offset": INT64,
    "length": INT64,
}
SAMPLING_FIELDS = {
    "temperature": st.floats(allow_nan=True, allow_infinity=True),
    "top_k": INT32,
    "top_p": st.floats(allow_nan=True, allow_infinity=True),
    "seed": st.integers(0, 2**64 - 1),
}


@st.composite
def mutation(draw: st.DrawFn):
    """One damage to apply to the stream: (kind, arguments)."""
    kind = draw(
        st.sampled_from(
            [
                "manifest",
                "leaf",
                "shape",
                "sampling",
                "chunk",
                "flip",
                "truncate",
                "drop",
                "duplicate",
                "swap",
                "random",
                "trailer",
            ]
        )
    )
    if kind == "manifest":
        field = draw(st.sampled_from(sorted(MANIFEST_FIELDS)))
        return kind, (field, draw(MANIFEST_FIELDS[field]))
    if kind == "leaf":
        field = draw(st.sampled_from(sorted(LEAF_FIELDS)))
        return kind, (draw(st.integers(0, 7)), field, draw(LEAF_FIELDS[field]))
    if kind == "shape":
        return kind, (draw(st.integers(0, 7)), draw(st.lists(INT64, max_size=4)))
    if kind == "sampling":
        field = draw(st.sampled_from(sorted(SAMPLING_FIELDS)))
        return kind, (field, draw(SAMPLING_FIELDS[field]))
    if kind == "chunk":
        field = draw(st.sampled_from(["index", "offset", "crc32c", "data"]))
        value = draw(
            st.binary(max_size=300)
            if field == "data"
            else st.integers(0, 2**32 - 1)
            if field == "crc32c"
            else INT64
        )
        return kind, (draw(st.integers(0, 20)), field, value)
    if kind == "flip":
        return kind, (draw(st.integers(0, 20)), draw(st.integers(0, 10_000)))
    if kind == "random":
        return kind, (draw(st.integers(0, 20)), draw(st.binary(max_size=200)))
    if kind == "trailer":
        return kind, (draw(INT64), draw(st.binary(max_size=40)))
    return kind, (draw(st.integers(0, 20)), draw(st.integers(0, 20)))


def damage(messages: list[kv_pb2.KvTransfer], kind: str, args: tuple) -> list[kv_pb2.KvTransfer]:
    """`messages` with one damage applied (none where it has nothing to apply to)."""
    out = list(messages)
    has_manifest = bool(out) and out[0].WhichOneof("message") == "manifest"
    manifest = out[0].manifest if has_manifest else None
    leaves = list(manifest.leaves) if manifest is not None else []
    chunks = [m.chunk for m in out if m.WhichOneof("message") == "chunk"]
    pick = lambda i, seq: seq[i % len(seq)]  # noqa: E731
    if kind == "manifest" and manifest is not None:
        setattr(manifest, *args)
    elif kind == "leaf" and leaves:
        setattr(pick(args[0], leaves), args[1], args[2])
    elif kind == "shape" and leaves:
        leaf = pick(args[0], leaves)
        del leaf.shape[:]
        leaf.shape.extend(args[1])
    elif kind == "sampling" and manifest is not None:
        setattr(manifest.sampling, *args)
    elif kind == "chunk" and chunks:
        setattr(pick(args[0], chunks), args[1], args[2])
    elif kind == "flip" and chunks and any(c.data for c in chunks):
        chunk = pick(args[0], [c for c in chunks if c.data])
        data = bytearray(chunk.data)
        data[args[1] % len(data)] ^= 0x5A
        chunk.data = bytes(data)
    elif kind == "truncate" and out:
        out = out[: args[0] % len(out)]
    elif kind == "drop" and out:
        del out[args[0] % len(out)]
    elif kind == "duplicate" and out:
        out.insert(args[1] % len(out), out[args[0] % len(out)])
    elif kind == "swap" and out:
        i, j = args[0] % len(out), args[1] % len(out)
        out[i], out[j] = out[j], out[i]
    elif kind == "random" and out:
        # Bytes that do not parse are refused by gRPC before they reach us.
        with contextlib.suppress(DecodeError):
            out[args[0] % len(out)] = kv_pb2.KvTransfer.FromString(args[1])
    elif kind == "trailer" and out and out[-1].WhichOneof("message") == "trailer":
        out[-1].trailer.chunk_count, out[-1].trailer.payload_digest = args
    return out


def check_accepted(prefix: Prefix, messages: list[kv_pb2.KvTransfer]) -> None:
    """A prefix got through: it must be exactly what its manifest and chunks describe."""
    manifest = messages[0].manifest
    leaves = {"/".join(map(str, keys)): leaf for keys, leaf in flatten_cache(prefix.cache)}
    assert sorted(leaves) == sorted(leaf.path for leaf in manifest.leaves)
    assert prefix.true_length == manifest.true_length
    payload = b"".join(m.chunk.data for m in messages if m.WhichOneof("message") == "chunk")
    for leaf in manifest.leaves:
        array = leaves[leaf.path]
        assert list(array.shape) == list(leaf.shape) and array.dtype.name == leaf.dtype
        assert array.tobytes() == payload[leaf.offset : leaf.offset + leaf.length]


@fuzz_settings(400)
@given(st.lists(mutation(), min_size=1, max_size=4))
def test_assembler_rejects_damage_with_a_typed_error(mutations) -> None:
    messages = valid_stream()
    for kind, args in mutations:
        messages = damage(messages, kind, args)
    assembler = KvAssembler(SPEC)
    try:
        for message in messages:
            assembler.feed(message)
        prefix = assembler.finish()
    except KvError:
        assert assembler.state is AssemblyState.FAILED
        assert assembler.buffered_bytes == 0  # the one receive buffer is gone
        with pytest.raises(KvError):  # and it stays refused
            assembler.finish()
        return
    check_accepted(prefix, messages)


async def _as_stream(messages: list[kv_pb2.KvTransfer]) -> AsyncIterator[kv_pb2.KvTransfer]:
    for message in messages:
        await asyncio.sleep(0)  # a network: other tasks run between messages
        yield message


@fuzz_settings(150)
@given(st.lists(mutation(), min_size=1, max_size=3))
def test_inbox_rejects_damage_and_forgets_the_lease(mutations) -> None:
    messages = valid_stream()
    for kind, args in mutations:
        messages = damage(messages, kind, args)
    delivered: list[str] = []
    rejected: list[tuple[str, KvError]] = []
    inbox = KvInbox(
        SPEC,
        lambda lease, _: delivered.append(lease),
        lambda lease, err: rejected.append((lease, err)),
    )

    async def main() -> None:
        inbox.open("lease-1")
        try:
            await asyncio.wait_for(inbox.receive(_as_stream(messages)), 5.0)
        except KvError:
            assert inbox.buffered_bytes == 0 and inbox.receiving == 0
            if inbox.state("lease-1") is None:  # it was this lease's stream that failed
                assert [lease for lease, _ in rejected] == ["lease-1"]
            assert not delivered
            return
        assert delivered == ["lease-1"] and not rejected

    asyncio.run(main())
