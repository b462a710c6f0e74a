"""Worker flags -> a frozen `WorkerConfig`, validated at construction.

The flags themselves (name, type, default, help, the roles that read each) are declared
once in shared/serving/flags.py; this module turns a role's parsed flags into its config.
The Helm chart's tests parse the chart's container args with these very parsers, so the
chart and the code cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.config import ConfigError, EngineConfig, PrefillSettings, Quantization
from shared.serving.flags import (
    COMPILATION_CACHE_ENV,
    METRICS_PORTS,
    PORTS,
    ROLE_HELP,
    worker_parser,
)
from shared.weights.flags import quantization_from_args

if TYPE_CHECKING:
    from shared.transport.types import TransportConfig

# Importers of this module's former parser names find them here still.
__all__ = ["COMPILATION_CACHE_ENV", "ROLE_HELP", "worker_parser"]


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


# Default ports (declared with the flags; the chart's tests check its values against them).
DEFAULT_PORTS = {role: PORTS.values[role.value] for role in Role}
DEFAULT_METRICS_PORTS = {role: METRICS_PORTS.values[role.value] for role in Role}


@dataclasses.dataclass(slots=True, frozen=True)
class WorkerConfig:
    role: Role
    model: str
    quantization: Quantization | None
    host: str
    port: int
    metrics_port: int  # 0: pick a free port; -1: no /metrics
    health_port: int  # plaintext grpc.health.v1 only (probes, when --tls-*); -1: none
    slots: int | None  # None: as many as the devices' memory holds (--slots auto)
    prefill_buckets: tuple[int, ...]
    max_seq_len: int | None  # None: sized from memory (--max-seq-len auto)
    dtype: str  # float32 | bfloat16
    tensor_parallel: int | None  # devices to shard over; None: every local device
    kv_memory_fraction: float  # with auto sizing: the share of device memory pdserve uses
    memory_headroom_bytes: int  # with auto sizing: left for compiled programs
    page_size: int  # positions per KV page
    kv_pages: int | None  # pages in the pool; None: from memory (auto); 0: every slot full
    attention: str  # decode attention kernel: auto | xla | pallas
    transport: TransportConfig
    max_queue: int  # prefill requests waiting before RESOURCE_EXHAUSTED
    max_kv_bytes: int  # largest KV payload a decode worker accepts
    max_unsent_batches: int  # decode: token batches a stream may leave unread before it is cut
    drain_grace_s: float  # SIGTERM: how long live work may run before it is cancelled
    weights_seed: int  # presets only: the seed of their random weights
    # JAX's persistent compilation cache (None: off): a restart reads what the last start
    # compiled instead of compiling again (startup is mostly compiling).
    compilation_cache_dir: Path | None = None
    # all: compile every decode batch bucket before serving; largest: the largest before,
    # the rest while serving (shared/serving/runtime.py warm_up).
    warm_up: str = "largest"
    # Prefill and colocated workers: chunk size, prompts per call, the prefix cache.
    prefill: PrefillSettings = dataclasses.field(default_factory=PrefillSettings)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port={self.port} must be in [0, 65535]")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port={self.metrics_port} must be in [-1, 65535]")
        if not -1 <= self.health_port <= 65535:
            raise ConfigError(f"--health-port={self.health_port} must be in [-1, 65535]")
        if self.max_queue <= 0:
            raise ConfigError(f"--max-queue={self.max_queue} must be > 0")
        if self.drain_grace_s < 0:
            raise ConfigError(f"--drain-grace-s={self.drain_grace_s} must be >= 0")
        if self.max_kv_bytes <= 0:
            raise ConfigError(f"--max-kv-mib must be > 0 (got {self.max_kv_bytes} bytes)")
        if self.max_unsent_batches <= 0:
            raise ConfigError(f"--max-unsent-batches={self.max_unsent_batches} must be > 0")
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ConfigError(f"--tensor-parallel={self.tensor_parallel} must be >= 1")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"--kv-memory-fraction={self.kv_memory_fraction} must be in (0, 1]")
        if self.memory_headroom_bytes < 0:
            raise ConfigError("--memory-headroom-mib must be >= 0")
        if self.kv_pages is not None and self.kv_pages < 0:
            raise ConfigError(f"--kv-pages={self.kv_pages} must be >= 0 (0: every slot full)")
        # Whatever is fixed must already make a valid engine (auto parts: any valid value; a
        # fixed pool against an auto max_seq_len is checked once that is sized).
        if self.max_seq_len is not None or self.kv_pages == 0:
            self.engine_config(
                self.slots or 1,
                self.max_seq_len or self.prefill_buckets[-1] + 1,
                self.kv_pages or 0,
            )

    @property
    def auto_capacity(self) -> bool:
        return self.slots is None or self.max_seq_len is None or self.kv_pages is None

    def engine_config(
        self, slots: int | None = None, max_seq_len: int | None = None, kv_pages: int | None = None
    ) -> EngineConfig:
        """The engine layout, with auto-sized values filled in by the caller."""
        slots = self.slots if slots is None else slots
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        kv_pages = self.kv_pages if kv_pages is None else kv_pages
        if slots is None or max_seq_len is None or kv_pages is None:
            raise ConfigError("some sizes are auto: size them first (capacity.py)")
        return EngineConfig(
            slots,
            self.prefill_buckets,
            max_seq_len,
            self.dtype,
            page_size=self.page_size,
            num_pages=kv_pages or None,
            attention=self.attention,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def health_address(self) -> str | None:
        return f"{self.host}:{self.health_port}" if self.health_port >= 0 else None


def resolve_dtype(flag: str) -> str:
    """`--dtype auto` -> float32 on CPU (bfloat16 is several times slower there), bfloat16
    on accelerators."""
    if flag != "auto":
        return flag
    import jax  # only here: the orchestrator and the chart tests parse flags without JAX

    return EngineConfig.default_dtype_for_platform(jax.default_backend())


def tls_from_args(
    cert: Path | None, key: Path | None, ca: Path | None, *, flag: str = "--tls"
) -> tuple[Path, Path, Path] | None:
    """The three mTLS files, or None; ConfigError when only some are given."""
    given = {f"{flag}-cert": cert, f"{flag}-key": key, f"{flag}-ca": ca}
    if not any(given.values()):
        return None
    missing = [name for name, path in given.items() if path is None]
    if missing:
        raise ConfigError(f"mTLS needs {', '.join(given)} together; missing {', '.join(missing)}")
    for name, path in given.items():
        if not path.is_file():
            raise ConfigError(f"{name} {path} does not exist")
    return cert, key, ca


def parse_worker_args(argv: Sequence[str], role: Role | None) -> WorkerConfig:
    """Flags -> WorkerConfig; ConfigError (or SystemExit from argparse) on bad values. A
    flag the role does not read is a usage error; its field keeps the table's default."""
    args = worker_parser(role).parse_args(list(argv))
    role = role or Role(args.role)
    return WorkerConfig(
        role=role,
        model=args.model,
        quantization=quantization_from_args(args),
        host=args.host,
        port=DEFAULT_PORTS[role] if args.port is None else args.port,
        metrics_port=DEFAULT_METRICS_PORTS[role]
        if args.metrics_port is None
        else args.metrics_port,
        health_port=args.health_port,
        slots=args.slots,
        prefill_buckets=args.prefill_buckets,
        max_seq_len=args.max_seq_len,
        dtype=resolve_dtype(args.dtype),
        tensor_parallel=args.tensor_parallel,
        kv_memory_fraction=args.kv_memory_fraction,
        memory_headroom_bytes=int(args.memory_headroom_mib * 2**20),
        page_size=args.page_size,
        kv_pages=args.kv_pages,
        attention=args.attention,
        transport=_transport(args),
        max_queue=args.max_queue,
        max_kv_bytes=int(args.max_kv_mib * 2**20),
        max_unsent_batches=args.max_unsent_batches,
        drain_grace_s=args.drain_grace_s,
        weights_seed=args.weights_seed,
        compilation_cache_dir=Path(args.compilation_cache_dir)
        if args.compilation_cache_dir
        else None,
        warm_up=args.warm_up,
        prefill=_prefill_settings(args),
    )


def _transport(args: argparse.Namespace) -> TransportConfig:
    # Here, not at module level: the transport imports JAX, and `pdserve --help` builds
    # the worker parser without it.
    from shared.transport.types import TlsConfig, TransportConfig

    files = tls_from_args(args.tls_cert, args.tls_key, args.tls_ca)
    tls = None
    if files is not None:
        tls = TlsConfig(*files, require_client_cert=True, server_name=args.tls_server_name)
    elif args.tls_server_name:
        raise ConfigError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
    try:
        return TransportConfig(
            max_message_bytes=int(args.max_message_mib * 2**20),
            kv_chunk_bytes=args.kv_chunk_kib * 1024,
            transfer_timeout_s=args.transfer_timeout_s,
            keepalive_time_s=args.keepalive_time_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
            max_connection_age_s=args.max_connection_age_s,
            max_connection_age_grace_s=args.max_connection_age_grace_s,
            tls=tls,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _prefill_settings(args: argparse.Namespace) -> PrefillSettings:
    try:
        return PrefillSettings(
            chunk=args.prefill_chunk,
            max_rows=args.prefill_max_rows,
            prefix_cache_bytes=int(args.prefix_cache_mib * 2**20),
            aging_s=args.prefill_aging_s,
            batch_tokens=args.batch_tokens,
            colocated=args.colocated_prefill,
        )
    except ValueError as err:
        raise ConfigError(f"--prefill-*/--prefix-cache-mib: {err}") from None
