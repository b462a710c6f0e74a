"""Engine benchmark: prefill latency per prompt length (the chunked prefill program),
decode step latency against its floor.

    python bench/engine_bench.py --out FILE.json [--configs tiny,small,smollm2] [--batches 8,32]
        [--contexts 128,512,1024]

`tiny` and `small` are presets with seeded weights; `smollm2` is the real SmolLM2-135M
(the packaged GGUF, float32), prefilled at 128 and 512 only, with its load time and peak
RSS (float32 and int8, each load in a fresh process); `smollm2:int8-blocks` (any
`--quantize` value after the colon) is the same model served quantized.

The decode floor counts only the bytes a step must read: every parameter once, and the KV
of the live positions of every live request (batch x context x KV bytes per token), at a
read bandwidth measured in this same run. It does not count the rest of the cache's
capacity (max_seq_len 4096 here, the page pool): a paged step has no reason to read it.
Ratios, not absolute times, are what to compare across runs: this machine is shared and
noisy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from decode_server.scheduler import DecodeBatch
from shared.config import MODEL_PRESETS, EngineConfig, model_preset
from shared.engine.engine import Engine, Params
from shared.kv.prefix import Prefix
from shared.sampling_params import SamplingParams

MAX_SEQ_LEN = 4096  # the capacity a request may grow to; the live contexts are far shorter
PREFILL_MAX_SEQ_LEN = 1024
PREFILL_BUCKETS = (64, 128, 256, 512)
PAGE_SIZE = 16
# A real model's buckets cost ~a minute of compiling each on a 2-core CPU: the two that
# bracket chat prompts and documents.
REAL_MODEL_BUCKETS = {"smollm2": (128, 512)}


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def read_bandwidth_gbps(mib: int = 1024) -> float:
    """Bytes/s XLA reads from memory: a jitted reduction over a buffer far beyond cache."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = timed(lambda: total(x).block_until_ready(), repeats=7)
    return x.nbytes / seconds / 1e9


def param_bytes(params: object) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


@functools.lru_cache(maxsize=1)
def _real_model(name: str) -> tuple[object, Params]:
    """`smollm2` (float32) or `smollm2:int8-blocks` (any `--quantize` value after the colon)."""
    from shared.weights.checkpoint import load_model

    model, _, quantize = name.partition(":")
    engine_config = EngineConfig(1, (64,), PREFILL_MAX_SEQ_LEN)
    loaded = load_model(model, engine_config=engine_config, quantize=quantize or None)
    return loaded.model_config, loaded.params


def engine_and_params(config_name: str, engine_config: EngineConfig) -> tuple[Engine, Params]:
    """A preset's seeded weights, or a real model's (loaded once per process)."""
    if config_name in MODEL_PRESETS:
        engine = Engine(model_preset(config_name), engine_config)
        return engine, engine.init_params(seed=0)
    model_config, params = _real_model(config_name)
    return Engine(model_config, engine_config), params


def synthetic_prefix(engine: Engine, length: int, seed: int) -> Prefix:
    """A prefix of `length` positions with random KV: a step's cost does not depend on the
    values, and a prefill of 1024 tokens per slot would only slow the benchmark down."""
    rng = np.random.default_rng(seed)
    cache = jax.tree.map(
        lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype),
        engine.abstract_prefix_cache(length),
    )
    return Prefix(cache, length, 1, SamplingParams())


def bench_decode(
    config_name: str, batch: int, contexts: list[int], bandwidth_gbps: float, steps: int
) -> list[dict]:
    """Decode steps of `batch` live requests at each live context length (one engine: the
    pool holds the longest context plus the steps, for every slot)."""
    longest = max(contexts) + steps + 8
    # At least one request of MAX_SEQ_LEN (the config refuses a pool that cannot hold one);
    # the floor counts live KV only, so unused pages change nothing but memory.
    pages = max(batch * -(-longest // PAGE_SIZE), -(-MAX_SEQ_LEN // PAGE_SIZE)) + 1
    config = EngineConfig(batch, (64,), MAX_SEQ_LEN, page_size=PAGE_SIZE, num_pages=pages)
    engine, params = engine_and_params(config_name, config)
    weights = param_bytes(params)
    rows = []
    for context in contexts:
        decode = DecodeBatch(engine)
        prefix = synthetic_prefix(engine, context, seed=context)
        for first in range(0, batch, 4):  # a few at a time: bounded host memory
            slots = list(range(first, min(batch, first + 4)))
            decode.insert([prefix] * len(slots), slots)
        # The median step sees the context grow by steps/2; count the floor there.
        seconds = timed(lambda d=decode: d.step(params), repeats=steps)
        live = context + 2 + steps // 2
        kv_bytes = batch * live * engine.kv_bytes_per_token
        floor_s = (weights + kv_bytes) / (bandwidth_gbps * 1e9)
        rows.append(
            {
                "config": config_name,
                "batch": batch,
                "context": context,
                "max_seq_len": MAX_SEQ_LEN,
                "step_ms": seconds * 1e3,
                "live_floor_ms": floor_s * 1e3,
                "live_floor_ratio": seconds / floor_s,
                "tokens_per_s": batch / seconds,
                "param_mib": weights / 2**20,
                "live_kv_mib": kv_bytes / 2**20,
                "kv_pool_mib": engine.decode_cache_bytes / 2**20,
            }
        )
        print(rows[-1], file=sys.stderr)
    return rows


def bench_prefill(config_name: str, repeats: int) -> list[dict]:
    buckets = REAL_MODEL_BUCKETS.get(config_name.partition(":")[0], PREFILL_BUCKETS)
    rows = []
    for bucket in buckets:
        # One engine per length, its only prefill bucket that length: `Engine.prefill` runs
        # a prompt in chunks of the largest bucket, so a shorter prompt in a shared engine
        # would be timed padded to it (a prefill worker's chunk is its own setting).
        config = EngineConfig(1, (bucket,), PREFILL_MAX_SEQ_LEN)
        engine, params = engine_and_params(config_name, config)
        prompt = [1 + i % 250 for i in range(bucket)]
        seconds = timed(lambda e=engine, w=params, p=prompt: e.prefill(w, p), repeats=repeats)
        rows.append({"config": config_name, "bucket": bucket, "ms": seconds * 1e3})
    return rows


def load_results() -> dict:
    """`small` load time from orbax vs HF, peak RSS float32 vs int8, int8 decode step:
    bench/load_bench.py (each load in a fresh process), merged into this report."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import load_bench

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        load_bench.main(["--out", str(out)])
        return json.loads(out.read_text())


def real_model_load(name: str, repeats: int = 1) -> dict:
    """Load seconds and peak RSS of a real model, float32 and int8, each in a fresh process
    (bench/load_bench.py's child)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import load_bench

    from shared.weights.packaged import packaged_path

    model, _, quantize = name.partition(":")
    path = packaged_path(model)
    variants = (("float32", ""), ("int8", "int8")) if not quantize else ((quantize, quantize),)
    return {
        dtype: {"config": name, **load_bench.measure_load(path, q, repeats)}
        for dtype, q in variants
    }


def print_table(result: dict) -> None:
    print(f"\nread bandwidth: {result['read_bandwidth_gbps']:.1f} GB/s")
    print(f"floor: {result['floor']}")
    header = f"{'config':<8}{'batch':>6}{'context':>9}{'step ms':>10}{'floor ms':>10}"
    print(f"\n{header}{'ratio':>8}{'tok/s':>10}")
    for r in result["decode"]:
        print(
            f"{r['config']:<8}{r['batch']:>6}{r['context']:>9}{r['step_ms']:>10.2f}"
            f"{r['live_floor_ms']:>10.2f}{r['live_floor_ratio']:>8.2f}{r['tokens_per_s']:>10.1f}"
        )
    print(f"\n{'config':<8}{'bucket':>7}{'prefill ms':>12}")
    for r in result["prefill"]:
        print(f"{r['config']:<8}{r['bucket']:>7}{r['ms']:>12.2f}")
    for name, loads in result.get("real_model_load", {}).items():
        for dtype, r in loads.items():
            print(
                f"\n{name} {dtype}: load {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} "
                f"MiB, params {r['param_mib']:.0f} MiB"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--contexts", default="128,512,1024")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--skip-load", action="store_true", help="skip bench/load_bench.py (load time, RSS, int8)"
    )
    args = parser.parse_args(argv)

    bandwidth = read_bandwidth_gbps()
    result: dict = {
        "device": str(jax.devices()[0]),
        "read_bandwidth_gbps": bandwidth,
        "max_seq_len": MAX_SEQ_LEN,
        "floor": "parameters + KV of the live positions of the live requests, read once at "
        "the measured bandwidth (not the cache's capacity)",
        "decode": [],
        "prefill": [],
    }
    for name in args.configs.split(","):
        contexts = [int(c) for c in args.contexts.split(",")]
        for batch in (int(b) for b in args.batches.split(",")):
            result["decode"] += bench_decode(name, batch, contexts, bandwidth, args.steps)
        result["prefill"] += bench_prefill(name, repeats=5)
        if name not in MODEL_PRESETS:
            result.setdefault("real_model_load", {})[name] = real_model_load(name)
    print_table(result)
    if not args.skip_load:
        result.update(load_results())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
