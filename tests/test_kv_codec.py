"""KV codec: round trips for every layout, and every fail-closed case of the receiver."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import pytest

from shared.engine.engine import Engine, Params
from shared.kv.prefix import Prefix
from shared.kv_transfer.assembler import AssemblyState, KvAssembler, decode_messages
from shared.kv_transfer.codec import (
    FORMAT_VERSION,
    KvError,
    KvPayload,
    KvRejection,
    KvSpec,
    chunk_checksum,
    encode_prefix,
    flatten_cache,
)
from shared.rpc.pdserve.v1 import kv_pb2
from shared.sampling_params import SamplingParams
from tests.kv_fixtures import (
    CHUNK,
    FINGERPRINT,
    TRUE_LENGTH,
    payload_bytes,
    synthetic_prefix,
    synthetic_spec,
)


def _encode(
    prefix: Prefix | None = None, chunk_bytes: int = CHUNK, fingerprint: str = FINGERPRINT
) -> KvPayload:
    return encode_prefix(
        prefix or synthetic_prefix(),
        fingerprint=fingerprint,
        request_id="req-1",
        lease_id="lease-1",
        chunk_bytes=chunk_bytes,
    )


def _assert_same_prefix(sent: Prefix, received: Prefix) -> None:
    length = sent.true_length
    sent_leaves = flatten_cache(sent.cache)
    got_leaves = flatten_cache(received.cache)
    assert [k for k, _ in got_leaves] == [k for k, _ in sent_leaves]  # int keys stay ints
    for (keys, a), (_, b) in zip(sent_leaves, got_leaves, strict=True):
        assert b.shape == (a.shape[0], length, a.shape[2]), keys
        assert b.dtype == np.asarray(a).dtype, keys
        np.testing.assert_array_equal(b, np.asarray(a)[:, :length], err_msg=str(keys))
    assert (received.true_length, received.first_token) == (length, sent.first_token)
    assert received.sampling == sent.sampling


def test_engine_prefix_round_trip_trims_padding(engine: Engine, params: Params) -> None:
    sampling = SamplingParams(temperature=0.8, top_k=7, top_p=0.95, seed=123456789012345)
    prefix = engine.prefill(params, list(range(3, 14)), sampling=sampling)  # 11: 2 pages of 8
    bucket = jax.tree.leaves(prefix.cache)[0].shape[1]
    assert bucket > prefix.true_length
    spec = KvSpec.from_cache(prefix.cache, FINGERPRINT, 1 << 20)
    payload = _encode(prefix, chunk_bytes=1000)
    leaves = jax.tree.leaves(prefix.cache)
    per_position = sum(leaf.size // leaf.shape[1] * leaf.dtype.itemsize for leaf in leaves)
    assert payload.nbytes == per_position * prefix.true_length  # no padding on the wire
    received = decode_messages(spec, payload.messages())
    _assert_same_prefix(prefix, received)
    # The received prefix is what decode inserts: it must round-trip through the engine.
    pages = list(range(1, 2 + prefix.true_length // engine.config.page_size))
    state = engine.insert(received, engine.init_decode_state(), 1, pages)
    assert (
        int(state.lengths[1]) == prefix.true_length and int(state.tokens[1]) == prefix.first_token
    )


@pytest.mark.parametrize(
    "dtype, chunk_bytes",
    [("float32", 1), ("float32", 300), ("float32", 1 << 20), ("bfloat16", 100)],
    ids=["f32-1-byte-chunks", "f32-uneven-chunks", "f32-one-chunk", "bf16"],
)
def test_synthetic_round_trip(dtype: str, chunk_bytes: int) -> None:
    prefix = synthetic_prefix(dtype=dtype)
    payload = _encode(prefix, chunk_bytes=chunk_bytes)
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    assert payload.nbytes == payload_bytes(itemsize=itemsize)
    assert payload.manifest.chunk_count == -(-payload.nbytes // chunk_bytes)
    _assert_same_prefix(prefix, decode_messages(synthetic_spec(dtype=dtype), payload.messages()))


def test_other_layouts_round_trip() -> None:
    """Any nesting and leaf count: a deeper tree with a two-digit layer index."""
    rng = np.random.default_rng(1)
    cache = {
        "decoder": {
            i: {"self": {"k": rng.standard_normal((4, 9, 6)).astype(np.float32)}}
            for i in (0, 2, 10)
        }
    }
    prefix = dataclasses.replace(synthetic_prefix(), cache=cache, true_length=5)
    spec = KvSpec.from_cache(cache, FINGERPRINT, 1 << 20)
    _assert_same_prefix(prefix, decode_messages(spec, _encode(prefix, chunk_bytes=64).messages()))


# Fail-closed cases ------------------------------------------------------------------------

Mutation = Callable[[list[kv_pb2.KvTransfer]], list[kv_pb2.KvTransfer]]


def _manifest(edit: Callable[[kv_pb2.KvManifest], None]) -> Mutation:
    def mutate(messages: list[kv_pb2.KvTransfer]) -> list[kv_pb2.KvTransfer]:
        edit(messages[0].manifest)
        return messages

    return mutate


def _flip_byte(messages: list[kv_pb2.KvTransfer]) -> list[kv_pb2.KvTransfer]:
    data = bytearray(messages[3].chunk.data)
    data[0] ^= 1
    messages[3].chunk.data = bytes(data)
    return messages


def _forge_chunk(messages: list[kv_pb2.KvTransfer]) -> list[kv_pb2.KvTransfer]:
    """Data and CRC changed together: only the trailer's digest can tell."""

    chunk = messages[3].chunk
    chunk.data = bytes(len(chunk.data))
    chunk.crc32c = chunk_checksum(chunk.data)
    return messages


def _set(field: str, value: object) -> Mutation:
    return _manifest(lambda m: setattr(m, field, value))


def _leaf(index: int, edit: Callable[[kv_pb2.KvLeaf], None]) -> Mutation:
    return _manifest(lambda m: edit(m.leaves[index]))


def _rename(leaf: kv_pb2.KvLeaf) -> None:
    leaf.path = "layers/9/attn/cache_k"


def _shape(leaf: kv_pb2.KvLeaf) -> None:
    leaf.shape[2] = 4


CASES: dict[str, tuple[Mutation, KvRejection]] = {
    "format-version": (_set("format_version", FORMAT_VERSION + 1), KvRejection.FORMAT_VERSION),
    "fingerprint": (_set("model_fingerprint", "other-model"), KvRejection.FINGERPRINT),
    "unknown-leaf": (_leaf(0, _rename), KvRejection.UNKNOWN_LEAF),
    "missing-leaf": (_manifest(lambda m: m.leaves.pop()), KvRejection.MISSING_LEAF),
    "dtype": (_leaf(1, lambda leaf: setattr(leaf, "dtype", "float16")), KvRejection.DTYPE),
    "shape": (_leaf(2, _shape), KvRejection.SHAPE),
    "length-over-spec": (_set("true_length", 99), KvRejection.SHAPE),
    "checksum": (_flip_byte, KvRejection.CHECKSUM),
    "digest": (_forge_chunk, KvRejection.DIGEST),
    "dropped-chunk": (lambda ms: ms[:3] + ms[4:], KvRejection.SEQUENCE),
    "reordered-chunks": (lambda ms: [*ms[:3], ms[4], ms[3], *ms[5:]], KvRejection.SEQUENCE),
    "no-trailer": (lambda ms: ms[:-1], KvRejection.TRUNCATED),
    "last-chunk-missing": (lambda ms: [*ms[:-2], ms[-1]], KvRejection.TRUNCATED),
    "no-manifest": (lambda ms: ms[1:], KvRejection.MALFORMED),
    "overlapping-leaves": (
        _leaf(1, lambda leaf: setattr(leaf, "offset", 0)),
        KvRejection.MALFORMED,
    ),
}


@pytest.mark.parametrize("mutation, reason", CASES.values(), ids=CASES.keys())
def test_receiver_fails_closed(mutation: Mutation, reason: KvRejection) -> None:
    messages = mutation(list(_encode().messages()))
    assembler = KvAssembler(synthetic_spec())
    with pytest.raises(KvError) as caught:
        for message in messages:
            assembler.feed(message)
        assembler.finish()
    assert caught.value.reason is reason, caught.value
    assert assembler.state is AssemblyState.FAILED
    assert assembler.buffered_bytes == 0  # nothing partial kept


def test_over_size_limit_allocates_nothing() -> None:
    assembler = KvAssembler(synthetic_spec(max_payload_bytes=payload_bytes() - 1))
    manifest = next(_encode().messages())
    with pytest.raises(KvError) as caught:
        assembler.feed(manifest)
    assert caught.value.reason is KvRejection.TOO_LARGE
    assert "over the limit" in str(caught.value) and str(payload_bytes()) in str(caught.value)
    assert assembler.buffered_bytes == 0


def test_release_mid_stream_drops_the_buffer() -> None:
    assembler = KvAssembler(synthetic_spec())
    messages = list(_encode().messages())
    for message in messages[:4]:
        assembler.feed(message)
    assert assembler.buffered_bytes == payload_bytes()
    assembler.release()
    assembler.release()  # idempotent
    assert assembler.buffered_bytes == 0 and assembler.state is AssemblyState.FAILED
    with pytest.raises(KvError):
        assembler.feed(messages[4])


def test_encode_rejects_a_cache_shorter_than_the_prompt() -> None:
    with pytest.raises(ValueError, match="true_length"):
        _encode(synthetic_prefix(true_length=TRUE_LENGTH + 100))
