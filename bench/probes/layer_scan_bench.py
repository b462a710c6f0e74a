"""Would scanning over layers cut SmolLM2's compile time for free? The cost on this CPU.

    python bench/probes/layer_scan_bench.py --out bench/results/layer_scan_bench.json

30 MLP-shaped layers of SmolLM2's sizes (d_model 576, FFN 1536, float32), three ways:
* `separate`: one array per layer, unrolled (pdserve's layout today);
* `stacked_static`: one [30, ...] array per weight, unrolled with static slices (a stacked
  layout that decode keeps unrolled);
* `scan`: the stacked arrays under `jax.lax.scan` (one layer compiled).
For 1 row (a decode step) and 128 rows (a prefill bucket): compile seconds and the median
run. Scanning shares the parameter arrays only if they are stored stacked, so both decode
and prefill would pay that layout's run cost (or keep a second, stacked copy of the
weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

LAYERS, D_MODEL, FFN = 30, 576, 1536


def _variants() -> dict:
    """name -> (function of (x, ups, downs), its weights): the three layouts."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)

    def weights(shape: tuple[int, int]) -> list:
        return [jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02) for _ in range(LAYERS)]

    ups, downs = weights((D_MODEL, FFN)), weights((FFN, D_MODEL))
    up_stack, down_stack = jnp.stack(ups), jnp.stack(downs)

    def layer(x: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
        return x + jnp.tanh(x @ up) @ down

    def separate(x: jax.Array, ups: list, downs: list) -> jax.Array:
        for up, down in zip(ups, downs, strict=True):
            x = layer(x, up, down)
        return x

    def stacked_static(x: jax.Array, ups: jax.Array, downs: jax.Array) -> jax.Array:
        for i in range(LAYERS):
            x = layer(x, ups[i], downs[i])
        return x

    def scan(x: jax.Array, ups: jax.Array, downs: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda x, w: (layer(x, *w), None), x, (ups, downs))[0]

    return {
        "separate": (separate, (ups, downs)),
        "stacked_static": (stacked_static, (up_stack, down_stack)),
        "scan": (scan, (up_stack, down_stack)),
    }


def _measure(fn: object, x: object, weights: tuple) -> dict:
    """Compile seconds and the median of 9 runs (after one untimed run)."""
    import jax

    jitted = jax.jit(fn)
    start = time.perf_counter()
    jitted.lower(x, *weights).compile()
    compile_s = time.perf_counter() - start
    jitted(x, *weights).block_until_ready()
    runs = []
    for _ in range(9):
        start = time.perf_counter()
        jitted(x, *weights).block_until_ready()
        runs.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "run_ms": statistics.median(runs) * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    variants = _variants()
    result: dict = {"layers": LAYERS, "d_model": D_MODEL, "ffn": FFN}
    result |= {"load_average_at_start": os.getloadavg(), "rows": {}}
    jax.jit(lambda a: a + 1)(jnp.ones(4)).block_until_ready()  # backend start-up, not timed
    for rows in (1, 128):
        x = jnp.ones((rows, D_MODEL), jnp.float32)
        for name, (fn, weights) in variants.items():
            entry = _measure(fn, x, weights)
            result["rows"].setdefault(str(rows), {})[name] = entry
            print(
                f"{rows:>3} rows  {name:<15} compile {entry['compile_s']:5.2f} s  run "
                f"{entry['run_ms']:7.2f} ms",
                flush=True,
            )
    result["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
