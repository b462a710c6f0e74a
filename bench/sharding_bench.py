"""Tensor-parallel benchmark: per-device bytes and step times at TP = 1, 2, 4 (8).

    python bench/sharding_bench.py --out FILE.json [--config small] [--tps 1,2,4,8]

Runs on simulated CPU devices (XLA_FLAGS is set before JAX starts). On this 2-core CPU
sharding cannot speed anything up: every simulated device shares the same two cores, so
the times show only what the sharded program costs over the unsharded one (its
collectives, its partitioned scatters). The goal is TP=2 at most 1.1x TP=1's decode step
(`tp2_over_tp1_step_ratio`). The bytes per device are exact and are what decides whether a
model fits a chip on TPU; step speedups can only be measured on TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import timed

from decode_server.scheduler import DecodeBatch
from shared.config import ConfigError, EngineConfig, model_preset
from shared.engine.engine import Engine
from shared.engine.mesh import make_mesh

MAX_SEQ_LEN = 1024
PREFILL_LEN = 512
CONTEXT = 200  # live tokens per slot when the step is timed


def per_device_bytes(tree: object) -> int:
    """Bytes held by the most loaded device."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def bench_engine(
    engine: Engine, params: object, config_name: str, batch: int, steps: int, prefill: bool
) -> dict:
    """One engine's decode step (every slot live at CONTEXT tokens) and, if asked, its
    prefill of PREFILL_LEN tokens."""
    prompt = [1 + i % 250 for i in range(CONTEXT)]
    prefix = engine.prefill(params, prompt)
    decode = DecodeBatch(engine)
    decode.insert([prefix] * batch, list(range(batch)))

    def step() -> None:
        decode.step(params)  # reads the tokens back

    row = {
        "config": config_name,
        "tp": engine.tp,
        "batch": batch,
        "step_ms": timed(step, repeats=steps) * 1e3,
        "param_bytes_per_device": per_device_bytes(params),
        "kv_bytes_per_device": per_device_bytes(decode.state.cache),
    }
    if prefill:
        long_prompt = [1 + i % 250 for i in range(PREFILL_LEN)]
        start = time.perf_counter()
        engine.prefill(params, long_prompt)  # compiles the chunk program
        row["prefill_compile_s"] = time.perf_counter() - start
        row["prefill_ms"] = timed(lambda: engine.prefill(params, long_prompt), repeats=3) * 1e3
    return row


def bench_tp(config_name: str, tp: int, batches: list[int], steps: int) -> list[dict]:
    model = model_preset(config_name)
    mesh = make_mesh(tp)
    rows = []
    params = None
    for batch in batches:
        engine = Engine(model, EngineConfig(batch, (PREFILL_LEN,), MAX_SEQ_LEN), mesh)
        params = params if params is not None else engine.init_params(seed=0)
        rows.append(bench_engine(engine, params, config_name, batch, steps, batch == batches[0]))
        print(rows[-1], file=sys.stderr, flush=True)
        del engine
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--tps", default="1,2,4,8")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    result: dict = {
        "device": str(jax.devices()[0]),
        "simulated_devices": len(jax.devices()),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "max_seq_len": MAX_SEQ_LEN,
        "context": CONTEXT,
        "rows": [],
        "refused": {},
    }
    for tp in (int(t) for t in args.tps.split(",")):
        try:
            result["rows"] += bench_tp(args.config, tp, batches, args.steps)
        except ConfigError as err:
            result["refused"][str(tp)] = str(err)
            print(f"TP={tp}: {err}", file=sys.stderr)
    step = {(r["tp"], r["batch"]): r["step_ms"] for r in result["rows"]}
    ratios = {b: step[(2, b)] / step[(1, b)] for b in batches if (2, b) in step and (1, b) in step}
    if ratios:
        result["tp2_over_tp1_step_ratio"] = max(ratios.values())
        result["tp2_over_tp1_step_ratio_by_batch"] = {str(b): r for b, r in ratios.items()}
    print(
        f"\n{'tp':>3}{'batch':>6}{'params MiB/dev':>16}{'KV MiB/dev':>12}{'step ms':>10}"
        f"{'prefill ms':>12}"
    )
    for r in result["rows"]:
        prefill = f"{r['prefill_ms']:>12.1f}" if "prefill_ms" in r else f"{'':>12}"
        mib = (r["param_bytes_per_device"] / 2**20, r["kv_bytes_per_device"] / 2**20)
        print(
            f"{r['tp']:>3}{r['batch']:>6}{mib[0]:>16.1f}{mib[1]:>12.1f}{r['step_ms']:>10.2f}"
            f"{prefill}"
        )
    for tp, why in result["refused"].items():
        print(f"TP={tp} refused: {why}")
    if ratios:
        print(f"\nTP=2 / TP=1 decode step (worst batch): {result['tp2_over_tp1_step_ratio']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
