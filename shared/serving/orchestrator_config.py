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

from shared.config import ConfigError

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9160


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
    http_port: int  # the OpenAI-compatible HTTP API; 0: any free port; -1: off
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

    def __post_init__(self) -> None:
        if not (self.prefill or self.prefill_dns or self.colocated or self.colocated_dns):
            raise ConfigError("no prefill workers: give --prefill, --prefill-dns or --colocated")
        if not (self.decode or self.decode_dns or self.colocated or self.colocated_dns):
            raise ConfigError("no decode workers: give --decode, --decode-dns or --colocated")
        for name in ("max_queue", "max_concurrency", "max_tokens_limit"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        for name in ("dns_refresh_s", "health_interval_s", "lease_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if self.prefill_retries < 0 or self.decode_retries < 0:
            raise ConfigError("--prefill-retries and --decode-retries must be >= 0")
        if self.auth_token_file is not None and not self.auth_token_file.is_file():
            raise ConfigError(f"--auth-token-file {self.auth_token_file} does not exist")

    @property
    def model_name(self) -> str:
        """The model id the HTTP API serves and expects in requests."""
        return self.served_model_name or self.model

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

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
    return p


def parse_orchestrator_args(argv: Sequence[str]) -> OrchestratorConfig:
    args = orchestrator_parser().parse_args(list(argv))
    return OrchestratorConfig(**vars(args))
