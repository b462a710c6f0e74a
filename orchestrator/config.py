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
from typing import TYPE_CHECKING

from shared.config import ConfigError
from shared.serving.worker_config import add_connection_arguments, tls_from_args

if TYPE_CHECKING:
    from shared.transport.types import TlsConfig, TransportConfig

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9160
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
    prefix_block_tokens: int  # tokens per hashed block: the prefill workers' --page-size
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
        for name in ("prefix_block_tokens", "prefix_index_blocks"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
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


def orchestrator_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve orchestrator", allow_abbrev=False)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="public gRPC port")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    p.add_argument(
        "--http-port",
        type=int,
        default=-1,
        help="OpenAI-compatible HTTP API port (0: any free port; -1: off, the default)",
    )
    p.add_argument("--model", default="tiny", help="model spec (tokenizer and vocabulary)")
    p.add_argument(
        "--served-model-name", help="the model id of the HTTP API (default: the --model value)"
    )
    p.add_argument("--prefill", type=_addresses, default=(), help="HOST:PORT[,HOST:PORT...]")
    p.add_argument("--decode", type=_addresses, default=())
    p.add_argument("--colocated", type=_addresses, default=())
    p.add_argument("--prefill-dns", type=_addresses, default=(), help="NAME:PORT, resolved")
    p.add_argument("--decode-dns", type=_addresses, default=())
    p.add_argument("--colocated-dns", type=_addresses, default=())
    p.add_argument("--dns-refresh-s", type=float, default=10.0)
    p.add_argument("--health-interval-s", type=float, default=2.0)
    p.add_argument("--auth-token-file", type=Path)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=1024)
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    p.add_argument("--lease-ttl-s", type=float, default=30.0)
    p.add_argument("--prefill-retries", type=int, default=2)
    p.add_argument("--decode-retries", type=int, default=2)
    p.add_argument("--drain-grace-s", type=float, default=30.0)
    routing = p.add_argument_group(
        "prefill routing",
        "prefix (the default): each prefill goes to the worker most likely to hold the "
        "prompt's longest prefix in its prefix cache, unless that worker's queue of our "
        "prefills exceeds the least-loaded one's by more than --prefix-affinity-max-queue; "
        "least-loaded: to the fewest prefills in flight",
    )
    routing.add_argument("--prefill-routing", choices=PREFILL_ROUTING, default="prefix")
    routing.add_argument(
        "--prefix-block-tokens",
        type=int,
        default=16,
        help="tokens per cached block; set it to the prefill workers' --page-size",
    )
    routing.add_argument(
        "--prefix-affinity-max-queue",
        type=int,
        default=4,
        help="how many more prefills in flight than the least-loaded worker a worker may "
        "have and still win a prompt by its cached prefix",
    )
    routing.add_argument(
        "--prefix-index-blocks",
        type=int,
        default=65536,
        help="block hashes remembered per prefill worker (least recently used dropped; "
        "about 150 bytes each)",
    )
    public = p.add_argument_group(
        "the public port",
        "TLS, client authentication (a client certificate, the bearer token of "
        "--auth-token-file, or both) and the limits every caller meets, each refused with "
        "a status that says which limit. The TLS flags apply to --http-port too (HTTPS)",
    )
    public.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain")
    public.add_argument("--tls-key", type=Path, help="and this private key")
    public.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates chaining to this CA"
    )
    public.add_argument("--max-request-kib", type=int, default=1024, help="largest request")
    public.add_argument("--max-streams-per-connection", type=int, default=64)
    public.add_argument("--max-stop-strings", type=int, default=16)
    public.add_argument("--max-stop-chars", type=int, default=256, help="per stop string")
    public.add_argument(
        "--max-unsent-tokens",
        type=int,
        default=1024,
        help="tokens a stream may have waiting for a client that does not read; past that "
        "the request is cancelled (its slot freed) and the call ends RESOURCE_EXHAUSTED",
    )
    add_connection_arguments(public)
    internal = p.add_argument_group(
        "mTLS to the workers",
        "All three files or none: this orchestrator's client certificate, its key, and the "
        "internal CA the workers' certificates chain to (re-read when they change).",
    )
    internal.add_argument("--internal-tls-cert", type=Path)
    internal.add_argument("--internal-tls-key", type=Path)
    internal.add_argument("--internal-tls-ca", type=Path)
    internal.add_argument(
        "--internal-tls-server-name", help="the name workers' certificates carry (see workers)"
    )
    return p


def parse_orchestrator_args(argv: Sequence[str]) -> OrchestratorConfig:
    args = orchestrator_parser().parse_args(list(argv))
    return OrchestratorConfig(**vars(args))
