"""Worker startup of SmolLM2 split into load and each compile, cold and from the cache.

    python bench/compile_bench.py --out bench/results/compile_bench.json [--slots 8]

Each measurement is a fresh process running exactly a worker's startup path
(`load_runtime` + `warm_up`, shared/serving/runtime.py) with `pdserve serve`'s engine
flags, one after the other (each alone on the machine):

1. `cold`: an empty compilation cache directory: what a first start pays.
2. `cached`: the same directory again: what a restart pays (`--compilation-cache-dir`).

The JSON holds the seconds of the load and of every compiled part (prefill buckets,
inserts, each decode batch bucket), per role and scenario, and the load average.
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

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SERVE_ENGINE_FLAGS = ["--prefill-buckets", "16,32,64,128", "--max-seq-len", "256"]


def child(role: str, model: str, slots: int, cache_dir: str | None) -> dict:
    """One worker startup in this process: seconds of load and of each compile."""
    started = time.perf_counter()
    from shared.serving.runtime import enable_compilation_cache, load_runtime, warm_up
    from shared.serving.worker_config import Role, parse_worker_args

    argv = ["--model", model, "--slots", str(slots), *SERVE_ENGINE_FLAGS]
    if cache_dir is not None:
        argv += ["--compilation-cache-dir", cache_dir]
    config = parse_worker_args(argv, Role(role))
    enable_compilation_cache(config.compilation_cache_dir)
    imported = time.perf_counter()
    runtime = load_runtime(config)
    loaded = time.perf_counter()
    compiled = warm_up(runtime, prefill=role != "decode", decode=role != "prefill")
    return {
        "role": role,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "compile_s": compiled,
        "total_s": time.perf_counter() - started,
    }


def measure(role: str, model: str, slots: int, cache_dir: str | None) -> dict:
    argv = [sys.executable, __file__, "--child", role, "--model", model, "--slots", str(slots)]
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
    result["process_s"] = time.perf_counter() - start
    result["load_average_at_start"] = load
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--roles", default="prefill,decode")
    parser.add_argument("--scenarios", default="cold,cached")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.slots, args.cache_dir)))
        return 0
    results: dict = {"model": args.model, "slots": args.slots, "engine": SERVE_ENGINE_FLAGS}
    with tempfile.TemporaryDirectory(prefix="pdserve-jax-cache-") as cache:
        for scenario in args.scenarios.split(","):
            for role in args.roles.split(","):
                r = measure(role, args.model, args.slots, cache)
                results.setdefault(scenario, {})[role] = r
                parts = ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items())
                print(f"{scenario:<7} {role:<8} {r['process_s']:6.1f} s in all: import "
                      f"{r['import_s']:.1f}, load {r['load_s']:.1f}, compile: {parts}",
                      flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
