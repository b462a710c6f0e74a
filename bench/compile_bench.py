"""Worker startup of SmolLM2 split into load and each compile, cold and from the cache.

    python bench/compile_bench.py --out bench/results/compile_bench.json [--slots 8]

Each measurement is a fresh process running exactly a worker's startup path
(`load_runtime` + `warm_up`, shared/serving/runtime.py) with `pdserve serve`'s engine
flags, one after the other (each alone on the machine):

1. `cold_all`: `--warm-up all` from an empty compilation cache: every bucket compiled
   before serving (what every start paid before `--warm-up largest` and the cache).
2. `cold`: the default `--warm-up largest` from an empty cache: a first start. Then the
   held decode batch buckets compile (as a serving worker does in the background), and a
   1-row decode step is timed in the larger bucket first and in its own once compiled.
3. `cached`: `cold` again on the cache `cold` filled: a restart (`--compilation-cache-dir`).

The JSON holds the seconds of the load and of every compiled part (the prefill loop's
chunk shapes, inserts, each decode batch bucket), per role and scenario, and the load
average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("JAX_PLATFORMS", "cpu")

if TYPE_CHECKING:
    from shared.serving.runtime import ModelRuntime
    from shared.serving.worker_config import WorkerConfig

REPO = Path(__file__).resolve().parents[1]
SERVE_ENGINE_FLAGS = ["--prefill-buckets", "16,32,64,128", "--max-seq-len", "256"]


def child(role: str, model: str, slots: int, cache_dir: str | None, warm: str) -> dict:
    """One worker startup in this process: seconds of load and of each compile; with
    `--warm-up largest`, also the cost of a held batch bucket (a 1-row decode step served
    by the larger bucket, then by its own) and the background compile's seconds."""
    started = time.perf_counter()
    from shared.serving.flags import for_role
    from shared.serving.runtime import compile_held_buckets, enable_compilation_cache, load_runtime
    from shared.serving.worker_config import Role, parse_worker_args

    argv = ["--model", model, "--slots", str(slots), "--warm-up", warm, *SERVE_ENGINE_FLAGS]
    if cache_dir is not None:
        argv += ["--compilation-cache-dir", cache_dir]
    config = parse_worker_args(for_role(role, argv), Role(role))  # a prefill worker: no --slots
    enable_compilation_cache(config.compilation_cache_dir)
    imported = time.perf_counter()
    runtime = load_runtime(config)
    loaded = time.perf_counter()
    result = {
        "role": role,
        "warm_up": warm,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "compile_s": compile_role(runtime, config, role, hold=warm == "largest"),
        "startup_s": time.perf_counter() - started,
    }
    if warm != "largest" or role == "prefill":
        return result  # only decode batch buckets are ever held
    result["held_buckets"] = runtime.engine.held_buckets
    result["while_held"] = decode_step_cost(runtime)
    done: list[dict[str, float]] = []
    thread = compile_held_buckets(runtime, done.append)
    if thread is not None:
        thread.join()
    result["background_compile_s"] = done[0] if done else {}
    result["once_compiled"] = decode_step_cost(runtime)
    return result


def compile_role(
    runtime: ModelRuntime, config: WorkerConfig, role: str, *, hold: bool
) -> dict[str, float]:
    """What the role compiles before it serves: the decode programs (runtime.warm_up) and
    the prefill loop's chunk shapes (prefill_server/loop.py, as `serve` builds it)."""
    from prefill_server.loop import PrefillLoop, compile_prefill_loop
    from shared.metrics import WorkerMetrics
    from shared.serving.runtime import warm_up

    seconds = {}
    if role != "prefill":
        seconds.update(warm_up(runtime, hold=hold))
    if role != "decode":
        from prometheus_client import CollectorRegistry

        loop = PrefillLoop(
            runtime.engine,
            runtime.params,
            None,  # no KV is pushed: nothing is served
            WorkerMetrics(CollectorRegistry(), role),
            max_queue=config.max_queue,
            on_fatal=lambda err: None,
            settings=config.prefill,
        )
        seconds["chunked_prefill"] = compile_prefill_loop(loop)
    return seconds


def decode_step_cost(runtime: ModelRuntime) -> float:
    """Median seconds of a 1-row decode step, in whatever batch bucket it gets now."""
    import numpy as np

    engine, params = runtime.engine, runtime.params
    state, runs = engine.init_decode_state(), []
    for _ in range(5):
        t = time.perf_counter()
        state, tokens, _ = engine.generate(params, state, np.zeros(1, np.int32))
        np.asarray(tokens)
        runs.append(time.perf_counter() - t)
    return sorted(runs)[2]


def measure(role: str, model: str, slots: int, cache_dir: str | None, warm: str) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--child",
        role,
        "--model",
        model,
        "--slots",
        str(slots),
        "--warm-up",
        warm,
    ]
    if cache_dir is not None:
        argv += ["--cache-dir", cache_dir]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The scenario decides the cache: nothing inherited from the caller's environment.
    for name in ("JAX_COMPILATION_CACHE_DIR", "PDSERVE_COMPILATION_CACHE_DIR"):
        env.pop(name, None)
    load = os.getloadavg()
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start  # + the background compile
    result["load_average_at_start"] = load
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--roles", default="prefill,decode")
    parser.add_argument("--scenarios", default="cold_all,cold,cached")
    parser.add_argument("--warm-up", default="largest", help=argparse.SUPPRESS)
    parser.add_argument(
        "--before", type=Path, help="a JSON of the same measurement on older code, kept as is"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.slots, args.cache_dir, args.warm_up)))
        return 0
    results: dict = {"model": args.model, "slots": args.slots, "engine": SERVE_ENGINE_FLAGS}
    if args.before:
        results["before"] = json.loads(args.before.read_text())
    with tempfile.TemporaryDirectory(prefix="pdserve-jax-cache-") as tmp:
        for scenario in args.scenarios.split(","):
            warm = "all" if scenario == "cold_all" else "largest"
            # cold_all and cold each start from an empty cache; cached reuses cold's.
            cache = os.path.join(tmp, "all" if scenario == "cold_all" else "largest")
            for role in args.roles.split(","):
                r = measure(role, args.model, args.slots, cache, warm)
                results.setdefault(scenario, {})[role] = r
                parts = ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items())
                print(
                    f"{scenario:<8} {role:<8} serving after {r['startup_s']:6.1f} s: import "
                    f"{r['import_s']:.1f}, load {r['load_s']:.1f}, compile: {parts}",
                    flush=True,
                )
                if "background_compile_s" in r:
                    print(
                        f"{'':<17} then in the background: {r['background_compile_s']}; "
                        f"1-row decode step while held {r['while_held']:.3f} s, once compiled "
                        f"{r['once_compiled']:.3f} s",
                        flush=True,
                    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
