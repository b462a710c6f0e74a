"""What bench/soak.py and bench/chaos.py share: the cluster they inject faults into, a
load of streams checked one by one, and the single-engine references.

1. `fault_cluster` starts workers and an orchestrator (shared/cluster/faults.py: fixed
   loopback ports, so a worker killed and started again comes back at its address),
   optionally with mTLS between all of them and TLS on the public port (certificates made
   for the run). Every process dies with this one.
2. `run_stream` runs one stream through the public API: its outcome (tokens, finish, or
   the status it ended with) and client-side TTFT/TPOT.
3. The end-of-run accounting is shared/cluster/accounting.py's (`leaks`, `held`).

Loopback only: every address here is 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from shared.cluster.cluster import ClusterSpec
from shared.cluster.faults import FaultCluster, TlsSetup


@dataclasses.dataclass
class Run:
    """A started fault cluster and the certificates of its run (None: plaintext)."""

    cluster: FaultCluster
    tls: TlsSetup | None
    internal_tls: bool

    def client_tls(self):  # -> ClientTls | None, for the public port
        return self.tls.client() if self.tls else None

    def worker_transport(self):  # -> TransportConfig | None, for calls to the workers
        return self.tls.transport() if self.tls and self.internal_tls else None


@contextlib.contextmanager
def fault_cluster(
    prefill: int,
    decode: int,
    worker_flags: Sequence[str],
    orchestrator_flags: Sequence[str] = (),
    *,
    tls: str = "none",
    startup_timeout_s: float = 600.0,
) -> Iterator[Run]:
    """`prefill` + `decode` workers and an orchestrator on fixed loopback ports, all in
    the CPU platform. `tls`: "all" (mTLS between every process, TLS on the public port),
    "public" (the public port only) or "none". Stopped (killed) on leaving."""
    assert tls in ("all", "public", "none"), tls
    with tempfile.TemporaryDirectory(prefix="pdserve-reliability-") as directory:
        setup = TlsSetup.make(Path(directory)) if tls != "none" else None
        internal = tls == "all"
        tls_workers = setup.worker_flags() if setup and internal else []
        tls_orchestrator = setup.orchestrator_flags(internal) if setup else []
        spec = ClusterSpec(
            prefill=prefill,
            decode=decode,
            worker_flags=(*worker_flags, *tls_workers),
            orchestrator_flags=(
                "--health-interval-s",
                "0.5",
                *orchestrator_flags,
                *tls_orchestrator,
            ),
            env={"JAX_PLATFORMS": "cpu"},
            fixed_ports=True,
            startup_timeout_s=startup_timeout_s,
        )
        cluster = FaultCluster.start(spec)
        try:
            yield Run(cluster, setup, internal)
        finally:
            cluster.stop()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# The load -------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One request, as its client saw it."""

    index: int
    prompt: tuple[int, ...]
    max_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    code: str | None = None  # the status it failed with
    message: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    intent: str = "complete"  # complete | cancel | deadline
    started: float = 0.0
    ended: float = 0.0


async def run_stream(
    client,
    outcome: Outcome,
    *,
    cancel_after: int | None = None,
    timeout_s: float | None = None,
    **options,
) -> Outcome:
    """One request through `client` (an AsyncGeneratorClient); never raises."""
    from shared.client.generator import GenerateError

    start = outcome.started = time.perf_counter()
    times: list[float] = []
    stream = client.generate(
        list(outcome.prompt), max_tokens=outcome.max_tokens, timeout=timeout_s, **options
    )
    try:
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.token_ids:
                    times.extend([time.perf_counter()] * len(chunk.token_ids))
                    outcome.tokens.extend(chunk.token_ids)
                if chunk.finish_reason:
                    outcome.finish = chunk.finish_reason
                if cancel_after is not None and len(outcome.tokens) >= cancel_after:
                    outcome.finish = "client_cancelled"
                    break
    except GenerateError as err:
        outcome.code, outcome.message = err.code, err.message
    outcome.ended = time.perf_counter()
    if times:
        outcome.ttft_s = times[0] - start
    if len(times) > 1:
        outcome.tpot_s = (times[-1] - times[0]) / (len(times) - 1)
    return outcome


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def client_pool(target: str, connections: int, tls=None) -> list:
    """`connections` clients, each on its own HTTP/2 connection (a local subchannel pool:
    by default gRPC shares one connection between channels to the same target), as many
    frontends would; the public port limits streams per connection."""
    from shared.client.generator import AsyncGeneratorClient

    options = [("grpc.use_local_subchannel_pool", 1)]
    return [AsyncGeneratorClient(target, None, tls, options) for _ in range(connections)]


def greedy_references(
    prompts: Sequence[tuple[int, ...]], max_tokens: int, worker_flags: Sequence[str]
) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy continuation from one engine in this process (the tiny preset
    with seed 0, the workers' engine shape: buckets, max_seq_len, page size): the
    single-engine reference the cluster's output must equal token for token."""
    from shared.config import ModelConfig
    from shared.engine.engine import Engine
    from shared.serving.worker_config import Role, parse_worker_args

    config = parse_worker_args(["--port", "0", *worker_flags], Role.DECODE)
    # One slot, a pool for it at max_seq_len (0: every slot full); the workers' pool size
    # is sized from their memory and does not change what a request generates.
    shape = config.engine_config(1, config.max_seq_len, 0)
    engine = Engine(ModelConfig.tiny(), shape)
    return engine_references(engine, engine.init_params(seed=0), prompts, max_tokens)


def engine_references(engine, params, prompts: Sequence[tuple[int, ...]], max_tokens: int):
    """`greedy_references` with an engine already built (and compiled): prefill, insert
    into slot 0 of a DecodeBatch, step."""
    from decode_server.scheduler import DecodeBatch

    out = {}
    for prompt in dict.fromkeys(prompts):
        prefix = engine.prefill(params, list(prompt))
        batch = DecodeBatch(engine)
        batch.insert([prefix], [0])
        tokens = [prefix.first_token]
        while len(tokens) < max_tokens:
            tokens.append(batch.step(params)[0][0])
        out[prompt] = tokens
    return out
