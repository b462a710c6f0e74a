"""KV codec, receiving side: one TransferKV stream -> a validated `Prefix`, or `KvError`.

The invariant: a `Prefix` is handed out only after the whole stream was checked (the
manifest against the expected model and leaf layout, every chunk's CRC and place, the
trailer's count and digest). Any failure raises `KvError` and drops the one receive buffer,
so nothing partial ever reaches the engine.

Copies: the buffer is allocated once, after the manifest passed every check (a refused
stream costs no memory); each chunk is written into its place; the leaves handed out are
views of that buffer.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

import numpy as np

from shared.kv.prefix import Prefix
from shared.kv_transfer.codec import (
    FORMAT_VERSION,
    LENGTH_AXIS,
    MAX_CHUNK_BYTES,
    ChunkDigest,
    KvError,
    KvRejection,
    KvSpec,
    LeafSpec,
    chunk_checksum,
    sampling_from_proto,
    unflatten_cache,
)
from shared.rpc.pdserve.v1 import kv_pb2
from shared.sampling_params import SamplingError


class AssemblyState(enum.Enum):
    AWAITING_MANIFEST = enum.auto()
    RECEIVING = enum.auto()
    COMPLETE = enum.auto()  # the trailer checked out; `result()` hands out the prefix
    FAILED = enum.auto()  # rejected or released; holds no buffer


@dataclasses.dataclass(slots=True, frozen=True)
class _Placed:
    spec: LeafSpec
    shape: tuple[int, ...]
    offset: int
    length: int


class KvAssembler:
    """Receives one TransferKV stream: `feed` every message in order, then `result()`.

    Not thread-safe; one assembler per stream. Any failure raises `KvError`, moves to
    FAILED and drops the buffer; so does `release()` (idempotent), which the owner calls
    when the stream is cancelled or abandoned.
    """

    def __init__(self, spec: KvSpec) -> None:
        self.spec = spec
        self.state = AssemblyState.AWAITING_MANIFEST
        self.manifest: kv_pb2.KvManifest | None = None
        self._buffer: np.ndarray | None = None  # [total_bytes] uint8
        self._placed: list[_Placed] = []
        self._next_index = 0
        self._digest = ChunkDigest()

    @property
    def buffered_bytes(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.nbytes)

    @property
    def received_bytes(self) -> int:
        if self.manifest is None:
            return 0
        return min(self._next_index * self.manifest.chunk_bytes, self.manifest.total_bytes)

    def release(self) -> None:
        """Drop everything received so far; later calls are no-ops."""
        self._buffer = None
        self._placed = []
        if self.state is not AssemblyState.COMPLETE:
            self.state = AssemblyState.FAILED

    def feed(self, message: kv_pb2.KvTransfer) -> None:
        try:
            self._feed(message)
        except KvError:
            self.release()
            # Even after a complete stream (a message past the trailer): the buffer is gone,
            # so `finish` must refuse too rather than hand out a prefix without its bytes.
            self.state = AssemblyState.FAILED
            raise

    def _feed(self, message: kv_pb2.KvTransfer) -> None:
        kind = message.WhichOneof("message")
        if self.state is AssemblyState.AWAITING_MANIFEST and kind == "manifest":
            self._accept_manifest(message.manifest)
        elif self.state is AssemblyState.RECEIVING and kind == "chunk":
            self._accept_chunk(message.chunk)
        elif self.state is AssemblyState.RECEIVING and kind == "trailer":
            self._accept_trailer(message.trailer)
        else:
            raise KvError(
                KvRejection.MALFORMED, f"unexpected {kind} message in state {self.state.name}"
            )

    def finish(self) -> Prefix:
        """The stream ended: the prefix if the trailer was accepted, else TRUNCATED."""
        if self.state is not AssemblyState.COMPLETE:
            state, got = self.state, self.received_bytes
            total = self.manifest.total_bytes if self.manifest is not None else "?"
            self.release()
            raise KvError(
                KvRejection.TRUNCATED,
                f"stream ended in state {state.name} after {got} of {total} bytes",
            )
        return self._prefix()

    # Manifest --------------------------------------------------------------------------

    def _accept_manifest(self, manifest: kv_pb2.KvManifest) -> None:
        spec = self.spec
        if manifest.format_version != FORMAT_VERSION:
            raise KvError(
                KvRejection.FORMAT_VERSION,
                f"format_version={manifest.format_version}, this receiver reads {FORMAT_VERSION}",
            )
        if manifest.model_fingerprint != spec.fingerprint:
            raise KvError(
                KvRejection.FINGERPRINT,
                f"KV made by model {manifest.model_fingerprint!r}, this worker serves "
                f"{spec.fingerprint!r}",
            )
        if manifest.total_bytes > spec.max_payload_bytes:
            raise KvError(
                KvRejection.TOO_LARGE,
                f"payload of {manifest.total_bytes} bytes is over the limit of "
                f"{spec.max_payload_bytes} bytes",
            )
        length = manifest.true_length
        if not 0 < length <= spec.max_length:
            raise KvError(
                KvRejection.SHAPE, f"true_length={length} must be in [1, {spec.max_length}]"
            )
        self._placed = self._place_leaves(manifest)
        self._check_layout(manifest)
        try:
            sampling_from_proto(manifest.sampling)
        except SamplingError as e:
            raise KvError(KvRejection.MALFORMED, f"sampling: {e}") from None
        self.manifest = manifest
        # Allocated only now, after every check on the manifest: a refused stream costs
        # no memory.
        self._buffer = np.empty(manifest.total_bytes, np.uint8)
        self.state = AssemblyState.RECEIVING

    def _place_leaves(self, manifest: kv_pb2.KvManifest) -> list[_Placed]:
        placed, seen = [], set()
        for leaf in manifest.leaves:
            spec = self.spec.leaves.get(leaf.path)
            if spec is None:
                raise KvError(
                    KvRejection.UNKNOWN_LEAF, f"leaf {leaf.path!r} is not in this model's cache"
                )
            if leaf.path in seen:
                raise KvError(KvRejection.MALFORMED, f"leaf {leaf.path!r} is listed twice")
            seen.add(leaf.path)
            if leaf.dtype != spec.dtype.name:
                raise KvError(
                    KvRejection.DTYPE,
                    f"leaf {leaf.path!r} is {leaf.dtype}, expected {spec.dtype.name}",
                )
            want = list(spec.shape)
            want[LENGTH_AXIS] = manifest.true_length
            if list(leaf.shape) != want:
                raise KvError(
                    KvRejection.SHAPE,
                    f"leaf {leaf.path!r} has shape {list(leaf.shape)}, expected {want}",
                )
            nbytes = int(np.prod(want)) * spec.dtype.itemsize
            if leaf.length != nbytes:
                raise KvError(
                    KvRejection.MALFORMED,
                    f"leaf {leaf.path!r} says {leaf.length} bytes, its shape needs {nbytes}",
                )
            placed.append(_Placed(spec, tuple(want), leaf.offset, leaf.length))
        missing = sorted(set(self.spec.leaves) - seen)
        if missing:
            raise KvError(KvRejection.MISSING_LEAF, f"leaves {missing} are missing")
        return placed

    def _check_layout(self, manifest: kv_pb2.KvManifest) -> None:
        """Leaves tile the payload exactly; the chunk plan covers it exactly."""
        position = 0
        for leaf in sorted(self._placed, key=lambda p: p.offset):
            if leaf.offset != position:
                raise KvError(
                    KvRejection.MALFORMED,
                    f"leaf {leaf.spec.path!r} starts at byte {leaf.offset}, expected {position}",
                )
            position += leaf.length
        if position != manifest.total_bytes:
            raise KvError(
                KvRejection.MALFORMED,
                f"leaves hold {position} bytes, total_bytes says {manifest.total_bytes}",
            )
        step = manifest.chunk_bytes
        if not 0 < step <= MAX_CHUNK_BYTES or manifest.chunk_count != -(-position // step):
            raise KvError(
                KvRejection.MALFORMED,
                f"chunk plan ({manifest.chunk_count} chunks of {step} bytes) does not cover "
                f"{position} bytes (chunk_bytes must be in [1, {MAX_CHUNK_BYTES}])",
            )

    # Chunks and trailer ----------------------------------------------------------------

    def _accept_chunk(self, chunk: kv_pb2.KvChunk) -> None:
        manifest, buffer = self.manifest, self._buffer
        assert manifest is not None and buffer is not None
        if chunk.index != self._next_index or chunk.index >= manifest.chunk_count:
            raise KvError(
                KvRejection.SEQUENCE,
                f"chunk {chunk.index} arrived where chunk {self._next_index} of "
                f"{manifest.chunk_count} was due",
            )
        start = chunk.index * manifest.chunk_bytes
        size = min(manifest.chunk_bytes, manifest.total_bytes - start)
        data = chunk.data
        if chunk.offset != start or len(data) != size:
            raise KvError(
                KvRejection.MALFORMED,
                f"chunk {chunk.index} covers [{chunk.offset}, +{len(data)}), "
                f"expected [{start}, +{size})",
            )
        crc = chunk_checksum(data)
        if crc != chunk.crc32c:
            raise KvError(
                KvRejection.CHECKSUM,
                f"chunk {chunk.index}: CRC-32C {crc:#010x} != {chunk.crc32c:#010x} sent",
            )
        buffer[start : start + size] = np.frombuffer(data, np.uint8)
        self._digest.update(chunk.index, size, crc)
        self._next_index += 1

    def _accept_trailer(self, trailer: kv_pb2.KvTrailer) -> None:
        manifest = self.manifest
        assert manifest is not None
        if self._next_index != manifest.chunk_count or trailer.chunk_count != manifest.chunk_count:
            raise KvError(
                KvRejection.TRUNCATED,
                f"trailer after {self._next_index} chunks (trailer says {trailer.chunk_count}, "
                f"manifest {manifest.chunk_count})",
            )
        if trailer.payload_digest != self._digest.digest():
            raise KvError(KvRejection.DIGEST, "payload digest does not match the chunks received")
        self.state = AssemblyState.COMPLETE

    def _prefix(self) -> Prefix:
        manifest, buffer = self.manifest, self._buffer
        assert manifest is not None and buffer is not None
        leaves = [
            (
                p.spec.keys,
                np.frombuffer(buffer, p.spec.dtype, int(np.prod(p.shape)), p.offset).reshape(
                    p.shape
                ),
            )
            for p in self._placed
        ]
        return Prefix(
            cache=unflatten_cache(leaves),
            true_length=manifest.true_length,
            first_token=manifest.first_token,
            sampling=sampling_from_proto(manifest.sampling),
        )


def decode_messages(spec: KvSpec, messages: Iterable[kv_pb2.KvTransfer]) -> Prefix:
    """Assemble a whole stream held in memory (tests, the colocated path)."""
    assembler = KvAssembler(spec)
    for message in messages:
        assembler.feed(message)
    return assembler.finish()
