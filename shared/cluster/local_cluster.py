"""`pdserve serve`: a whole cluster on loopback, each role its own process.

1. Start the workers (`--prefill-workers` prefill + `--decode-workers` decode, or one
   colocated worker with `--colocated`) on free ports; their startup progress (loading,
   compiling) is shown as it happens.
2. Start the orchestrator in front of them on `--port`, `/metrics` on `--metrics-port`.
3. Stay up until Ctrl-C / SIGTERM, then SIGTERM every process (each drains) and wait.
   With `--once PROMPT`, stream one answer from the cluster instead, then shut down.

Only commands are started here; no server package is imported.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from shared.cluster.cluster import WORKER_ROLES, Cluster, ClusterSpec
from shared.flags import add_serve_flags, serve_argv
from shared.serving.flags import SERVE_FLAGS, default_compilation_cache_dir

__all__ = ["build_parser", "default_compilation_cache_dir", "main", "worker_engine_args"]


def build_parser() -> argparse.ArgumentParser:
    """serve's own flags, then the worker and orchestrator flags it passes through
    (declared with them: shared/serving/flags.py), each to the processes that read it."""
    p = argparse.ArgumentParser(
        prog="pdserve serve", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--colocated", action="store_true", help="one colocated worker (baseline)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--once", metavar="PROMPT", help="stream one answer, then shut down")
    p.add_argument(
        "--chat", action="store_true", help="with --once: send PROMPT as a user chat message"
    )
    p.add_argument("--max-tokens", type=int, default=48, help="with --once")
    add_serve_flags(p, SERVE_FLAGS)
    return p


def worker_engine_args(args: argparse.Namespace, role: str) -> list[str]:
    """The model and engine flags a `role` worker of the cluster gets: each pass-through
    flag that role reads."""
    return serve_argv(args, SERVE_FLAGS, role)


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """The workers (each role with the pass-through flags it reads) and an orchestrator on
    the user's ports, every process's output relayed."""
    if args.colocated:
        counts = {"prefill": 0, "decode": 0, "colocated": 1}
    else:
        counts = {"prefill": args.prefill_workers, "decode": args.decode_workers}
    return ClusterSpec(
        **counts,
        role_flags={role: worker_engine_args(args, role) for role in WORKER_ROLES},
        # --model, --port, --metrics-port, --http-port, --auth-token-file: after the
        # harness's loopback port 0, so the user's ports are the ones taken.
        orchestrator_flags=serve_argv(args, SERVE_FLAGS, "orchestrator"),
        relay=True,
        startup_timeout_s=args.startup_timeout_s,
    )


def announce(cluster: Cluster) -> None:
    target = cluster.target
    print(f'pdserve cluster ready on {target}: pdserve generate --target {target} "Hello"')
    if cluster.orchestrator is not None and cluster.orchestrator.http_port >= 0:
        print(f"OpenAI-compatible API: {cluster.http_url}/v1")
    sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    cluster = None
    try:
        cluster = Cluster.start(cluster_spec(args))  # workers load and compile in parallel
        announce(cluster)
        if args.once is not None:
            return _once(cluster.target, args)
        while not stopping.is_set():
            stopping.wait(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("[pdserve] shutting the cluster down", file=sys.stderr, flush=True)
        if cluster is not None:
            cluster.stop()


def _once(target: str, args: argparse.Namespace) -> int:
    from shared.client.generator import GeneratorClient

    token = Path(args.auth_token_file).read_text().strip() if args.auth_token_file else None
    with GeneratorClient(target, token) as client:
        prompt = [{"role": "user", "content": args.once}] if args.chat else args.once
        for chunk in client.generate(prompt, max_tokens=args.max_tokens):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                print(f"\n[finish: {chunk.finish_reason}, {chunk.completion_tokens} tokens]")
    return 0
