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
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from shared.cluster.processes import Child, launch, start, stop_all, wait_ready
from shared.serving.worker_config import add_compilation_cache_argument
from shared.weights.flags import add_quantize_arguments
from shared.weights.packaged import default_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve serve", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=default_model(),
        help="any worker --model; default: smollm2 when its package is installed, else tiny",
    )
    add_quantize_arguments(p)  # --quantize, --float-lm-head: passed to every worker
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--colocated", action="store_true", help="one colocated worker (baseline)")
    p.add_argument("--port", type=int, default=50051, help="the orchestrator's public port")
    p.add_argument("--metrics-port", type=int, default=9160, help="the orchestrator's /metrics")
    p.add_argument(
        "--http-port", type=int, default=-1, help="the OpenAI-compatible HTTP API (-1: off)"
    )
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--prefill-buckets", default="16,32,64,128")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--auth-token-file")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--once", metavar="PROMPT", help="stream one answer, then shut down")
    p.add_argument(
        "--chat", action="store_true", help="with --once: send PROMPT as a user chat message"
    )
    p.add_argument("--max-tokens", type=int, default=48, help="with --once")
    # On by default here (a user's machine, their own cache): the second `pdserve serve`
    # or `make run` skips most of the compiling.
    add_compilation_cache_argument(p, default=str(default_compilation_cache_dir()))
    return p


def default_compilation_cache_dir() -> Path:
    """Where `pdserve serve` keeps compiled programs: $JAX_COMPILATION_CACHE_DIR when set
    (JAX's own variable), else pdserve's folder in the user's cache directory."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "pdserve" / "jax"


def worker_engine_args(args: argparse.Namespace) -> list[str]:
    """The model and engine flags every worker of the cluster gets."""
    engine = [
        "--model",
        args.model,
        "--slots",
        str(args.slots),
        "--prefill-buckets",
        args.prefill_buckets,
        "--max-seq-len",
        str(args.max_seq_len),
        "--compilation-cache-dir",
        args.compilation_cache_dir,
        "--quantize",
        args.quantize,
    ]
    if args.float_lm_head:
        engine.append("--float-lm-head")
    return engine


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    engine = worker_engine_args(args)
    local = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    children: list[Child] = []
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        roles = (
            [("colocated", 1)]
            if args.colocated
            else [("prefill", args.prefill_workers), ("decode", args.decode_workers)]
        )
        # Workers load and compile in parallel.
        children += [
            launch(f"{role}-{i}", ["worker", "--role", role, *local, *engine], relay=True)
            for role, count in roles
            for i in range(count)
        ]
        for child in children:
            wait_ready(child, args.startup_timeout_s)
        orch = [
            "orchestrator",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
            "--metrics-port",
            str(args.metrics_port),
            "--http-port",
            str(args.http_port),
            "--model",
            args.model,
        ]
        for role in ("prefill", "decode", "colocated"):
            addresses = [c.address for c in children if c.name.startswith(role)]
            if addresses:
                orch += [f"--{role}", ",".join(addresses)]
        if args.auth_token_file:
            orch += ["--auth-token-file", args.auth_token_file]
        orchestrator = start("orchestrator", orch, args.startup_timeout_s, relay=True)
        children.append(orchestrator)
        target = orchestrator.address
        print(
            f'pdserve cluster ready on {target}: pdserve generate --target {target} "Hello"',
            flush=True,
        )
        if orchestrator.http_port >= 0:
            print(
                f"OpenAI-compatible API: http://127.0.0.1:{orchestrator.http_port}/v1", flush=True
            )
        if args.once is not None:
            return _once(target, args)
        while not stopping.is_set():
            stopping.wait(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("[pdserve] shutting the cluster down", file=sys.stderr, flush=True)
        stop_all(children)


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
