"""Closed-loop serving: TPOT against the decode worker's step and the engine's own step.

The workload (128-token prompts, 128 output tokens, c requests in flight) goes through the
public gRPC API; the decode worker's step and the engine's bare step are measured beside
it, in the same invocation.

    python bench/closed_loop_bench.py --out FILE.json [--model smollm2] [--concurrency 1,8,32]
        [--requests-scale 1.0] [--modes colocated,disaggregated] [--worker-flags="..."]

What runs:
1. For each mode, a cluster started through shared/cluster, as `pdserve serve` would:
   `colocated` (one colocated worker, mixed batches), `colocated-thread` (the same with
   `--colocated-prefill thread`: two engine threads), `disaggregated` (one prefill + one
   decode worker) or `disaggregated-pinned` (the same, the prefill worker on core 0, the
   decode worker on core 1; these two run only when named),
   an orchestrator in front, every worker with `--model M` and the worker flags (default
   `--slots 32 --max-seq-len 512 --prefill-buckets 16,32,64,128`).
2. Once the decode worker has compiled every batch bucket (with the default `--warm-up
   largest` it compiles the smaller ones while serving), one unmeasured warm-up run per
   cluster (at the highest concurrency), then for each
   concurrency c a closed loop keeping c requests in flight, n = max(8, 3c) requests
   (times --requests-scale): `pdserve bench` as a subprocess, seeded random prompts of 128
   tokens, 128 output tokens each, EOS ignored. The 1-minute load average is read before
   each run (the machine is shared).
3. Per run: output tok/s and TTFT/TPOT p50/p99 from pdserve bench's JSON report; from the
   decode worker's /metrics before and after the run, its mean decode step (delta sum /
   delta count of `pdserve_decode_step_seconds`) and its mean live rows (the same mean of
   `pdserve_decode_batch_occupancy`, the live fraction of the slots, times the slots).
4. After the clusters stop, a child process of this script loads the same model with the
   same worker flags (shared/serving/runtime.py, as a worker does) and times the engine's
   own decode step (`DecodeBatch.step`, tokens read back) with each run's mean live rows,
   rounded to the engine's batch bucket, live, at context 128 + 64 (the served requests'
   halfway point). `tpot_over_engine_step` = TPOT p50 / that step: what serving adds.
   Each ratio comes from one invocation; compare ratios across runs, not absolute times.

Every child process dies with this one (shared/cluster and shared/serving/lifetime.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # inherited by every child process

from shared.cluster.cluster import Cluster, ClusterSpec  # noqa: E402
from shared.cluster.processes import Child  # noqa: E402
from shared.serving.lifetime import child_environment, die_with_parent  # noqa: E402

PROMPT_LEN = 128
OUTPUT_LEN = 128
ENGINE_CONTEXT = PROMPT_LEN + OUTPUT_LEN // 2
DEFAULT_WORKER_FLAGS = "--slots 32 --max-seq-len 512 --prefill-buckets 16,32,64,128"
MODES = {
    "colocated": {
        "prefill": 0,
        "decode": 0,
        "colocated": 1,
        "role_flags": {"colocated": ("--colocated-prefill", "mixed")},
    },
    # The colocated worker with a prefill engine thread of its own (not mixed batches).
    "colocated-thread": {
        "prefill": 0,
        "decode": 0,
        "colocated": 1,
        "role_flags": {"colocated": ("--colocated-prefill", "thread")},
    },
    "disaggregated": {},
    # The two workers on one core each (the orchestrator and this script unpinned): the
    # alternative to sharing the cores, for the policy of two roles on one host.
    "disaggregated-pinned": {"cpus": {"prefill-0": (0,), "decode-0": (1,)}},
}
DECODE_WORKER = {
    "colocated": "colocated-0",
    "colocated-thread": "colocated-0",
    "disaggregated": "decode-0",
    "disaggregated-pinned": "decode-0",
}
STEP = "pdserve_decode_step_seconds"
OCCUPANCY = "pdserve_decode_batch_occupancy"
# What a worker prints (shared/serving/runtime.py) when it serves before compiling every
# decode batch bucket, and once it has compiled them all.
HELD_BUCKETS = "while serving"
ALL_COMPILED = "every bucket compiled"
# ... and what a colocated worker prints (decode_server/colocated.py) once its mixed
# prefill + decode programs are compiled (it serves meanwhile, the two run one by one).
MIXED_WHILE_SERVING = "mixed batch shapes while serving"
ALL_MIXED_COMPILED = "every mixed batch compiled"
TABLE = (  # (key, header, format)
    ("mode", "mode", "<21"),
    ("concurrency", "c", ">4"),
    ("requests", "n", ">4"),
    ("load_avg_before", "load", ">6.2f"),
    ("output_tok_s", "tok/s", ">8.1f"),
    ("ttft_p50_ms", "TTFT50", ">9.1f"),
    ("ttft_p99_ms", "TTFT99", ">9.1f"),
    ("tpot_p50_ms", "TPOT50", ">8.2f"),
    ("tpot_p99_ms", "TPOT99", ">8.2f"),
    ("decode_step_ms", "step", ">8.2f"),
    ("live_rows", "rows", ">6.1f"),
    ("engine_step_ms", "engine", ">8.2f"),
    ("tpot_over_engine_step", "ratio", ">7.2f"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON report here (required)")
    p.add_argument("--model", default="smollm2", help="worker --model (default smollm2)")
    p.add_argument("--concurrency", default="1,8,32", help="requests in flight, one run each")
    p.add_argument(
        "--requests-scale",
        type=float,
        default=1.0,
        help="multiply each run's max(8, 3c) requests (e.g. 0.5 for a smoke run; >= 1 each)",
    )
    p.add_argument(
        "--modes", default="colocated,disaggregated", help="clusters to run, in this order"
    )
    p.add_argument(
        "--worker-flags",
        default=DEFAULT_WORKER_FLAGS,
        help=f'flags for every worker after --model; pass as --worker-flags="..." '
        f"(default {DEFAULT_WORKER_FLAGS!r})",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts (each run its own)")
    p.add_argument(
        "--vocab-max", type=int, default=255, help="prompt token ids from [1, vocab-max]"
    )
    p.add_argument(
        "--engine-steps", type=int, default=50, help="timed engine steps per batch (median)"
    )
    p.add_argument("--startup-timeout-s", type=float, default=1800.0, help="per process, to serve")
    p.add_argument(
        "--engine-child",
        metavar="JSON",
        help="internal: run as the engine-step child with this JSON job, print JSON",
    )
    return p


def requests_for(concurrency: int, scale: float) -> int:
    """n = max(8, 3c), scaled; at least one request."""
    return max(1, round(max(8, 3 * concurrency) * scale))


def worker_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, *shlex.split(args.worker_flags)]


# The served runs -------------------------------------------------------------------------


def run_loadgen(
    target: str, concurrency: int, requests: int, seed: int, args: argparse.Namespace
) -> dict:
    """`pdserve bench` in a closed loop against `target`; its JSON report's "report"."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "pdserve_cli", "bench", "--target", target]
        command += ["--concurrency", str(concurrency), "--num-requests", str(requests)]
        command += ["--prompt-len", str(PROMPT_LEN), "--output-len", str(OUTPUT_LEN)]
        command += ["--ignore-eos", "--seed", str(seed), "--vocab-max", str(args.vocab_max)]
        command += ["--no-progress", "--out", str(out)]
        done = subprocess.run(
            command, cwd=ROOT, env=child_environment(), capture_output=True, text=True
        )
        if done.returncode != 0 or not out.exists():
            tail = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"pdserve bench exited {done.returncode}:\n{tail}")
        return json.loads(out.read_text())["report"]


def histogram_totals(samples: dict[str, float], name: str) -> tuple[float, float]:
    """(sum, count) of histogram `name` (no labels) in parsed /metrics."""
    return samples.get(f"{name}_sum{{}}", 0.0), samples.get(f"{name}_count{{}}", 0.0)


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Mean of what `name` observed between two scrapes (None when it observed nothing)."""
    (s0, c0), (s1, c1) = histogram_totals(before, name), histogram_totals(after, name)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None


def slot_count(samples: dict[str, float]) -> int:
    """The decode worker's slots: its slot gauge summed over every state."""
    return round(sum(v for k, v in samples.items() if k.startswith("pdserve_decode_slots{")))


def measure_run(cluster: Cluster, mode: str, concurrency: int, args: argparse.Namespace) -> dict:
    """One measured closed-loop run: the row without the engine's step."""
    worker = DECODE_WORKER[mode]
    requests = requests_for(concurrency, args.requests_scale)
    load = os.getloadavg()[0]
    before = cluster.metrics(worker)
    report = run_loadgen(cluster.target, concurrency, requests, args.seed + concurrency, args)
    after = cluster.metrics(worker)
    if report["completed"] != requests:
        raise RuntimeError(f"{mode} c={concurrency}: {report['errors']}")
    row = {"mode": mode, "concurrency": concurrency, "requests": requests}
    row |= {"load_avg_before": load, "output_tok_s": report["output_token_throughput"]}
    for metric in ("ttft", "tpot"):
        for q in ("p50", "p99"):
            row[f"{metric}_{q}_ms"] = report[f"{metric}_ms"][q]
    step, occupancy = histogram_mean(before, after, STEP), histogram_mean(before, after, OCCUPANCY)
    row["decode_step_ms"] = None if step is None else step * 1e3
    row["live_rows"] = None if occupancy is None else occupancy * slot_count(after)
    print(f"{mode} c={concurrency}: {row}", file=sys.stderr, flush=True)
    return row


def wait_compiled(worker: Child, timeout: float) -> None:
    """Return once `worker` compiled every decode batch bucket: with `--warm-up largest` it
    serves before the smaller ones are compiled, stepping them in a larger bucket until
    then, which would make the first measured runs slower than the steady state."""
    deadline = time.monotonic() + timeout

    def pending() -> bool:
        text = worker.text()
        held = HELD_BUCKETS in text and ALL_COMPILED not in text
        return held or (MIXED_WHILE_SERVING in text and ALL_MIXED_COMPILED not in text)

    while pending():
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{worker.name} did not compile its buckets:\n{worker.text()}")
        time.sleep(1.0)


def measure_mode(mode: str, levels: Sequence[int], args: argparse.Namespace) -> list[dict]:
    """Start `mode`'s cluster, warm it up (unmeasured), run every concurrency, stop it."""
    spec = ClusterSpec(
        **MODES[mode],
        worker_flags=worker_flags(args),
        orchestrator_flags=("--model", args.model),
        startup_timeout_s=args.startup_timeout_s,
    )
    print(f"{mode}: starting", file=sys.stderr, flush=True)
    with Cluster.start(spec) as cluster:
        wait_compiled(cluster.workers[DECODE_WORKER[mode]], args.startup_timeout_s)
        top = max(levels)
        # Different prompts from every measured run: no prefix-cache hit carries over.
        run_loadgen(cluster.target, top, max(top, 4), args.seed + 10**6, args)
        return [measure_run(cluster, mode, c, args) for c in levels]


# The engine's own step, in a child process ---------------------------------------------


def engine_child(job: dict) -> dict:
    """Load the model as a colocated worker with these flags would; time its decode step
    with each asked live-row count (rounded to its batch bucket) at `context`."""
    import jax
    from engine_bench import synthetic_prefix, timed

    from decode_server.scheduler import DecodeBatch
    from shared.serving.flags import for_role
    from shared.serving.runtime import load_runtime
    from shared.serving.worker_config import Role, parse_worker_args

    argv = ["--port", "0", "--metrics-port", "-1", *for_role("colocated", job["flags"])]
    runtime = load_runtime(parse_worker_args(argv, Role.COLOCATED))
    engine, steps = runtime.engine, job["steps"]
    # Steps grow the context by one each: the median timed step sees `context`.
    prefix = synthetic_prefix(engine, job["context"] - 2 - steps // 2, seed=0)
    out: dict = {"device": str(jax.devices()[0]), "steps": {}}
    for rows in job["rows"]:
        bucket = engine.batch_bucket(max(1, round(rows)))
        if str(bucket) not in out["steps"]:
            decode = DecodeBatch(engine)
            decode.insert([prefix] * bucket, list(range(bucket)))
            seconds = timed(lambda d=decode: d.step(runtime.params), repeats=steps)
            out["steps"][str(bucket)] = seconds * 1e3
        out.setdefault("buckets", {})[str(rows)] = bucket
    return out


def run_engine_child(rows: Sequence[dict], args: argparse.Namespace) -> dict:
    """`engine_child` in a fresh process (it dies with this one); its JSON answer."""
    live = sorted({r["live_rows"] for r in rows if r["live_rows"] is not None})
    job = {"flags": worker_flags(args), "rows": live, "context": ENGINE_CONTEXT}
    job["steps"] = args.engine_steps
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-child", json.dumps(job)]
    print(f"engine child: {job}", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    done = subprocess.run(
        command, cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"engine child exited {done.returncode}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_avg_before": load}


def attach_engine_steps(rows: list[dict], engine: dict) -> None:
    """Each row's engine step at its bucket, and TPOT p50 over it."""
    for row in rows:
        bucket = engine["buckets"].get(str(row["live_rows"]))
        step = engine["steps"][str(bucket)] if bucket is not None else None
        row["engine_step_ms"] = step
        row["engine_batch"] = bucket
        tpot = row["tpot_p50_ms"]
        row["tpot_over_engine_step"] = tpot / step if tpot is not None and step else None


# Report ----------------------------------------------------------------------------------


def machine_info(engine_device: str) -> dict:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "engine_device": engine_device,
    }


def format_cell(value: object, fmt: str) -> str:
    if value is None:
        return format("-", fmt[0] + fmt[1:].split(".")[0])
    return format(value, fmt)


def print_table(rows: Sequence[dict]) -> None:
    """One line per (mode, concurrency); times in ms, `step` the decode worker's own."""
    widths = [f"{fmt[0]}{fmt[1:].split('.')[0]}" for _, _, fmt in TABLE]
    print("".join(format(h, w) for (_, h, _), w in zip(TABLE, widths, strict=True)))
    for row in rows:
        print("".join(format_cell(row[k], fmt) for k, _, fmt in TABLE))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.engine_child is not None:
        die_with_parent()
        print(json.dumps(engine_child(json.loads(args.engine_child))), flush=True)
        return 0
    if args.out is None:
        build_parser().error("--out is required")
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = [row for mode in args.modes.split(",") for row in measure_mode(mode, levels, args)]
    engine = run_engine_child(rows, args)
    attach_engine_steps(rows, engine)
    result = {"machine": machine_info(engine["device"]), "model": args.model}
    result |= {"worker_flags": worker_flags(args), "engine_context": ENGINE_CONTEXT}
    result |= {"engine_load_avg_before": engine["load_avg_before"]}
    result |= {"prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "rows": rows}
    print()
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
