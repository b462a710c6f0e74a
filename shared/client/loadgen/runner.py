"""How the load generator sends: open-loop Poisson arrivals or a closed loop of N users.

1. The run starts its clock (t=0) and opens one gRPC channel to the orchestrator; every
   request is a stream on it (HTTP/2 multiplexes them, so no per-request connect cost).
   With `--api openai` it opens an HTTP connection pool to the OpenAI-compatible API
   instead (shared/client/loadgen/openai_client.py): the same workload, the other door.
2. Open loop: request i is sent at its Poisson offset whether or not earlier ones have
   finished (the arrival process ignores the server, so queueing shows up as latency, not
   as a lower send rate). Closed loop: N coroutines each send, wait for the end, send again.
3. Each request records when it was sent, when each output token arrived (a chunk's
   tokens all get the chunk's arrival time), when it ended and how: a gRPC status code or
   an abnormal finish reason is its error.
4. The run stops sending at `num_requests` or `duration_s`, whichever comes first, and
   waits for everything in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator

from shared.client.generator import AsyncGeneratorClient, GenerateError
from shared.client.loadgen.openai_client import AsyncOpenAIClient
from shared.client.loadgen.workload import RequestSpec, WorkloadError, poisson_offsets

# Finish reasons of a request that ended as asked; any other one is an error.
GOOD_FINISHES = ("length", "stop")


@dataclasses.dataclass(slots=True, frozen=True)
class RunConfig:
    target: str
    rate: float | None = None  # open loop: Poisson arrivals per second
    concurrency: int | None = None  # closed loop: requests in flight
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0
    ignore_eos: bool = True  # so every request generates exactly its output_len
    request_timeout_s: float | None = None
    token: str | None = None
    api: str = "grpc"  # "grpc": the Generate API at `target`; "openai": HTTP at `target`

    def __post_init__(self) -> None:
        if self.api not in ("grpc", "openai"):
            raise WorkloadError(f"--api {self.api!r}: choose 'grpc' or 'openai'")
        if (self.rate is None) == (self.concurrency is None):
            raise WorkloadError("give exactly one of --rate (open loop) or --concurrency")
        if self.concurrency is not None and self.concurrency < 1:
            raise WorkloadError(f"--concurrency={self.concurrency} must be >= 1")
        if self.num_requests is None and self.duration_s is None:
            raise WorkloadError("give --num-requests and/or --duration-s")
        if self.num_requests is not None and self.num_requests < 1:
            raise WorkloadError(f"--num-requests={self.num_requests} must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise WorkloadError(f"--duration-s={self.duration_s} must be > 0")


@dataclasses.dataclass(slots=True)
class RequestRecord:
    """One request; times are seconds from the run's start."""

    index: int
    start_s: float
    prompt_len: int  # as the server counted it (usage), else as sent
    output_len: int  # as asked
    token_times_s: list[float] = dataclasses.field(default_factory=list)
    end_s: float = 0.0
    error: str | None = None  # a gRPC status name or FINISH_<REASON>
    error_message: str = ""
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.start_s if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        n = len(self.token_times_s)
        return (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1) if n > 1 else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s


@dataclasses.dataclass(slots=True, frozen=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # from t=0 to the end of the last request
    started_unix_s: float


async def run(
    config: RunConfig,
    workload: Iterator[RequestSpec],
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Drive the load described by `config`; return every request's record."""
    records: list[RequestRecord] = []
    started_unix = time.time()
    t0 = time.perf_counter()
    client_class = AsyncOpenAIClient if config.api == "openai" else AsyncGeneratorClient
    target = config.target
    if config.api == "openai" and not target.startswith(("http://", "https://")):
        target = f"http://{target}"
    async with client_class(target, config.token) as client:

        async def one(index: int, spec: RequestSpec) -> None:
            record = await _send(client, config, spec, index, t0)
            records.append(record)
            if on_done is not None:
                on_done(record)

        if config.rate is not None:
            await _open_loop(config, workload, one, t0)
        else:
            await _closed_loop(config, workload, one, t0)
    records.sort(key=lambda r: r.index)
    duration = max((r.end_s for r in records), default=0.0)
    return RunResult(records, duration, started_unix)


def _more(config: RunConfig, sent: int, elapsed: float) -> bool:
    if config.num_requests is not None and sent >= config.num_requests:
        return False
    return config.duration_s is None or elapsed < config.duration_s


async def _open_loop(config, workload, one, t0: float) -> None:
    tasks: list[asyncio.Task] = []
    for index, offset in enumerate(poisson_offsets(config.rate, config.seed)):
        if not _more(config, index, offset):
            break
        spec = next(workload)
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(index, spec)))
    await asyncio.gather(*tasks)


async def _closed_loop(config, workload, one, t0: float) -> None:
    counter = iter(range(1 << 62))  # shared by the users; the event loop is single-threaded

    async def user() -> None:
        while True:
            index = next(counter)
            if not _more(config, index, time.perf_counter() - t0):
                return
            await one(index, next(workload))

    await asyncio.gather(*(user() for _ in range(config.concurrency)))


async def _send(
    client: AsyncGeneratorClient | AsyncOpenAIClient,
    config: RunConfig,
    spec: RequestSpec,
    index: int,
    t0: float,
) -> RequestRecord:
    prompt_len = len(spec.prompt) if isinstance(spec.prompt, tuple) else 0
    record = RequestRecord(index, time.perf_counter() - t0, prompt_len, spec.output_len)
    try:
        stream = client.generate(
            spec.prompt,
            max_tokens=spec.output_len,
            ignore_eos=config.ignore_eos,
            timeout=config.request_timeout_s,
        )
        async for chunk in stream:
            now = time.perf_counter() - t0
            record.token_times_s.extend([now] * len(chunk.token_ids))
            if chunk.prompt_tokens:
                record.prompt_len = chunk.prompt_tokens
            if chunk.finish_reason:
                record.finish_reason = chunk.finish_reason
        if record.finish_reason not in GOOD_FINISHES:
            record.error = f"FINISH_{(record.finish_reason or 'none').upper()}"
    except GenerateError as err:
        record.error, record.error_message = err.code, err.message
    except Exception as err:  # a load generator reports every failure, it never stops
        record.error, record.error_message = type(err).__name__, str(err)
    record.end_s = time.perf_counter() - t0
    return record
