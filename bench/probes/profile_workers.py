"""Where the workers' time goes under the closed-loop workload: py-spy on every worker.

    python bench/probes/profile_workers.py [--mode colocated] [--model smollm2]
        [--concurrency 32] [--seconds 30] [--out DIR]

Starts the closed-loop bench's cluster for `--mode` (bench/closed_loop_bench.py), keeps
`--concurrency` requests in flight with `pdserve bench`, waits out the opening burst, then
samples every worker process for `--seconds` with py-spy (`pip install py-spy==0.4.0`;
not a dependency of pdserve) and prints, per thread, the share of samples by the
innermost pdserve frame: how long the engine thread spends inside the jitted calls (the
frame that called them) against host work, and what the other threads do. Idle samples
count (`--idle`): a thread waiting for work shows as its wait. The raw stacks are kept in
DIR. py-spy sees Python frames only: the time inside one XLA program is one frame.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import closed_loop_bench as loop_bench  # noqa: E402

from shared.cluster.cluster import Cluster, ClusterSpec  # noqa: E402

# 50 samples/s, idle threads too, by thread, collapsed stacks, without pausing the process.
SPY = [
    shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}") or "py-spy"
]
SPY += ["record", "--rate", "50", "--idle", "--threads", "--format", "raw"]
SPY += ["--nonblocking"]
OURS = ("decode_server/", "prefill_server/", "shared/", "orchestrator/")


def spy_command(pid: int, seconds: int, output: Path) -> list[str]:
    return [*SPY, "--pid", str(pid), "--duration", str(seconds), "--output", str(output)]


def summarize(raw: Path, top: int = 8) -> str:
    """Per thread: the innermost pdserve frame of each sample, by share of samples."""
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        ours = [f for f in frames[1:] if any(part in f for part in OURS)]
        leaf = ours[-1] if ours else frames[-1]
        by_thread[thread][leaf] += int(count)
    lines = []
    for thread, counter in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counter.values())
        lines.append(f"{thread}: {total} samples")
        for frame, n in counter.most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="colocated", choices=sorted(loop_bench.MODES))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--out", default="/tmp/pdserve-profile")
    p.add_argument("--worker-flags", default=loop_bench.DEFAULT_WORKER_FLAGS)
    args = p.parse_args()
    bench_args = loop_bench.build_parser().parse_args(
        ["--out", "/dev/null", "--model", args.model, f"--worker-flags={args.worker_flags}"]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec(
        **loop_bench.MODES[args.mode],
        worker_flags=loop_bench.worker_flags(bench_args),
        orchestrator_flags=("--model", args.model),
    )
    with Cluster.start(spec) as cluster:
        decode = cluster.workers[loop_bench.DECODE_WORKER[args.mode]]
        loop_bench.wait_compiled(decode, 900)
        c = args.concurrency
        load = threading.Thread(
            target=loop_bench.run_loadgen,
            args=(cluster.target, c, 6 * c, 7, bench_args),
            daemon=True,
        )
        load.start()
        time.sleep(15)  # past the opening burst: the steady state
        spies = {
            name: subprocess.Popen(
                spy_command(child.proc.pid, args.seconds, out / f"{name}.txt"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, child in cluster.workers.items()
        }
        for spy in spies.values():
            spy.wait()
        for name in spies:
            print(f"== {name} ({args.mode}, c={c}, {args.seconds}s)")
            print(summarize(out / f"{name}.txt"))
        load.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
