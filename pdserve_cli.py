"""The one `pdserve` command: argparse subcommands, each run by its own package.

Every subcommand's flags are defined once, next to the code that reads them, by a parser
factory in a module that does not import JAX; this command builds all of them as argparse
subparsers, so `pdserve --help`, `pdserve SUB --help` and every error message come from one
parser (a wrong subcommand or flag exits 2 and says what was wrong). Only after the whole
command line parsed does it import the subcommand's entry point (JAX included, where the
subcommand needs it) and hand it the subcommand's arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shared.serving.lifetime import die_with_parent


@dataclasses.dataclass(frozen=True, slots=True)
class Subcommand:
    help: str
    parser: str  # "module:function" -> argparse.ArgumentParser (a module free of JAX)
    entry: str  # "module:function" taking the subcommand's argv, returning an exit code
    parser_args: tuple[Any, ...] = ()


# `pdserve worker --role R ...` runs the same entry point as `pdserve R ...`.
WORKER_ROLES = {
    "prefill": "prefill_server.main:main",
    "decode": "decode_server.main:main",
    "colocated": "decode_server.colocated:main",
}
_WORKER_FLAGS = "shared.serving.worker_config:worker_parser"

SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand(
        "a local cluster: orchestrator + worker processes",
        "shared.cluster.local_cluster:build_parser",
        "shared.cluster.local_cluster:main",
    ),
    "generate": Subcommand(
        "stream a completion from an orchestrator",
        "shared.client.cli:build_parser",
        "shared.client.cli:main",
    ),
    "generate-local": Subcommand(
        "prefill + insert + generate in this process; stream to stdout",
        "decode_server.local_generate:build_parser",
        "decode_server.local_generate:main",
    ),
    "orchestrator": Subcommand(
        "run the orchestrator (public Generate API)",
        "orchestrator.config:orchestrator_parser",
        "orchestrator.main:main",
    ),
    "worker": Subcommand(
        f"run a worker: --role {{{','.join(WORKER_ROLES)}}}",
        _WORKER_FLAGS,
        "",  # chosen by --role
        (None,),
    ),
    "prefill": Subcommand(
        "run a prefill worker", _WORKER_FLAGS, WORKER_ROLES["prefill"], ("prefill",)
    ),
    "decode": Subcommand("run a decode worker", _WORKER_FLAGS, WORKER_ROLES["decode"], ("decode",)),
    "convert": Subcommand(
        "HF directory or preset -> orbax checkpoint (optionally int8)",
        "shared.weights.convert_cli:build_parser",
        "shared.weights.convert_cli:main",
    ),
    "bench": Subcommand(
        "load generator against an orchestrator",
        "shared.client.loadgen.cli:build_parser",
        "shared.client.loadgen.cli:main",
    ),
}


def _load(target: str) -> Callable[..., Any]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="pdserve: disaggregated prefill/decode serving for JAX language models.",
        epilog="`pdserve SUBCOMMAND --help` lists the subcommand's flags.",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, sub in SUBCOMMANDS.items():
        own = _load(sub.parser)(*sub.parser_args)
        subparsers.add_parser(
            name,
            parents=[own],  # the flags and -h/--help of the subcommand's own parser
            add_help=False,
            help=sub.help,
            description=own.description or sub.help,
            allow_abbrev=False,
        )
    return parser


def _without_role(argv: list[str]) -> list[str]:
    """`pdserve worker`'s argv minus `--role R` / `--role=R` (the role's entry has none)."""
    for i, arg in enumerate(argv):
        if arg == "--role":
            return argv[:i] + argv[i + 2 :]
        if arg.startswith("--role="):
            return argv[:i] + argv[i + 1 :]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()  # a no-op unless a pdserve parent (`serve`, the tests) started us
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return int(exit_.code or 0)
    name, rest = argv[0], argv[1:]
    entry = SUBCOMMANDS[name].entry
    if name == "worker":
        entry, rest = WORKER_ROLES[args.role], _without_role(rest)
    return int(_load(entry)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
