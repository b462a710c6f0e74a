"""What every worker process does around its role: load, warm up, serve, drain.

1. Load the model (`--model`) and build the engine; any bad checkpoint fails here, before
   the server exists, so the process never reports healthy with bad weights.
2. Warm up: compile the decode step and insert shapes (decode roles) and the chunked
   prefill shapes (prefill roles, in their loop), so the first real request pays no
   compile.
3. Serve the role's gRPC services (+ health + reflection) and `/metrics`; print one
   "serving" line with the bound ports (tests and `pdserve serve` read it).
4. On SIGTERM/SIGINT: health goes NOT_SERVING, the role's `drain` stops new work and lets
   live work finish within `--drain-grace-s`, then the server stops and the process exits 0.
   If an engine thread dies, health goes NOT_SERVING at once and the death is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from shared.config import ConfigError, EngineConfig
from shared.engine.engine import DecodeState, Engine, Params
from shared.engine.mesh import Parallelism, make_mesh
from shared.kv.pages import SCRATCH_PAGE, pages_for
from shared.kv.prefix import Prefix
from shared.sampling_params import SamplingParams
from shared.serving.capacity import (
    device_memory,
    kv_bytes_per_token,
    plan_capacity,
    plan_pages,
)
from shared.serving.worker_config import Role, WorkerConfig, parse_worker_args
from shared.serving.worker_server import configure_logging, progress
from shared.weights.checkpoint import CheckpointError, LoadedModel, load_model

log = logging.getLogger("pdserve.worker")


@dataclasses.dataclass(slots=True)
class ModelRuntime:
    engine: Engine
    params: Params
    fingerprint: str  # architecture + weights identity: the KV wire format's model check
    tokenizer_path: Path | None


def enable_compilation_cache(directory: Path | None) -> None:
    """Turn on JAX's persistent compilation cache in `directory` (created if missing).

    Must run before the first compile: JAX opens the cache once, at the first compile that
    finds a directory configured. Executables are keyed by the program, the JAX/XLA
    version and the devices, so a stale entry is never used, only missed. Only compiles of
    a second or more are stored (JAX's `jax_persistent_cache_min_compile_time_secs`)."""
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--compilation-cache-dir {directory}: {err}") from None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    progress(f"compilation cache: {directory}")


def load_runtime(config: WorkerConfig) -> ModelRuntime:
    tp = config.tensor_parallel or len(jax.local_devices())
    mesh = make_mesh(tp)
    progress(
        f"{config.role.value}: loading model {config.model!r} over {tp} "
        f"{mesh.devices.flat[0].platform} device(s)"
    )
    start = time.perf_counter()
    loaded = load_model(
        config.model,
        engine_config=EngineConfig(dtype=config.dtype),
        quantize=config.quantization,
        seed=config.weights_seed,
        mesh=mesh,
    )
    engine_config = size_engine(config, loaded, mesh)
    engine = Engine(loaded.model_config, engine_config, mesh)
    progress(
        f"{config.role.value}: loaded in {time.perf_counter() - start:.1f}s; "
        f"{engine_config.max_slots} slots of up to {engine_config.max_seq_len} tokens, "
        f"{engine_config.total_pages - 1} KV pages of {engine_config.page_size}; "
        f"{engine.attention} attention"
    )
    return ModelRuntime(engine, loaded.params, model_fingerprint(loaded), loaded.tokenizer_path)


def params_bytes_per_device(params: Params) -> dict[jax.Device, int]:
    """Bytes of params each device holds (its shards; replicated params count fully)."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def size_engine(config: WorkerConfig, loaded: LoadedModel, mesh: Mesh) -> EngineConfig:
    """The engine layout: as flagged, or with `auto` slots / max_seq_len sized from the
    devices' memory (shared/serving/capacity.py). Logs the memory arithmetic."""
    model = loaded.model_config
    parallelism = Parallelism.of(model, mesh.size)
    per_token = kv_bytes_per_token(
        model, np.dtype(config.dtype).itemsize, parallelism.cache_heads // mesh.size
    )
    params = max(params_bytes_per_device(loaded.params).values())
    mib = 2**20
    progress(
        f"{config.role.value}: tensor parallel {mesh.size}: params {params / mib:.1f} MiB"
        f" per device; KV {per_token} bytes per token per device "
        f"({parallelism.cache_heads} cache heads, {parallelism.kv_replication}x "
        f"replication)"
    )
    if not config.auto_capacity:
        return config.engine_config()
    devices = list(mesh.devices.flat)
    memory = device_memory([d.memory_stats() for d in devices], devices[0].platform)
    budget = dict(
        device_bytes=memory,
        params_bytes=params,
        bytes_per_token=per_token,
        fraction=config.kv_memory_fraction,
        headroom_bytes=config.memory_headroom_bytes,
    )
    slots, max_seq_len = config.slots, config.max_seq_len
    if slots is None or max_seq_len is None:
        plan = plan_capacity(
            **budget,
            slots=slots,
            max_seq_len=max_seq_len,
            context_limit=model.max_position_embeddings,
            min_seq_len=config.prefill_buckets[-1],
        )
        progress(f"{config.role.value}: {plan.describe()}")
        slots, max_seq_len = plan.slots, plan.max_seq_len
    kv_pages = config.kv_pages
    if kv_pages is None:
        kv_pages = plan_pages(**budget, page_size=config.page_size)
        progress(
            f"{config.role.value}: KV pool of {kv_pages} pages x {config.page_size} "
            f"positions ({kv_pages * config.page_size * per_token / mib:.1f} MiB per "
            "device)"
        )
    return config.engine_config(slots, max_seq_len, kv_pages)


def model_fingerprint(loaded: LoadedModel) -> str:
    """Architecture + weights identity: what the KV wire format's model check compares."""
    return f"{loaded.model_config.fingerprint()}-{loaded.weights_id}"


def warm_up(runtime: ModelRuntime, *, hold: bool = False) -> dict[str, float]:
    """Compile what a decode worker runs: bulk_insert for every power-of-two batch and
    insert length, the decode step for every batch bucket, release. Everything is written
    to the scratch page, so no page is taken. (Prefill compiles its chunk shapes in the
    prefill loop: prefill_server/loop.py's `compile_prefill_loop`.)

    `hold` (`--warm-up largest`): compile only the largest batch bucket now, and hold the
    others (the engine steps over them to the next larger bucket) for
    `compile_held_buckets` to compile while the worker serves. Every request is served
    from the start; a small batch just runs in a larger bucket until its own is ready.
    Each batch bucket of SmolLM2 takes ~15-35 s to compile here, so this is most of a
    first start (bench/compile_bench.py).

    Returns the seconds each part took (also printed): startup is mostly compiling, and
    operators (and bench/compile_bench.py) need to see which part."""
    engine, params = runtime.engine, runtime.params
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    buckets = engine.batch_buckets
    if hold:
        engine.hold_buckets(buckets[:-1])
        buckets = buckets[-1:]
    progress(f"compiling inserts and the decode step for batches {buckets}")
    t = time.perf_counter()
    state = _compile_inserts(engine)
    seconds["inserts"] = time.perf_counter() - t
    progress(f"compiled inserts in {seconds['inserts']:.1f}s")
    for bucket in buckets:
        t = time.perf_counter()
        state, tokens, _ = engine.generate(params, state, np.arange(bucket, dtype=np.int32))
        jax.block_until_ready(tokens)
        seconds[f"generate[{bucket}]"] = time.perf_counter() - t
        progress(f"compiled generate[{bucket}] in {seconds[f'generate[{bucket}]']:.1f}s")
    jax.block_until_ready(engine.release(state, 0))
    seconds["total"] = time.perf_counter() - start
    held = engine.held_buckets
    later = f"; compiling generate{list(held)} while serving" if held else ""
    progress(f"compiled in {seconds['total']:.1f}s{later}")
    return seconds


def _compile_inserts(engine: Engine) -> DecodeState:
    """Run bulk_insert at every (power of two, insert length) on scratch pages."""
    state = engine.init_decode_state()
    lengths = (*engine.config.prefill_buckets, engine.config.max_seq_len - 1)
    count = 1
    while count <= engine.config.max_slots:
        for length in lengths:
            fake = _zero_prefix(engine, length)
            scratch = [SCRATCH_PAGE] * pages_for(length + 1, engine.config.page_size)
            state = engine.bulk_insert(
                [fake] * count, state, np.arange(count, dtype=np.int32), [scratch] * count
            )
        count *= 2
    return jax.block_until_ready(state)


def compile_held_buckets(
    runtime: ModelRuntime,
    on_done: Callable[[dict[str, float]], None] | None = None,
    stop: threading.Event | None = None,
) -> threading.Thread | None:
    """Compile the batch buckets `warm_up(hold=True)` held, smallest first (the ones a
    lightly loaded worker uses), in a daemon thread; each is used as soon as it is
    compiled. `on_done` gets the seconds per bucket and in all; once `stop` is set, no
    further bucket is started. None if nothing is held."""
    engine, params = runtime.engine, runtime.params
    held = engine.held_buckets
    if not held:
        return None

    def run() -> None:
        start, seconds = time.perf_counter(), {}
        for bucket in held:
            if stop is not None and stop.is_set():
                return
            t = time.perf_counter()
            try:
                engine.compile_generate(params, bucket)
            except Exception:  # the larger buckets still serve: log, go on
                log.exception("compiling generate[%d] failed; it stays unused", bucket)
                continue
            seconds[f"generate[{bucket}]"] = time.perf_counter() - t
            progress(
                f"compiled generate[{bucket}] in {seconds[f'generate[{bucket}]']:.1f}s "
                "(while serving)"
            )
        seconds["total"] = time.perf_counter() - start
        progress(f"every bucket compiled, {seconds['total']:.1f}s after serving began")
        if on_done is not None:
            on_done(seconds)

    thread = threading.Thread(target=run, name="pdserve-compile", daemon=True)
    thread.start()
    return thread


def _zero_prefix(engine: Engine, length: int) -> Prefix:
    cache = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), engine.abstract_prefix_cache(length))
    return Prefix(cache, length, 0, SamplingParams())


def run_worker(
    argv: Sequence[str],
    role: Role,
    serve: Callable[[WorkerConfig, ModelRuntime], Awaitable[int]],
) -> int:
    """A worker's `main`: flags, model, warm-up, then `serve` until it drains.
    Bad flags or weights exit 2 with the reason, before anything reports healthy.
    A role that decodes has its decode programs compiled here; a role that prefills has
    its chunk shapes compiled by its loop, in `serve` (it knows its chunk and rows)."""
    configure_logging()
    try:
        config = parse_worker_args(argv, role)
        enable_compilation_cache(config.compilation_cache_dir)
        runtime = load_runtime(config)
    except (ConfigError, CheckpointError) as err:
        print(f"pdserve {role.value}: error: {err}", file=sys.stderr)
        return 2
    # Prefill roles compile their chunked-prefill shapes in `serve` (compile_prefill_loop).
    if role is not Role.PREFILL:
        warm_up(runtime, hold=config.warm_up == "largest")
    stop_compiling = threading.Event()
    compiling = compile_held_buckets(runtime, stop=stop_compiling)
    try:
        return asyncio.run(serve(config, runtime))
    finally:
        # An XLA compile still running in the daemon thread while the interpreter tears
        # down can crash the process after a clean drain (a decode worker exited SIGSEGV
        # right after "stopped" in a test): start no more, let the one in flight finish.
        stop_compiling.set()
        if compiling is not None:
            compiling.join()
