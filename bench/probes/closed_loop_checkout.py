"""The closed-loop workload against another checkout's `pdserve serve`: the same-hour
yardstick for bench/closed_loop_bench.py.

    git worktree add /tmp/then e642041
    python bench/probes/closed_loop_checkout.py --checkout /tmp/then --mode disaggregated \
        --out FILE.json

The checkout's own `pdserve serve --model smollm2 --slots 32 --max-seq-len 512
--prefill-buckets 16,32,64,128` (plus `--colocated` for that mode) serves; this tree's
`pdserve bench` drives it, with closed_loop_bench's workload and seeds (128 prompt tokens
from [1, 255], 128 outputs, EOS ignored, c = 1, 8, 32, n = max(8, 3c), one unmeasured
warm-up at the top concurrency). The machine's speed drifts between days by up to 2x, so
the figures an issue recorded on another day are compared through the code it measured,
run in the same hour as the code under test. Only the client-side figures: an older
checkout's metrics may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closed_loop_bench import build_parser, requests_for, run_loadgen

SERVE_FLAGS = ["--model", "smollm2", "--slots", "32", "--max-seq-len", "512"]
SERVE_FLAGS += ["--prefill-buckets", "16,32,64,128"]
READY = re.compile(r"ready on (\S+?):?(\s|$)")


def start(checkout: Path, mode: str) -> tuple[subprocess.Popen, str]:
    """The checkout's `pdserve serve` and the address its ready line names."""
    argv = [sys.executable, "-m", "pdserve_cli", "serve", *SERVE_FLAGS]
    argv += ["--colocated"] if mode == "colocated" else []
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(checkout))
    proc = subprocess.Popen(
        argv,
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:  # keep draining: a full pipe would block the cluster
        for line in proc.stdout:
            if not ready.is_set() and (match := READY.search(line)):
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(600) or not found:
        stop(proc)
        raise RuntimeError(f"{checkout}: pdserve serve did not become ready")
    return proc, found[0]


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--mode", choices=("disaggregated", "colocated"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    workload = build_parser().parse_args([])  # closed_loop_bench's defaults: seed, vocab
    proc, target = start(args.checkout.resolve(), args.mode)
    rows = []
    try:
        run_loadgen(target, 32, 32, workload.seed + 10**6, workload)
        for concurrency in (1, 8, 32):
            load = os.getloadavg()[0]
            requests = requests_for(concurrency, workload.requests_scale)
            seed = workload.seed + concurrency
            report = run_loadgen(target, concurrency, requests, seed, workload)
            row = {"mode": args.mode, "concurrency": concurrency, "requests": requests}
            row |= {"load_avg_before": load, "output_tok_s": report["output_token_throughput"]}
            for metric in ("ttft", "tpot"):
                for q in ("p50", "p99"):
                    row[f"{metric}_{q}_ms"] = report[f"{metric}_ms"][q]
            row["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        stop(proc)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.checkout, capture_output=True, text=True
    ).stdout.strip()
    Path(args.out).write_text(json.dumps({"checkout": commit, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
