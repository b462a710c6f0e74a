"""Orchestrator flags -> a frozen `OrchestratorConfig`: the one place they are read.

Workers come from static address lists (`--prefill`, `--decode`, `--colocated`) and/or
from DNS names resolved periodically (`--prefill-dns`, ...: a Kubernetes headless Service
as NAME:PORT, every A/AAAA record one worker).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import ConfigError
from shared.flags import ORCHESTRATOR, Flag, add_flags
from shared.serving.flags import METRICS_PORTS, PORTS, SERVED_ORCHESTRATOR_FLAGS, SERVER_FLAGS
from shared.serving.worker_config import tls_from_args
from shared.weights.flags import MODEL

if TYPE_CHECKING:
    from shared.transport.types import TlsConfig, TransportConfig

DEFAULT_PORT = PORTS.values[ORCHESTRATOR]
DEFAULT_METRICS_PORT = METRICS_PORTS.values[ORCHESTRATOR]
PREFILL_ROUTING = ("prefix", "least-loaded")


def _addresses(text: str) -> tuple[str, ...]:
    out = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in out:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return out


@dataclasses.dataclass(slots=True, frozen=True)
class OrchestratorConfig:
    host: str
    port: int
    metrics_port: int  # 0: any free port; -1: no /metrics
    http_port: int  # the OpenAI-compatible HTTP API (TLS as --tls-*); 0: any free port; -1: off
    model: str  # for the tokenizer and the vocabulary; no weights are loaded
    served_model_name: str | None  # the HTTP API's model id (None: the --model value)
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    colocated: tuple[str, ...]  # each serves both roles
    prefill_dns: tuple[str, ...]
    decode_dns: tuple[str, ...]
    colocated_dns: tuple[str, ...]
    dns_refresh_s: float
    health_interval_s: float
    auth_token_file: Path | None
    max_queue: int  # admitted requests waiting for a decode slot
    max_concurrency: int  # requests past the queue at once (holding or seeking a slot)
    max_tokens_limit: int  # the most `max_tokens` one request may ask for
    lease_ttl_s: float
    prefill_retries: int  # other prefill workers tried after a failure
    decode_retries: int  # resumes on another decode worker after a failure
    drain_grace_s: float
    # Prefill routing (README: Prefix-aware routing).
    prefill_routing: str  # "prefix" or "least-loaded"
    prefix_affinity_max_queue: int  # affinity holds while the queue gap is at most this
    prefix_index_blocks: int  # block hashes remembered per prefill worker (LRU)
    # The public port: TLS, client certificates, and the limits a hostile client meets.
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None  # set: every client must present a certificate chaining to it
    max_request_kib: int  # largest GenerateRequest accepted (RESOURCE_EXHAUSTED past it)
    max_streams_per_connection: int  # concurrent Generate calls on one connection
    max_stop_strings: int
    max_stop_chars: int
    max_unsent_tokens: int  # tokens a stream may leave unsent before it is cancelled
    health_port: int  # plaintext grpc.health.v1 only (probes, with --tls-cert); -1: none
    keepalive_time_s: float
    keepalive_timeout_s: float
    max_connection_age_s: float
    max_connection_age_grace_s: float
    # Calls to workers: mTLS with the internal CA.
    internal_tls_cert: Path | None
    internal_tls_key: Path | None
    internal_tls_ca: Path | None
    internal_tls_server_name: str | None

    def __post_init__(self) -> None:
        if not (self.prefill or self.prefill_dns or self.colocated or self.colocated_dns):
            raise ConfigError("no prefill workers: give --prefill, --prefill-dns or --colocated")
        if not (self.decode or self.decode_dns or self.colocated or self.colocated_dns):
            raise ConfigError("no decode workers: give --decode, --decode-dns or --colocated")
        positive = (
            "max_queue",
            "max_concurrency",
            "max_tokens_limit",
            "max_request_kib",
            "max_streams_per_connection",
            "max_stop_strings",
            "max_stop_chars",
            "max_unsent_tokens",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        for name in ("dns_refresh_s", "health_interval_s", "lease_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if self.prefill_routing not in PREFILL_ROUTING:
            raise ConfigError(
                f"--prefill-routing={self.prefill_routing}: one of {', '.join(PREFILL_ROUTING)}"
            )
        if self.prefix_index_blocks <= 0:
            raise ConfigError(f"--prefix-index-blocks={self.prefix_index_blocks} must be > 0")
        if self.prefix_affinity_max_queue < 0:
            raise ConfigError(
                f"--prefix-affinity-max-queue={self.prefix_affinity_max_queue} must be >= 0"
            )
        if self.prefill_retries < 0 or self.decode_retries < 0:
            raise ConfigError("--prefill-retries and --decode-retries must be >= 0")
        if self.auth_token_file is not None and not self.auth_token_file.is_file():
            raise ConfigError(f"--auth-token-file {self.auth_token_file} does not exist")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (TLS first)")
        for flag in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, flag)
            if path is not None and not path.is_file():
                raise ConfigError(f"--{flag.replace('_', '-')} {path} does not exist")
        tls_from_args(
            self.internal_tls_cert,
            self.internal_tls_key,
            self.internal_tls_ca,
            flag="--internal-tls",
        )
        if self.internal_tls_server_name and self.internal_tls_cert is None:
            raise ConfigError("--internal-tls-server-name needs the --internal-tls-* files")

    @property
    def model_name(self) -> str:
        """The model id the HTTP API serves and expects in requests."""
        return self.served_model_name or self.model

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def health_address(self) -> str | None:
        return f"{self.host}:{self.health_port}" if self.health_port >= 0 else None

    def public_tls(self) -> TlsConfig | None:
        """TLS of the public ports, gRPC and HTTP alike (None: plaintext)."""
        from shared.transport.types import TlsConfig

        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsConfig(
            self.tls_cert,
            self.tls_key,
            self.tls_client_ca,
            require_client_cert=self.tls_client_ca is not None,
        )

    def public_transport(self) -> TransportConfig:
        """The public port's server settings (README: Reliability)."""
        from shared.transport.types import TransportConfig

        tls = self.public_tls()
        try:
            return TransportConfig(
                max_receive_bytes=self.max_request_kib * 1024,
                keepalive_time_s=self.keepalive_time_s,
                keepalive_timeout_s=self.keepalive_timeout_s,
                max_connection_age_s=self.max_connection_age_s,
                max_connection_age_grace_s=self.max_connection_age_grace_s,
                # The hard HTTP/2 cap sits above our own per-connection limit, so a client
                # past the limit gets RESOURCE_EXHAUSTED saying so, not a silent wait.
                max_concurrent_streams=2 * self.max_streams_per_connection,
                tls=tls,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def internal_transport(self) -> TransportConfig:
        """How this orchestrator calls workers (mTLS when the --internal-tls-* files are set)."""
        from shared.transport.types import TlsConfig, TransportConfig

        tls = None
        if self.internal_tls_cert and self.internal_tls_key and self.internal_tls_ca:
            tls = TlsConfig(
                self.internal_tls_cert,
                self.internal_tls_key,
                self.internal_tls_ca,
                server_name=self.internal_tls_server_name,
            )
        return TransportConfig(tls=tls)

    def auth_token(self) -> str | None:
        """The bearer token frontends must present (None: no check)."""
        if self.auth_token_file is None:
            return None
        token = self.auth_token_file.read_text().strip()
        if not token:
            raise ConfigError(f"--auth-token-file {self.auth_token_file} is empty")
        return token


ROUTING = "prefill routing"
PUBLIC = "the public port"
INTERNAL = "mTLS to the workers"
GROUPS = {
    ROUTING: "prefix (the default): each prefill goes to the worker most likely to hold the "
    "prompt's longest prefix in its prefix cache (in blocks of the prefill workers' page "
    "size, which their load reports carry), unless that worker's queue of our prefills "
    "exceeds the least-loaded one's by more than --prefix-affinity-max-queue; "
    "least-loaded: to the fewest prefills in flight",
    PUBLIC: "TLS, client authentication (a client certificate, the bearer token of "
    "--auth-token-file, or both) and the limits every caller meets, each refused with a "
    "status that says which limit. The TLS flags apply to --http-port too (HTTPS)",
    INTERNAL: "All three files or none: this orchestrator's client certificate, its key, and "
    "the internal CA the workers' certificates chain to (re-read when they change).",
}
_ADDRESSES = "HOST:PORT[,HOST:PORT...]"


def _flag(name: str, help: str, group: str | None = None, **kw: Any) -> Flag:
    """An orchestrator-only flag (`group`: its --help section)."""
    return Flag(name, help, roles=(ORCHESTRATOR,), group=group, **kw)


ORCHESTRATOR_FLAGS = (
    MODEL,
    *SERVER_FLAGS,
    *SERVED_ORCHESTRATOR_FLAGS,
    _flag("--served-model-name", "the model id of the HTTP API (default: the --model value)"),
    _flag("--prefill", "prefill workers", type=_addresses, default=(), metavar=_ADDRESSES),
    _flag("--decode", "decode workers", type=_addresses, default=(), metavar=_ADDRESSES),
    _flag("--colocated", "colocated workers", type=_addresses, default=(), metavar=_ADDRESSES),
    _flag("--prefill-dns", "NAME:PORT, resolved", type=_addresses, default=()),
    _flag("--decode-dns", "NAME:PORT, resolved", type=_addresses, default=()),
    _flag("--colocated-dns", "NAME:PORT, resolved", type=_addresses, default=()),
    _flag(
        "--dns-refresh-s",
        "resolve the names this often",
        type=float,
        default=10.0,
        chart="orchestrator.dnsRefreshS",
    ),
    _flag("--health-interval-s", "check each worker's health this often", type=float, default=2.0),
    _flag(
        "--max-queue",
        "admitted requests waiting for a decode slot",
        type=int,
        default=256,
        chart="orchestrator.maxQueue",
    ),
    _flag(
        "--max-concurrency",
        "requests past the queue at once",
        type=int,
        default=1024,
        chart="orchestrator.maxConcurrency",
    ),
    _flag(
        "--max-tokens-limit",
        "the most max_tokens one request may ask for",
        type=int,
        default=4096,
        chart="orchestrator.maxTokensLimit",
    ),
    _flag(
        "--lease-ttl-s",
        "a decode slot lease expires unless used this soon",
        type=float,
        default=30.0,
        chart="orchestrator.leaseTtlS",
    ),
    _flag("--prefill-retries", "other prefill workers tried after a failure", type=int, default=2),
    _flag(
        "--decode-retries", "resumes on another decode worker after a failure", type=int, default=2
    ),
    _flag(
        "--prefill-routing",
        "prefix or least-loaded (see above)",
        ROUTING,
        default="prefix",
        choices=PREFILL_ROUTING,
        chart="orchestrator.prefillRouting.policy",
    ),
    _flag(
        "--prefix-affinity-max-queue",
        "how many more prefills in flight than the least-loaded worker a worker may have and "
        "still win a prompt by its cached prefix",
        ROUTING,
        type=int,
        default=4,
        chart="orchestrator.prefillRouting.affinityMaxQueue",
    ),
    _flag(
        "--prefix-index-blocks",
        "block hashes remembered per prefill worker (least recently used dropped; about 150 "
        "bytes each)",
        ROUTING,
        type=int,
        default=65536,
        chart="orchestrator.prefillRouting.indexBlocks",
    ),
    _flag("--tls-cert", "serve TLS with this certificate chain", PUBLIC, type=Path),
    _flag("--tls-key", "and this private key", PUBLIC, type=Path),
    _flag("--tls-client-ca", "require client certificates chaining to this CA", PUBLIC, type=Path),
    _flag(
        "--max-request-kib",
        "largest request",
        PUBLIC,
        type=int,
        default=1024,
        chart="orchestrator.maxRequestKiB",
    ),
    _flag(
        "--max-streams-per-connection",
        "concurrent Generate calls on one connection",
        PUBLIC,
        type=int,
        default=64,
        chart="orchestrator.maxStreamsPerConnection",
    ),
    _flag(
        "--max-stop-strings",
        "stop strings per request",
        PUBLIC,
        type=int,
        default=16,
        chart="orchestrator.maxStopStrings",
    ),
    _flag(
        "--max-stop-chars",
        "per stop string",
        PUBLIC,
        type=int,
        default=256,
        chart="orchestrator.maxStopChars",
    ),
    _flag(
        "--max-unsent-tokens",
        "tokens a stream may have waiting for a client that does not read; past that the "
        "request is cancelled (its slot freed) and the call ends RESOURCE_EXHAUSTED",
        PUBLIC,
        type=int,
        default=1024,
        chart="orchestrator.maxUnsentTokens",
    ),
    _flag("--internal-tls-cert", "this orchestrator's client certificate", INTERNAL, type=Path),
    _flag("--internal-tls-key", "its private key", INTERNAL, type=Path),
    _flag("--internal-tls-ca", "the internal CA", INTERNAL, type=Path),
    _flag(
        "--internal-tls-server-name",
        "the name workers' certificates carry (see workers)",
        INTERNAL,
        chart="tls.internal.serverName",
    ),
)


def orchestrator_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve orchestrator", allow_abbrev=False)
    add_flags(p, ORCHESTRATOR_FLAGS, ORCHESTRATOR, GROUPS)
    return p


def parse_orchestrator_args(argv: Sequence[str]) -> OrchestratorConfig:
    args = orchestrator_parser().parse_args(list(argv))
    return OrchestratorConfig(**vars(args))
