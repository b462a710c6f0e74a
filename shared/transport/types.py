"""Domain types that cross a worker boundary: requests, results, errors, transport config.

Servers and clients speak these; only the gRPC layer (convert.py) sees protos, except the
KV stream, whose messages are the codec's own wire format (kv.proto) on both transports.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from shared.kv_transfer.codec import KvReceipt as KvReceipt  # re-exported: a call's result type
from shared.kv_transfer.codec import KvRejection
from shared.logprobs import TokenLogprob, check_top_logprobs
from shared.sampling_params import SamplingParams


class StatusCode(enum.Enum):
    """The gRPC status codes a worker call can end with (names mirror `grpc.StatusCode`)."""

    CANCELLED = enum.auto()
    UNKNOWN = enum.auto()
    INVALID_ARGUMENT = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    NOT_FOUND = enum.auto()
    ALREADY_EXISTS = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    ABORTED = enum.auto()
    UNAVAILABLE = enum.auto()
    DATA_LOSS = enum.auto()
    INTERNAL = enum.auto()


class TransportError(Exception):
    """A worker call failed. Handlers raise it to choose the status; clients raise it for
    every failure (dead peer: UNAVAILABLE; KV rejected: `kv_reason` says why)."""

    def __init__(
        self, code: StatusCode, message: str, kv_reason: KvRejection | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.kv_reason = kv_reason


class DecodeFinish(enum.Enum):
    """Why a decode slot was freed (worker.proto DecodeFinishReason)."""

    STOP = enum.auto()  # EOS or a stop token
    LENGTH = enum.auto()
    CANCELLED = enum.auto()
    DEADLINE = enum.auto()
    LEASE_EXPIRED = enum.auto()
    ERROR = enum.auto()
    PREEMPTED = enum.auto()  # the KV page pool ran dry: resume the request elsewhere


@dataclasses.dataclass(slots=True, frozen=True)
class GenerationLimits:
    """What a decode worker enforces on one request."""

    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")


@dataclasses.dataclass(slots=True, frozen=True)
class ReserveRequest:
    request_id: str
    prompt_length: int
    limits: GenerationLimits
    ttl_seconds: float
    deadline: float | None = None  # unix time (time.time()); None: no deadline
    # None: no logprobs; N: each token's logprob and its position's N likeliest tokens.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        check_top_logprobs(self.logprobs)
        if self.ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds={self.ttl_seconds} must be > 0")
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length={self.prompt_length} must be >= 1")


@dataclasses.dataclass(slots=True, frozen=True)
class Lease:
    lease_id: str
    slot: int
    expire_time: float  # unix time


@dataclasses.dataclass(slots=True, frozen=True)
class TokenBatch:
    """Tokens since the previous batch; the last batch of a stream has `finish` set."""

    token_ids: tuple[int, ...]
    finish: DecodeFinish | None = None
    detail: str = ""  # why, for an ERROR finish
    # For a lease reserved with `logprobs`: one per token, in order; empty otherwise.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(slots=True, frozen=True)
class LoadReport:
    free_slots: int
    total_slots: int
    queue_depth: int
    live_requests: int
    free_pages: int = 0  # KV pages free and not promised (decode workers)
    total_pages: int = 0
    page_size: int = 0  # decode: the KV pool's; prefill: the prefix cache's block size
    max_seq_len: int = 0  # decode: the most positions one request may take (0: unknown)

    def pages_for(self, tokens: int) -> int:
        """KV pages `tokens` positions take on this worker (0 where it has no pages)."""
        return -(-tokens // self.page_size) if self.page_size else 0


@dataclasses.dataclass(slots=True, frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    decode_target: str  # host:port of the decode worker holding the lease
    lease_id: str
    deadline: float | None = None  # unix time; None: no deadline
    model_fingerprint: str = ""  # empty: do not check
    resume: bool = False  # prompt + tokens already streamed: may exceed the largest bucket
    logprobs: int | None = None  # as ReserveRequest's, for the first token

    def __post_init__(self) -> None:
        check_top_logprobs(self.logprobs)


@dataclasses.dataclass(slots=True, frozen=True)
class PrefillTimings:
    queue_seconds: float
    prefill_seconds: float
    transfer_seconds: float
    kv_bytes: int
    cached_tokens: int = 0  # prompt tokens served from the worker's prefix cache


@dataclasses.dataclass(slots=True, frozen=True)
class PrefillResult:
    first_token: int
    timings: PrefillTimings
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclasses.dataclass(slots=True, frozen=True)
class TlsConfig:
    """Certificate files of one end of a TLS connection (shared/transport/tls.py reads and
    reloads them).

    As a server: `cert`/`key` are served; with `require_client_cert`, clients must present a
    certificate that chains to `ca`. As a client: `cert`/`key` are presented (mTLS) and the
    server's certificate must chain to `ca` (None: the system's roots) and carry
    `server_name` (None: the host dialled).
    """

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.require_client_cert and self.ca is None:
            raise ValueError("requiring client certificates needs the CA they must chain to")
        for path in self.paths:
            if not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.ca,) if self.ca is not None else ())


@dataclasses.dataclass(slots=True, frozen=True)
class TransportConfig:
    """Message sizes, chunking, timeouts, connection lifetimes and TLS of a process's gRPC
    servers and of its calls to other workers; none left to the gRPC defaults (4 MiB
    receive limit, no deadline, keepalive off, connections kept forever).

    Connection lifetimes (every server): keepalive pings an idle connection every
    `keepalive_time_s` and drops it without an answer in `keepalive_timeout_s` (a dead peer,
    a cut network); a connection older than `max_connection_age_s` is sent GOAWAY, so that
    clients reconnect (new TLS handshake: rotated certificates; rebalancing across
    replicas), and its calls still running `max_connection_age_grace_s` later are ended.
    """

    max_message_bytes: int = 8 << 20
    max_receive_bytes: int | None = None  # a server's request limit; None: max_message_bytes
    kv_chunk_bytes: int = 1 << 20
    rpc_timeout_s: float = 10.0  # every unary call (Reserve, Prefill's caller sets its own)
    transfer_timeout_s: float = 60.0  # one whole TransferKV stream
    keepalive_time_s: float = 10.0  # ping an idle connection this often...
    keepalive_timeout_s: float = 5.0  # ...and declare the peer dead without an answer
    reconnect_backoff_s: float = 1.0  # first retry of a failed connection
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 600.0
    max_concurrent_streams: int = 0  # HTTP/2 streams per connection a server allows; 0: gRPC's
    tls: TlsConfig | None = None  # None: plaintext (loud unless on loopback)

    # Room for the chunk's own fields and framing around `kv_chunk_bytes` of data.
    CHUNK_OVERHEAD_BYTES = 1024

    def __post_init__(self) -> None:
        if self.kv_chunk_bytes <= 0:
            raise ValueError(f"kv_chunk_bytes={self.kv_chunk_bytes} must be > 0")
        if self.kv_chunk_bytes + self.CHUNK_OVERHEAD_BYTES > self.max_message_bytes:
            raise ValueError(
                f"kv_chunk_bytes={self.kv_chunk_bytes} does not fit max_message_bytes="
                f"{self.max_message_bytes} with {self.CHUNK_OVERHEAD_BYTES} bytes of framing; "
                "raise max_message_bytes or lower kv_chunk_bytes"
            )
        names = ("rpc_timeout_s", "transfer_timeout_s", "keepalive_time_s", "max_connection_age_s")
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.keepalive_timeout_s <= self.keepalive_time_s:
            raise ValueError(
                f"keepalive_timeout_s={self.keepalive_timeout_s} must be in "
                f"(0, keepalive_time_s={self.keepalive_time_s}]"
            )
        if self.max_connection_age_grace_s < 0 or self.max_concurrent_streams < 0:
            raise ValueError(
                f"max_connection_age_grace_s={self.max_connection_age_grace_s} and "
                f"max_concurrent_streams={self.max_concurrent_streams} must be >= 0"
            )
        if self.max_receive_bytes is not None and self.max_receive_bytes <= 0:
            raise ValueError(f"max_receive_bytes={self.max_receive_bytes} must be > 0")
