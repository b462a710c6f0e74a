"""KV codec: a `Prefix` <-> one manifest, byte chunks and a trailer (kv.proto), and back.

The invariant: the receiver hands out a `Prefix` only after the whole stream was checked
(manifest against the expected model and leaf layout, every chunk's CRC and place, the
trailer's count and digest). Any failure raises `KvError` with a `KvRejection` reason and
leaves nothing behind: the one receive buffer is dropped with the assembler.

Sender: `encode_prefix` copies every leaf, cut to the prompt's true length on the sequence
axis (axis 1), into one contiguous byte payload (the only copy it makes: device -> host and
the cut happen in it); `KvPayload.messages()` then yields chunks that are slices of that
payload. Receiver (shared/kv_transfer/assembler.py): `KvAssembler` allocates one buffer of the
manifest's size after the size limit check, writes each chunk into its place, and returns
leaves as views of it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import google_crc32c
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so np.dtype("bfloat16") works)
import numpy as np

from shared.kv.prefix import CacheDict, Prefix
from shared.rpc.pdserve.v1 import kv_pb2, sampling_pb2
from shared.sampling_params import SamplingParams

FORMAT_VERSION = 2  # 2: chunk checksums are CRC-32C (1 used zlib CRC-32)
LENGTH_AXIS = 1  # leaves are [num_kv_heads, length, head_dim]
DEFAULT_CHUNK_BYTES = 1 << 20  # grpcio streams ~1 MiB messages several times faster than one
MAX_CHUNK_BYTES = 64 << 20
Key = str | int


class KvRejection(enum.Enum):
    """Why a receiver refused a KV stream; labels the "KV rejections by reason" counter."""

    FORMAT_VERSION = "format_version"
    FINGERPRINT = "fingerprint"
    UNKNOWN_LEAF = "unknown_leaf"
    MISSING_LEAF = "missing_leaf"
    DTYPE = "dtype"
    SHAPE = "shape"
    CHECKSUM = "checksum"
    DIGEST = "digest"
    SEQUENCE = "sequence"  # a chunk out of place: dropped, duplicated or reordered
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"  # inconsistent manifest, message out of protocol order
    UNKNOWN_LEASE = "unknown_lease"
    DUPLICATE = "duplicate"  # a second transfer for a lease that has (or is getting) its KV
    CANCELLED = "cancelled"  # the receiver aborted the transfer (lease cancelled)


class KvError(Exception):
    """A KV stream was refused. `reason` is machine-readable; the message names the values."""

    def __init__(self, reason: KvRejection, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.detail = message


@dataclasses.dataclass(slots=True, frozen=True)
class KvReceipt:
    """What a receiver answers once a whole stream checked out and was handed over."""

    lease_id: str
    bytes_received: int
    chunks_received: int


def chunk_checksum(data: bytes) -> int:
    """CRC-32C of one chunk (SSE4.2/ARMv8 instructions: ~25 GB/s here, zlib CRC-32 ~4)."""
    return google_crc32c.value(data)


# Leaf layout ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True, frozen=True)
class LeafSpec:
    """What the receiver expects of one leaf. `shape[LENGTH_AXIS]` is free (the prompt's)."""

    keys: tuple[Key, ...]  # the pure-dict keys, types included (ints for nnx.List indices)
    dtype: np.dtype
    shape: tuple[int, ...]  # the length axis holds the largest length accepted

    @property
    def path(self) -> str:
        return leaf_path(self.keys)


@dataclasses.dataclass(slots=True, frozen=True)
class KvSpec:
    """Everything a receiver checks a manifest against; built once per decode worker."""

    fingerprint: str
    leaves: Mapping[str, LeafSpec]  # by path
    max_payload_bytes: int

    def __post_init__(self) -> None:
        if not self.fingerprint:
            raise ValueError("KvSpec.fingerprint must not be empty")
        if self.max_payload_bytes <= 0:
            raise ValueError(f"max_payload_bytes={self.max_payload_bytes} must be > 0")
        if not self.leaves:
            raise ValueError("KvSpec.leaves must name at least one leaf")

    @classmethod
    def from_cache(cls, cache: CacheDict, fingerprint: str, max_payload_bytes: int) -> KvSpec:
        """Spec of a cache pure dict (arrays or `jax.ShapeDtypeStruct`s). The length axis of
        each leaf is the longest prompt accepted (e.g. a largest-bucket prefill cache)."""
        leaves = {
            leaf_path(keys): LeafSpec(keys, np.dtype(leaf.dtype), tuple(leaf.shape))
            for keys, leaf in flatten_cache(cache)
        }
        return cls(fingerprint, leaves, max_payload_bytes)

    @property
    def max_length(self) -> int:
        return min(s.shape[LENGTH_AXIS] for s in self.leaves.values())


def leaf_path(keys: Iterable[Key]) -> str:
    """("layers", 0, "attn", "cache_k") -> "layers/0/attn/cache_k"."""
    return "/".join(str(k) for k in keys)


def flatten_cache(cache: Mapping[Key, Any]) -> list[tuple[tuple[Key, ...], Any]]:
    """Leaves of a nested pure dict with their key paths, in a deterministic order."""
    out: list[tuple[tuple[Key, ...], Any]] = []

    def visit(node: Mapping[Key, Any], prefix: tuple[Key, ...]) -> None:
        # ints before strings, each in natural order, so layer 10 follows layer 9.
        for key in sorted(
            node, key=lambda k: (isinstance(k, str), k if isinstance(k, int) else 0, str(k))
        ):
            child = node[key]
            if isinstance(child, Mapping):
                visit(child, (*prefix, key))
            else:
                out.append(((*prefix, key), child))

    visit(cache, ())
    return out


def unflatten_cache(items: Iterable[tuple[tuple[Key, ...], Any]]) -> CacheDict:
    root: CacheDict = {}
    for keys, leaf in items:
        node = root
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return root


def sampling_to_proto(params: SamplingParams) -> sampling_pb2.SamplingParams:
    return sampling_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed
    )


def sampling_from_proto(message: sampling_pb2.SamplingParams) -> SamplingParams:
    """Raises `SamplingError` for out-of-range values; an unset top_p (0) means 1."""
    return SamplingParams(
        temperature=message.temperature,
        top_k=message.top_k,
        top_p=message.top_p or 1.0,
        seed=message.seed,
    )


# Sender -------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True, frozen=True)
class KvPayload:
    """An encoded prefix: the manifest and the payload as contiguous byte segments (views of
    the sender's arrays, in manifest order). Each chunk is gathered from the segments
    straight into its message's bytes: one copy of the KV on the sending side."""

    manifest: kv_pb2.KvManifest
    segments: tuple[np.ndarray, ...]  # 1-D uint8 views

    @property
    def nbytes(self) -> int:
        return int(self.manifest.total_bytes)

    def messages(self) -> Iterator[kv_pb2.KvTransfer]:
        """The TransferKV stream: manifest, chunks, trailer. Lazy: one chunk at a time."""
        yield kv_pb2.KvTransfer(manifest=self.manifest)
        step = self.manifest.chunk_bytes
        digest = ChunkDigest()
        for index, data in enumerate(_gather(self.segments, step)):
            crc = chunk_checksum(data)
            digest.update(index, len(data), crc)
            message = kv_pb2.KvTransfer()  # fields set in place: KvTransfer(chunk=...) copies
            chunk = message.chunk
            chunk.index, chunk.offset, chunk.data, chunk.crc32c = index, index * step, data, crc
            yield message
        trailer = kv_pb2.KvTrailer(
            chunk_count=self.manifest.chunk_count, payload_digest=digest.digest()
        )
        yield kv_pb2.KvTransfer(trailer=trailer)


class ChunkDigest:
    """SHA-256 over each chunk's (index, length, CRC-32C), in order: a hash list that binds
    the per-chunk checksums into one payload digest. Hashing every byte again with SHA-256
    would cost ~0.6 ns/byte on each side (more than the loopback socket itself)."""

    _RECORD = struct.Struct("<QQI")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, index: int, length: int, crc: int) -> None:
        self._hash.update(self._RECORD.pack(index, length, crc))

    def digest(self) -> bytes:
        return self._hash.digest()


def _gather(segments: tuple[np.ndarray, ...], step: int) -> Iterator[bytes]:
    """The concatenated segments, cut into `step`-byte pieces (the last may be shorter)."""
    pieces: list[memoryview] = []
    filled = 0
    for segment in segments:
        view = memoryview(segment)
        while len(view):
            take = min(step - filled, len(view))
            pieces.append(view[:take])
            view, filled = view[take:], filled + take
            if filled == step:
                yield b"".join(pieces)  # the one copy: protobuf `bytes` fields take bytes
                pieces, filled = [], 0
    if pieces:
        yield b"".join(pieces)


def encode_prefix(
    prefix: Prefix,
    *,
    fingerprint: str,
    request_id: str,
    lease_id: str,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> KvPayload:
    """Describe every leaf cut to `prefix.true_length`; the bytes stay in the prefix's
    arrays (which must not change until the stream is sent) until `messages()` gathers
    each chunk."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be in [1, {MAX_CHUNK_BYTES}]")
    length = prefix.true_length
    leaves, offset = [], 0
    arrays = []
    for keys, leaf in flatten_cache(prefix.cache):
        array = np.asarray(leaf)  # a view for host (CPU) arrays; device arrays come to host
        if array.ndim != 3 or array.shape[LENGTH_AXIS] < length:
            raise ValueError(
                f"leaf {leaf_path(keys)} has shape {array.shape}; expected "
                f"[num_kv_heads, >= true_length ({length}), head_dim]"
            )
        shape = (array.shape[0], length, array.shape[2])
        nbytes = int(np.prod(shape)) * array.dtype.itemsize
        leaves.append(
            kv_pb2.KvLeaf(
                path=leaf_path(keys),
                dtype=array.dtype.name,
                shape=shape,
                offset=offset,
                length=nbytes,
            )
        )
        arrays.append(array)
        offset += nbytes
    segments = tuple(
        np.ascontiguousarray(array[head, :length]).view(np.uint8).reshape(-1)
        for array in arrays
        for head in range(array.shape[0])
    )  # a view, not a copy, for the usual C-contiguous cache leaf
    manifest = kv_pb2.KvManifest(
        format_version=FORMAT_VERSION,
        model_fingerprint=fingerprint,
        request_id=request_id,
        lease_id=lease_id,
        true_length=length,
        first_token=prefix.first_token,
        sampling=sampling_to_proto(prefix.sampling),
        leaves=leaves,
        total_bytes=offset,
        chunk_bytes=chunk_bytes,
        chunk_count=-(-offset // chunk_bytes),
    )
    return KvPayload(manifest, segments)
