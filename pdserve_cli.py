"""The one `pdserve` command: it parses only the subcommand and hands the rest of argv to
that subcommand's entry point, imported lazily so `pdserve --help` does not load JAX."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> ("module:function", one-line help). Each function takes argv (list[str])
# and returns a process exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate-local": (
        "shared.serving.local_generate:main",
        "prefill + insert + generate in this process; stream text to stdout",
    ),
    "convert": ("shared.weights.convert_cli:main", "HF directory -> orbax checkpoint (opt. int8)"),
    "prefill": ("prefill_server.main:main", "run a prefill worker"),
    "decode": ("decode_server.main:main", "run a decode worker"),
    "worker": ("", "run a worker: --role prefill|decode|colocated"),
    "orchestrator": ("orchestrator.main:main", "run the orchestrator (public Generate API)"),
    "generate": ("shared.client.cli:main", "stream a completion from an orchestrator"),
    "serve": ("orchestrator.local_cluster:main", "a local cluster: orchestrator + workers"),
    "bench": ("shared.client.loadgen.cli:main", "load generator against an orchestrator"),
}

# `pdserve worker --role R ...` is `pdserve R ...` (colocated has no subcommand of its own).
WORKER_ROLES = {
    "prefill": "prefill_server.main:main",
    "decode": "decode_server.main:main",
    "colocated": "decode_server.colocated:main",
}


def _worker_entry(rest: list[str]) -> tuple[str, list[str]]:
    """Find `--role R` / `--role=R` in the worker's flags; keep the rest for the role."""
    for i, arg in enumerate(rest):
        if arg == "--role" and i + 1 < len(rest):
            role, remaining = rest[i + 1], rest[:i] + rest[i + 2 :]
            break
        if arg.startswith("--role="):
            role, remaining = arg.split("=", 1)[1], rest[:i] + rest[i + 1 :]
            break
    else:
        raise SystemExit(f"pdserve worker: --role is required ({'|'.join(WORKER_ROLES)})")
    if role not in WORKER_ROLES:
        raise SystemExit(f"pdserve worker: unknown --role {role!r} ({'|'.join(WORKER_ROLES)})")
    return WORKER_ROLES[role], remaining


def usage() -> str:
    lines = ["usage: pdserve SUBCOMMAND [ARGS...]", "", "subcommands:"]
    width = max(len(name) for name in SUBCOMMANDS)
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`pdserve SUBCOMMAND --help` for the subcommand's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"pdserve: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    if name == "worker":
        target, rest = _worker_entry(rest)
    module_name, func_name = target.split(":")
    entry = getattr(importlib.import_module(module_name), func_name)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
