"""Worker flags -> a frozen `WorkerConfig`: the one place a worker's flags are read.

Ports and flag names are defined here once; the Helm chart's tests parse the chart's
container args with these very parsers, so the chart and the code cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.config import ConfigError, EngineConfig, PrefillSettings, Quantization
from shared.weights.flags import add_model_arguments, quantization_from_args

if TYPE_CHECKING:
    from shared.transport.types import TransportConfig


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


# Default ports, one place for the code and the chart.
DEFAULT_PORTS = {Role.PREFILL: 50061, Role.DECODE: 50062, Role.COLOCATED: 50063}
DEFAULT_METRICS_PORTS = {Role.PREFILL: 9161, Role.DECODE: 9162, Role.COLOCATED: 9163}


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
    # all: compile every bucket before serving; largest: the largest prefill bucket and
    # decode batch before, the rest while serving (shared/serving/runtime.py warm_up).
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


def _int_or_auto(text: str) -> int | None:
    """An integer, or "auto" (None): sized at startup from the devices' memory."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


ROLE_HELP = {
    Role.PREFILL: "prefill worker: prompts -> KV caches pushed to decode workers",
    Role.DECODE: "decode worker: slots stepped together (continuous batching)",
    Role.COLOCATED: "both phases in one process, no KV serialization (the baseline)",
}


def worker_parser(role: Role | str | None) -> argparse.ArgumentParser:
    """The flags of `pdserve prefill|decode|worker`; `role` None adds `--role`."""
    role = Role(role) if isinstance(role, str) else role
    prog = "pdserve worker" if role is None else f"pdserve {role.value}"
    roles = "; ".join(f"{r.value}: {text}" for r, text in ROLE_HELP.items())
    description = f"Run a worker ({roles})." if role is None else f"Run a {ROLE_HELP[role]}."
    # allow_abbrev=False: a typo in a flag must fail, not silently match a longer one.
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    if role is None:
        p.add_argument(
            "--role",
            choices=[r.value for r in Role],
            required=True,
            help="which worker to run: " + ", ".join(r.value for r in Role),
        )
    add_model_arguments(p)  # --model, --quantize, --float-lm-head
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--port", type=int, help="gRPC port (default: per role)")
    p.add_argument("--metrics-port", type=int, help="/metrics port (0: any free; -1: none)")
    p.add_argument(
        "--slots", type=_int_or_auto, default=8, help="decode slots, or auto (from memory)"
    )
    p.add_argument("--prefill-buckets", type=_int_list, default=(16, 32, 64, 128))
    p.add_argument(
        "--max-seq-len",
        type=_int_or_auto,
        default=256,
        help="prompt + generated tokens, or auto (from memory, at most the model's context)",
    )
    p.add_argument("--page-size", type=int, default=16, help="positions per KV cache page")
    p.add_argument(
        "--kv-pages",
        type=_int_or_auto,
        default=0,
        help="KV cache pages in the decode pool: a number, auto (from the devices' memory), "
        "or 0 (default: enough for every slot at --max-seq-len)",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "xla", "pallas"],
        default="auto",
        help="decode attention kernel; auto: Pallas on TPU, XLA elsewhere",
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        help="shard the model over this many local devices (default: all of them)",
    )
    p.add_argument(
        "--kv-memory-fraction",
        type=float,
        default=0.9,
        help="with auto sizing: the share of each device's memory pdserve may use",
    )
    p.add_argument(
        "--memory-headroom-mib",
        type=float,
        default=1024.0,
        help="with auto sizing: memory left per device for compiled programs",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="compute dtype; auto: float32 on CPU, bfloat16 on TPU/GPU",
    )
    p.add_argument("--max-queue", type=int, default=64, help="prefill queue bound")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="prefill: tokens of a prompt computed per call (default: the largest prefill "
        "bucket); longer prompts take several calls, interleaved with others",
    )
    p.add_argument(
        "--prefill-max-rows",
        type=int,
        default=4,
        help="prefill: prompts packed into one call, one chunk each (1: no packing)",
    )
    p.add_argument(
        "--prefix-cache-mib",
        type=float,
        default=64.0,
        help="prefill: memory for KV pages of recent prompts reused by later prompts that "
        "start the same way (least recently used evicted first; 0: no prefix cache)",
    )
    p.add_argument(
        "--prefill-aging-s",
        type=float,
        default=2.0,
        help="prefill: shortest prompt first, except that a prompt waiting this long goes "
        "first whatever its length",
    )
    p.add_argument("--max-kv-mib", type=float, default=1024.0, help="largest KV accepted")
    p.add_argument("--max-message-mib", type=float, default=8.0, help="gRPC message limit")
    p.add_argument("--kv-chunk-kib", type=int, default=1024, help="KV chunk size")
    p.add_argument("--rpc-timeout-s", type=float, default=10.0)
    p.add_argument("--transfer-timeout-s", type=float, default=60.0)
    p.add_argument("--drain-grace-s", type=float, default=30.0)
    p.add_argument("--weights-seed", type=int, default=0)
    add_compilation_cache_argument(p)
    p.add_argument(
        "--warm-up",
        choices=["largest", "all"],
        default="largest",
        help="largest (default): compile the largest prefill bucket and decode batch before "
        "serving and the others while serving (until each is ready, requests use the next "
        "larger one); all: compile every bucket before serving",
    )
    p.add_argument(
        "--max-unsent-batches",
        type=int,
        default=256,
        help="decode: token batches (one per step) a StreamTokens caller may leave unread; "
        "past that its lease is cancelled, its slot freed, the stream ends RESOURCE_EXHAUSTED",
    )
    add_connection_arguments(p)
    tls = p.add_argument_group(
        "mTLS between components",
        "All three files, or none (plaintext, for local runs). With them this worker serves "
        "TLS, accepts only clients whose certificate chains to --tls-ca, and presents its "
        "own certificate to the decode workers it pushes KV to. Files are re-read when they "
        "change (certificate rotation) without dropping live streams.",
    )
    tls.add_argument("--tls-cert", type=Path, help="this worker's certificate chain (PEM)")
    tls.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    tls.add_argument("--tls-ca", type=Path, help="the internal CA every peer must chain to")
    tls.add_argument(
        "--tls-server-name",
        help="the name other workers' certificates carry, when they are dialled by IP "
        "(e.g. the headless Service's DNS name); default: the dialled host",
    )
    return p


COMPILATION_CACHE_ENV = "PDSERVE_COMPILATION_CACHE_DIR"


def add_compilation_cache_argument(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--compilation-cache-dir`: JAX's persistent compilation cache. Default: the
    PDSERVE_COMPILATION_CACHE_DIR environment variable, else `default` (workers: off)."""
    p.add_argument(
        "--compilation-cache-dir",
        default=os.environ.get(COMPILATION_CACHE_ENV, default),
        help="keep compiled programs here and reuse them on the next start (a restart skips "
        f"most of the compiling); empty: off. Default: ${COMPILATION_CACHE_ENV}"
        + (f", else {default}" if default else ", else off")
        + ". Trusted content: share it only with processes you trust.",
    )


def add_connection_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Connection flags every server has (README: Reliability)."""
    p.add_argument(
        "--health-port",
        type=int,
        default=-1,
        help="also serve grpc.health.v1 alone, plaintext, on this port (Kubernetes' gRPC "
        "probes cannot speak TLS); -1: none",
    )
    p.add_argument(
        "--keepalive-time-s", type=float, default=10.0, help="ping an idle connection this often"
    )
    p.add_argument(
        "--keepalive-timeout-s",
        type=float,
        default=5.0,
        help="drop a connection whose ping gets no answer this long",
    )
    p.add_argument(
        "--max-connection-age-s",
        type=float,
        default=3600.0,
        help="send GOAWAY to connections this old (clients reconnect: new TLS handshake)",
    )
    p.add_argument(
        "--max-connection-age-grace-s",
        type=float,
        default=600.0,
        help="then end the calls still running on them after this long",
    )


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
    """Flags -> WorkerConfig; ConfigError (or SystemExit from argparse) on bad values."""
    # Here, not at module level: the transport imports JAX, and `pdserve --help` builds
    # this parser without it.
    from shared.transport.types import TlsConfig, TransportConfig

    args = worker_parser(role).parse_args(list(argv))
    role = role or Role(args.role)
    files = tls_from_args(args.tls_cert, args.tls_key, args.tls_ca)
    tls = None
    if files is not None:
        tls = TlsConfig(*files, require_client_cert=True, server_name=args.tls_server_name)
    elif args.tls_server_name:
        raise ConfigError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
    try:
        transport = TransportConfig(
            max_message_bytes=int(args.max_message_mib * 2**20),
            kv_chunk_bytes=args.kv_chunk_kib * 1024,
            rpc_timeout_s=args.rpc_timeout_s,
            transfer_timeout_s=args.transfer_timeout_s,
            keepalive_time_s=args.keepalive_time_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
            max_connection_age_s=args.max_connection_age_s,
            max_connection_age_grace_s=args.max_connection_age_grace_s,
            tls=tls,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        prefill = PrefillSettings(
            chunk=args.prefill_chunk,
            max_rows=args.prefill_max_rows,
            prefix_cache_bytes=int(args.prefix_cache_mib * 2**20),
            aging_s=args.prefill_aging_s,
        )
    except ValueError as err:
        raise ConfigError(f"--prefill-*/--prefix-cache-mib: {err}") from None
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
        transport=transport,
        max_queue=args.max_queue,
        max_kv_bytes=int(args.max_kv_mib * 2**20),
        max_unsent_batches=args.max_unsent_batches,
        drain_grace_s=args.drain_grace_s,
        weights_seed=args.weights_seed,
        compilation_cache_dir=Path(args.compilation_cache_dir)
        if args.compilation_cache_dir
        else None,
        warm_up=args.warm_up,
        prefill=prefill,
    )
