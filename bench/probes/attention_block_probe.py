"""How many positions the XLA paged attention should read per loop iteration on CPU.

    python bench/probes/attention_block_probe.py --out bench/results/attention_block_probe.json

Two measurements, each side by side in one process (the machine's speed drifts between
minutes, so only ratios within one run count):
* `attention`: SmolLM2's decode attention alone (3 cache heads x 3 query heads x 64, pages
  of 16), 30 layers chained, each layer's pool its own array as in the model, at reads of
  128 / 64 / 32 positions.
* `step`: SmolLM2's whole decode step (`DecodeBatch.step`) with the model built for each
  read, the two engines' steps interleaved.
It showed that 64 positions beat 128 (the table's block) on XLA:CPU at 16-32 rows: the
gathered K/V of a block at 32 rows is 3 MiB at 64 positions and 6 MiB at 128. The recorded
run (bench/results/attention_block_probe.json): attention alone 54.8 vs 64.5 ms at 32
rows (other runs of the same code: 1.2-2.8x), none at 8 rows; the whole step 208 vs 232 ms
at 32 rows (4-10% in other runs at 16-32), 82 vs 84 ms at 8. EngineConfig.
read_pages_per_block reads 64 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from engine_bench import engine_and_params, synthetic_prefix, timed

from decode_server.scheduler import DecodeBatch
from shared.config import EngineConfig
from shared.engine.engine import Engine
from shared.engine.model.attention import paged_attention_xla

CACHE_HEADS, GROUP, HEAD_DIM, PAGE, LAYERS = 3, 3, 64, 16, 30


def attention_ms(rows: int, context: int, positions: int, repeats: int) -> float:
    """Median ms of 30 chained layers of decode attention reading `positions` at a time."""
    width = 512 // PAGE
    rng = np.random.default_rng(0)
    shape = (CACHE_HEADS, rows * width + 1, PAGE, HEAD_DIM)
    pools = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2 * LAYERS)]
    table = jnp.asarray(1 + np.arange(rows * width, dtype=np.int32).reshape(rows, width))
    lengths = jnp.full((rows,), context, jnp.int32)
    q = jnp.asarray(rng.standard_normal((CACHE_HEADS, rows, 1, GROUP, HEAD_DIM), np.float32))

    @jax.jit
    def layers(q: jax.Array, pools: list[jax.Array]) -> jax.Array:
        x = q
        for i in range(LAYERS):
            out = paged_attention_xla(
                x,
                pools[2 * i],
                pools[2 * i + 1],
                table,
                (lengths - 1)[:, None],
                lengths,
                pages_per_block=positions // PAGE,
            )
            x = q + 1e-3 * out  # each layer waits for the one before, as in the model
        return x

    return timed(lambda: layers(q, pools).block_until_ready(), repeats, warmup=1) * 1e3


def step_ms(rows: int, context: int, reads: list[int], rounds: int) -> dict[int, float]:
    """SmolLM2's decode step with each read (positions), steps of the engines interleaved."""
    pages = rows * -(-(context + 8 * rounds) // PAGE) + 33
    config = EngineConfig(rows, (64,), 512, page_size=PAGE, num_pages=pages)
    first, params = engine_and_params("smollm2", config)
    batches = {}
    for positions in reads:
        # The engine reads its attention block from the config once, when it builds the model.
        pages = positions // PAGE
        with mock.patch.object(EngineConfig, "read_pages_per_block", return_value=pages):
            engine = Engine(first.model_config, config)
        batch = DecodeBatch(engine)
        prefix = synthetic_prefix(engine, context, seed=1)
        for start in range(0, rows, 4):
            slots = list(range(start, min(rows, start + 4)))
            batch.insert([prefix] * len(slots), slots)
        batch.step(params)
        batches[positions] = batch
    times: dict[int, list[float]] = {positions: [] for positions in reads}
    for _ in range(rounds):
        for positions, batch in batches.items():
            start = time.perf_counter()
            for _ in range(4):
                batch.step(params)
            times[positions].append((time.perf_counter() - start) / 4 * 1e3)
    return {positions: statistics.median(t) for positions, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", type=int, default=192)
    args = parser.parse_args()
    report: dict = {"load_avg_before": os.getloadavg()[0], "context": args.context}
    report["attention"] = [
        {"rows": rows, "positions": positions, "ms": attention_ms(rows, args.context, positions, 8)}
        for rows in (8, 32)
        for positions in (128, 64, 32)
    ]
    for row in report["attention"]:
        print(f"attention rows={row['rows']:>3} read={row['positions']:>4}: {row['ms']:7.1f} ms")
    report["step"] = []
    for rows in (8, 32):
        for positions, ms in step_ms(rows, args.context, [128, 64], rounds=6).items():
            report["step"].append({"rows": rows, "positions": positions, "ms": ms})
            print(f"step rows={rows:>3} read={positions:>4}: {ms:7.1f} ms")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
