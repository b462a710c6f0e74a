"""Every worker flag, declared once (shared/flags.py says how a declaration is used), and
the flags every pdserve server shares with the orchestrator.

`roles` says which workers read a flag, decided by the code that reads its WorkerConfig
field: prefill_server/ (the chunked-prefill loop, the KV push), decode_server/ (slots,
the KV pool, the KV inbox, token streams) and shared/serving/runtime.py (load, sizing,
warm-up). A prefill worker never builds a decode KV pool or steps decode batches, so it
takes no `--slots`, `--kv-pages`, `--attention` or `--warm-up`; only prefill roles queue
prompts (`--max-queue`) or run the prefix cache; only a prefill worker pushes KV over
the wire (`--kv-chunk-kib`, `--transfer-timeout-s`).

`chart`: the values.yaml key the Helm chart renders the flag from (`<role>` is the role's
block); charts/pdserve/FLAGS.md is the table below as Markdown (tests keep it current).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from shared.flags import (
    ORCHESTRATOR,
    SERVER_ROLES,
    WORKER_ROLES,
    Flag,
    PerRole,
    RoleChoice,
    Serve,
    add_flags,
    format_int_list,
    format_int_or_auto,
    int_list,
    int_or_auto,
)
from shared.weights.flags import FLOAT_LM_HEAD, MODEL, QUANTIZE

DECODING = ("decode", "colocated")  # hold slots and a decode KV pool
PREFILLING = ("prefill", "colocated")  # queue prompts, chunk them, keep a prefix cache
PORTS = PerRole({"prefill": 50061, "decode": 50062, "colocated": 50063, ORCHESTRATOR: 50051})
METRICS_PORTS = PerRole({"prefill": 9161, "decode": 9162, "colocated": 9163, ORCHESTRATOR: 9160})
COMPILATION_CACHE_ENV = "PDSERVE_COMPILATION_CACHE_DIR"
TLS = "mTLS between components"
ROLE_HELP = {
    "prefill": "prefill worker: prompts -> KV caches pushed to decode workers",
    "decode": "decode worker: slots stepped together (continuous batching)",
    "colocated": "both phases in one process, no KV serialization (the baseline)",
}
GROUPS = {
    TLS: "All three files, or none (plaintext, for local runs). With them this worker serves "
    "TLS, accepts only clients whose certificate chains to --tls-ca, and presents its own "
    "certificate to the decode workers it pushes KV to. Files are re-read when they change "
    "(certificate rotation) without dropping live streams.",
}


def default_compilation_cache_dir() -> Path:
    """Where `pdserve serve` keeps compiled programs: $JAX_COMPILATION_CACHE_DIR when set
    (JAX's own variable), else pdserve's folder in the user's cache directory."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "pdserve" / "jax"


# Every server: where it listens, its connections, its drain (README: Reliability).
SERVER_FLAGS = (
    Flag("--host", "address to bind", default="0.0.0.0", roles=SERVER_ROLES),
    Flag(
        "--port",
        "gRPC port",
        type=int,
        default=PORTS,
        roles=SERVER_ROLES,
        chart="<role>.port",
        serve=Serve(to=(ORCHESTRATOR,)),
    ),
    Flag(
        "--metrics-port",
        "/metrics port (0: any free; -1: none)",
        type=int,
        default=METRICS_PORTS,
        roles=SERVER_ROLES,
        chart="<role>.metricsPort",
        serve=Serve(to=(ORCHESTRATOR,)),
    ),
    Flag(
        "--health-port",
        "also serve grpc.health.v1 alone, plaintext, on this port (Kubernetes' gRPC probes "
        "cannot speak TLS); -1: none",
        type=int,
        default=-1,
        roles=SERVER_ROLES,
        chart="<role>.healthPort",
    ),
    Flag(
        "--keepalive-time-s",
        "ping an idle connection this often",
        type=float,
        default=10.0,
        roles=SERVER_ROLES,
        chart="connections.keepaliveTimeS",
    ),
    Flag(
        "--keepalive-timeout-s",
        "drop a connection whose ping gets no answer this long",
        type=float,
        default=5.0,
        roles=SERVER_ROLES,
        chart="connections.keepaliveTimeoutS",
    ),
    Flag(
        "--max-connection-age-s",
        "send GOAWAY to connections this old (clients reconnect: new TLS handshake)",
        type=float,
        default=3600.0,
        roles=SERVER_ROLES,
        chart="connections.maxConnectionAgeS",
    ),
    Flag(
        "--max-connection-age-grace-s",
        "then end the calls still running on them after this long",
        type=float,
        default=600.0,
        roles=SERVER_ROLES,
        chart="connections.maxConnectionAgeGraceS",
    ),
    Flag(
        "--drain-grace-s",
        "SIGTERM: how long live work may run before it is cancelled",
        type=float,
        default=30.0,
        roles=SERVER_ROLES,
        chart="<role>.drainGraceS",
    ),
)
# The orchestrator's own flags that `pdserve serve` also takes (shared, so that it can).
SERVED_ORCHESTRATOR_FLAGS = (
    Flag(
        "--http-port",
        "OpenAI-compatible HTTP API port (0: any free port; -1: off, the default)",
        type=int,
        default=-1,
        roles=(ORCHESTRATOR,),
        chart="orchestrator.http.port",
        serve=Serve(),
    ),
    Flag(
        "--auth-token-file",
        "frontends must send `authorization: Bearer <token>` with the token in this file",
        type=Path,
        roles=(ORCHESTRATOR,),
        chart="orchestrator.auth",
        serve=Serve(),
    ),
)

WORKER_FLAGS = (
    MODEL,
    QUANTIZE,
    FLOAT_LM_HEAD,
    *SERVER_FLAGS,
    Flag(
        "--dtype",
        "compute dtype; auto: float32 on CPU, bfloat16 on TPU/GPU",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        chart="model.dtype",
    ),
    Flag(
        "--tensor-parallel",
        "shard the model over this many local devices (default: all of them)",
        type=int,
        chart="<role>.tpu.chipsPerHost",
    ),
    Flag(
        "--slots",
        "decode slots, or auto (from memory)",
        type=int_or_auto,
        default=8,
        roles=DECODING,
        chart="<role>.slots",
        format=format_int_or_auto,
        serve=Serve(),
    ),
    Flag(
        "--prefill-buckets",
        "prompt lengths compiled for; the largest is the longest prompt (and the default "
        "prefill chunk)",
        type=int_list,
        default=(16, 32, 64, 128),
        chart="<role>.prefillBuckets",
        format=format_int_list,
        serve=Serve(),
    ),
    Flag(
        "--max-seq-len",
        "prompt + generated tokens, or auto (from memory, at most the model's context)",
        type=int_or_auto,
        default=256,
        chart="<role>.maxSeqLen",
        format=format_int_or_auto,
        serve=Serve(),
    ),
    Flag(
        "--page-size",
        "positions per KV cache page (the prefix cache's and the routing index's block)",
        type=int,
        default=16,
        chart="kvCache.pageSize",
        serve=Serve(),
    ),
    Flag(
        "--kv-pages",
        "KV cache pages in the decode pool: a number, auto (from the devices' memory), or 0 "
        "(default: enough for every slot at --max-seq-len)",
        type=int_or_auto,
        default=0,
        roles=DECODING,
        chart="<role>.kvPages",
        format=format_int_or_auto,
    ),
    Flag(
        "--attention",
        "decode attention kernel; auto: Pallas on TPU, XLA elsewhere",
        default="auto",
        choices=("auto", "xla", "pallas"),
        roles=DECODING,
        chart="<role>.attention",
    ),
    Flag(
        "--kv-memory-fraction",
        "with auto sizing: the share of each device's memory pdserve may use",
        type=float,
        default=0.9,
        chart="<role>.kvMemoryFraction",
    ),
    Flag(
        "--memory-headroom-mib",
        "with auto sizing: memory left per device for compiled programs",
        type=float,
        default=1024.0,
        chart="<role>.memoryHeadroomMiB",
    ),
    Flag(
        "--max-queue",
        "prefill requests waiting before RESOURCE_EXHAUSTED",
        type=int,
        default=64,
        roles=PREFILLING,
        chart="<role>.maxQueue",
    ),
    Flag(
        "--prefill-chunk",
        "tokens of a prompt computed per call (default: the largest prefill bucket); longer "
        "prompts take several calls, interleaved with others",
        type=int,
        roles=PREFILLING,
        chart="<role>.chunkedPrefill.chunk",
    ),
    Flag(
        "--prefill-max-rows",
        "prompts packed into one call, one chunk each (1: no packing)",
        type=int,
        default=4,
        roles=PREFILLING,
        chart="<role>.chunkedPrefill.maxRows",
    ),
    Flag(
        "--colocated-prefill",
        "how a colocated worker runs its prefill: 'mixed', its chunks inside the decode "
        "steps on one engine thread; 'thread', an engine thread of its own beside the decode "
        "one (on CPU its programs fill the cores a decode step leaves idle: bench/README.md); "
        "'auto': 'thread' on CPU, 'mixed' on accelerators",
        default="auto",
        choices=("auto", "mixed", "thread"),
        roles=("colocated",),
        chart="colocated.prefill",
    ),
    Flag(
        "--batch-tokens",
        "tokens per engine call when a colocated worker mixes prefill into its decode steps: "
        "the decode rows first (one token each), then whole prefill chunks while the call "
        "stays within this (at least one chunk; 0: the slots plus one chunk)",
        type=int,
        default=0,
        roles=("colocated",),
        chart="colocated.batchTokens",
    ),
    Flag(
        "--prefix-cache-mib",
        "memory for KV pages of recent prompts reused by later prompts that start the same "
        "way (least recently used evicted first; 0: no prefix cache)",
        type=float,
        default=64.0,
        roles=PREFILLING,
        chart="<role>.chunkedPrefill.prefixCacheMiB",
    ),
    Flag(
        "--prefill-aging-s",
        "shortest prompt first, except that a prompt waiting this long goes first whatever "
        "its length",
        type=float,
        default=2.0,
        roles=PREFILLING,
        chart="<role>.chunkedPrefill.agingS",
    ),
    Flag(
        "--max-kv-mib",
        "largest KV payload accepted from a prefill worker",
        type=float,
        default=1024.0,
        roles=DECODING,
        chart="<role>.maxKvMiB",
    ),
    Flag(
        "--max-unsent-batches",
        "token batches (one per step) a StreamTokens caller may leave unread; past that its "
        "lease is cancelled, its slot freed, the stream ends RESOURCE_EXHAUSTED",
        type=int,
        default=256,
        roles=DECODING,
    ),
    Flag("--max-message-mib", "gRPC message limit", type=float, default=8.0),
    Flag("--kv-chunk-kib", "KV push: chunk size", type=int, default=1024, roles=("prefill",)),
    Flag(
        "--transfer-timeout-s",
        "KV push: the longest one TransferKV call may take",
        type=float,
        default=60.0,
        roles=("prefill",),
    ),
    Flag("--weights-seed", "presets only: the seed of their random weights", type=int, default=0),
    Flag(
        "--compilation-cache-dir",
        "keep compiled programs here and reuse them on the next start (a restart skips most "
        f"of the compiling); empty: off. Default: ${COMPILATION_CACHE_ENV}, else off. "
        "Trusted content: share it only with processes you trust.",
        env=COMPILATION_CACHE_ENV,
        chart="compilationCache.mountPath",
        serve=Serve(
            default=lambda: os.environ.get(
                COMPILATION_CACHE_ENV, str(default_compilation_cache_dir())
            ),
            why="on, in $JAX_COMPILATION_CACHE_DIR or ~/.cache/pdserve/jax (a user's own "
            "machine: the next `pdserve serve` skips most of the compiling)",
        ),
    ),
    Flag(
        "--warm-up",
        "largest (default): compile the largest decode batch before serving and the others "
        "while serving (until each is ready, requests use the next larger one); all: "
        "compile every batch before serving",
        default="largest",
        choices=("largest", "all"),
        roles=DECODING,
    ),
    Flag("--tls-cert", "this worker's certificate chain (PEM)", type=Path, group=TLS),
    Flag("--tls-key", "its private key (PEM)", type=Path, group=TLS),
    Flag("--tls-ca", "the internal CA every peer must chain to", type=Path, group=TLS),
    Flag(
        "--tls-server-name",
        "the name other workers' certificates carry, when they are dialled by IP (e.g. the "
        "headless Service's DNS name); default: the dialled host",
        group=TLS,
        chart="tls.internal.serverName",
    ),
)
# Every declaration above is for some worker (a server flag may be for the orchestrator
# too); worker_parser adds only the worker roles' part of it.
assert all(set(f.roles) & set(WORKER_ROLES) for f in WORKER_FLAGS)


def worker_parser(role: str | None) -> argparse.ArgumentParser:
    """The flags of `pdserve prefill|decode|worker`; `role` None adds `--role` and checks
    each flag against it."""
    role = getattr(role, "value", role)  # a Role member or its name
    prog = "pdserve worker" if role is None else f"pdserve {role}"
    roles = "; ".join(f"{r}: {text}" for r, text in ROLE_HELP.items())
    description = f"Run a worker ({roles})." if role is None else f"Run a {ROLE_HELP[role]}."
    # allow_abbrev=False: a typo in a flag must fail, not silently match a longer one.
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    if role is None:
        p.add_argument(
            "--role",
            action=RoleChoice,
            choices=WORKER_ROLES,
            required=True,
            help="which worker to run: " + ", ".join(WORKER_ROLES),
        )
    add_flags(p, WORKER_FLAGS, role, GROUPS)
    return p


# What `pdserve serve` takes and passes on (shared/cluster/local_cluster.py).
SERVE_FLAGS = tuple(f for f in (*WORKER_FLAGS, *SERVED_ORCHESTRATOR_FLAGS) if f.serve is not None)
_BY_NAME = {flag.name: flag for flag in WORKER_FLAGS}


def for_role(role: str, argv: Sequence[str]) -> list[str]:
    """`argv`, worker flags meant for several roles at once (a test or bench cluster's
    engine flags), without the flags `role` does not read and their values."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        flag = _BY_NAME.get(word.split("=", 1)[0]) if word.startswith("--") else None
        if flag is None or role in flag.roles:
            out.append(word)
        elif not flag.switch and "=" not in word:
            next(words, None)  # its value goes with it
    return out
