"""`pdserve worker --role colocated`: prefill and decode in one process, one engine.

The baseline for every disaggregation benchmark. It serves both internal services, so the
orchestrator drives it exactly like a prefill + decode pair (it names this worker as the
decode target), but a prefix goes from the prefill output straight into the decode loop's
insert queue: no encoding, no checksums, no copy to host memory.

With `--colocated-prefill mixed`, one engine thread runs both phases: the decode loop
runs the prefill loop's calls (`DecodeLoop.host_prefill`), each mixed into a decode step
while any slot decodes (one forward, one read of the weights: shared/engine/mixed.py),
the decode rows first and whole prefill chunks filling the rest of `--batch-tokens`. No
prefill call stalls the decoding requests, and no two threads fight over the device. The
mixed programs compile in the background after the worker starts serving; until one is
compiled, its decode step and its chunk call run one after the other.

`--colocated-prefill thread` instead gives the prefill loop its engine thread back: the
two threads share the device. On a TPU that only queues one program behind the other; on
a CPU, whose cores a decode step leaves partly idle, the prefill fills them
(bench/README.md, "Closed loop"), so that is what `auto`, the default, picks there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from decode_server.scheduler import chunk_rows_beside
from decode_server.service import DecodeService
from decode_server.worker import build_decode_worker
from prefill_server.loop import PrefillLoop, compile_prefill_loop
from prefill_server.service import PrefillService
from shared.engine.chunked_prefill import ChunkedPrefill
from shared.engine.engine import Engine
from shared.kv.prefix import Prefix
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime, run_worker
from shared.serving.worker_config import Role, WorkerConfig
from shared.serving.worker_server import WorkerServer, progress, wait_until
from shared.transport.server import decode_service, prefill_service
from shared.transport.types import PrefillRequest

log = logging.getLogger(__name__)


class LocalKvSink:
    """`KvSink` into this process's own decode loop; `decode_target` is not dialled."""

    def __init__(self, decode: DecodeService) -> None:
        self._decode = decode

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        self._decode.accept_local_prefix(request.lease_id, prefix)
        return 0  # nothing crossed a wire


async def serve(config: WorkerConfig, runtime: ModelRuntime) -> int:
    registry = CollectorRegistry()
    server = WorkerServer(config, registry)
    metrics = WorkerMetrics(registry, "colocated")
    decode = build_decode_worker(runtime, config, metrics, server.fatal)
    prefill_loop = PrefillLoop(
        runtime.engine,
        runtime.params,
        LocalKvSink(decode.service),
        metrics,
        max_queue=config.max_queue,
        on_fatal=server.fatal,
        settings=config.prefill,
        fingerprint=runtime.fingerprint,
    )
    prefill = PrefillService(prefill_loop, runtime.fingerprint, config.max_queue)
    await asyncio.to_thread(compile_prefill_loop, prefill_loop)
    stop_compiling = threading.Event()
    compiling: threading.Thread | None = None
    if prefill_mode(config.prefill.colocated, runtime.engine) == "thread":
        decode.start(asyncio.get_running_loop())
        prefill_loop.start(asyncio.get_running_loop())
    else:
        decode.loop.host_prefill(prefill_loop, config.prefill.batch_tokens)
        prefill_loop.host(asyncio.get_running_loop(), decode.loop.wake)
        decode.start(asyncio.get_running_loop())
        shapes = mixed_shapes(runtime.engine, prefill_loop.device, decode.loop.batch_tokens)
        progress(f"compiling {len(shapes)} mixed batch shapes while serving")
        compiling = threading.Thread(
            target=compile_mixed,
            args=(runtime, prefill_loop, shapes, stop_compiling),
            name="pdserve-compile-mixed",
            daemon=True,
        )
        compiling.start()

    async def drain(grace_s: float) -> None:
        prefill.draining = True
        stop_compiling.set()
        await wait_until(lambda: prefill_loop.live_requests == 0, grace_s)
        prefill_loop.stop()
        await decode.drain(grace_s)

    services = [prefill_service(prefill), decode_service(decode.service)]
    try:
        return await server.serve(services, drain)
    finally:
        stop_compiling.set()
        if compiling is not None:
            await asyncio.to_thread(compiling.join)


def prefill_mode(flag: str, engine: Engine) -> str:
    """`--colocated-prefill`: 'auto' is 'thread' on CPU, where a decode step leaves cores
    idle that a second engine thread's prefill fills (a mixed call costs what the two
    programs cost one after the other there: bench/README.md), and 'mixed' on an
    accelerator, which runs one program at a time anyway."""
    if flag != "auto":
        return flag
    return "thread" if engine.mesh.devices.flat[0].platform == "cpu" else "mixed"


def mixed_shapes(
    engine: Engine, device: ChunkedPrefill, batch_tokens: int
) -> list[tuple[int, int]]:
    """Every (decode batch bucket, chunk rows) a mixed call of this worker can take,
    largest decode bucket first (the busiest moments come first under load)."""
    shapes, smaller = [], 0
    for bucket in engine.batch_buckets:
        # The most chunk rows beside a bucket: beside its fewest live rows.
        most = chunk_rows_beside(batch_tokens, smaller + 1, device.chunk, device.max_rows)
        shapes += [(bucket, rows) for rows in device.row_buckets if rows <= most]
        smaller = bucket
    return sorted(shapes, reverse=True)


def compile_mixed(
    runtime: ModelRuntime,
    prefill: PrefillLoop,
    shapes: Sequence[tuple[int, int]],
    stop: threading.Event,
) -> None:
    """Compile these mixed call shapes (`mixed_shapes`; a daemon thread, while serving);
    each is used as soon as it is compiled. Starts no new one once `stop` is set."""
    engine, device = runtime.engine, prefill.device
    start = time.perf_counter()
    for bucket, rows in shapes:
        if stop.is_set():
            return
        t = time.perf_counter()
        try:
            engine.mixed.compile(runtime.params, bucket, device.pack([], False, rows), device.pool)
        except Exception:  # the two programs still serve it, one after the other
            log.exception("compiling mixed[%d+%d] failed; it stays unused", bucket, rows)
            continue
        seconds = time.perf_counter() - t
        progress(f"compiled mixed[{bucket}+{rows}x{device.chunk}] in {seconds:.1f}s")
    progress(f"every mixed batch compiled, {time.perf_counter() - start:.1f}s after serving began")


def main(argv: Sequence[str]) -> int:
    return run_worker(argv, Role.COLOCATED, serve)
