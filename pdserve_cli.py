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
        "shared.local_generate:main",
        "prefill + insert + generate in this process; stream text to stdout",
    ),
    "convert": ("shared.checkpoint_cli:main", "HF directory -> orbax checkpoint (opt. int8)"),
}


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
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), func_name)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
