"""Command-line flags as data: each `Flag` is declared once, with its type, default, help,
the processes (roles) that read it, the Helm chart's values key it is rendered from, and
whether `pdserve serve` passes it through. The worker and orchestrator parsers,
`pdserve serve`'s pass-through flags and the chart's flag reference are all built from
these declarations (tables in shared/serving/flags.py and orchestrator/config.py).

A role's parser accepts exactly the flags that role reads. The other roles' flags are
there too, hidden, only to fail: `pdserve prefill --slots 4` exits 2 saying that --slots
is not a prefill flag and which roles read it. The parser of `pdserve worker --role R`
(no fixed role) checks each flag against R, whichever comes first on the command line.

Standard library only (no JAX): `pdserve --help`, the orchestrator and the chart tests
build parsers from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

WORKER_ROLES = ("prefill", "decode", "colocated")
ORCHESTRATOR = "orchestrator"
SERVER_ROLES = (*WORKER_ROLES, ORCHESTRATOR)
# Namespace attribute: the role-specific flags given so far (checked when --role comes).
_GIVEN = "_role_flags_given"


@dataclasses.dataclass(frozen=True, slots=True)
class PerRole:
    """A default that depends on the role (e.g. each role's port)."""

    values: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Serve:
    """`pdserve serve` takes this flag and passes it to its `to` processes (default: every
    role of the flag). `default`: serve's own default where it deliberately differs from
    the role's (a value, or a function called when the parser is built), `why` says why."""

    to: tuple[str, ...] | None = None
    default: Any = None
    why: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Flag:
    name: str  # "--page-size"
    help: str
    type: Callable[[str], Any] | None = None  # None: the text itself
    default: Any = None  # a value, or PerRole
    roles: tuple[str, ...] = WORKER_ROLES  # the processes that read it
    choices: tuple[str, ...] | None = None
    switch: bool = False  # takes no value: present means True
    env: str | None = None  # the default comes from this environment variable when set
    group: str | None = None  # the --help section it is listed under
    chart: str | None = None  # the values.yaml key the chart renders it from
    serve: Serve | None = None  # None: `pdserve serve` does not take it
    format: Callable[[Any], str] = str  # a parsed value back to command-line text
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    def default_for(self, role: str | None) -> Any:
        """The default for `role` (None: no role known yet; a per-role default is None)."""
        if self.env is not None and self.env in os.environ:
            return os.environ[self.env]
        if isinstance(self.default, PerRole):
            return None if role is None else self.default.values[role]
        return self.default

    def argv(self, value: Any) -> list[str]:
        """`value` as command-line words (a switch: its name when true). None means not
        given (nothing) unless the flag's format spells it ("auto")."""
        if self.switch:
            return [self.name] if value else []
        if value is None and self.format is str:
            return []
        return [self.name, self.format(value)]

    def serve_default(self) -> Any:
        assert self.serve is not None, self.name
        if self.serve.default is None:
            return self.default_for(self.serve_to[0])
        return self.serve.default() if callable(self.serve.default) else self.serve.default

    @property
    def serve_to(self) -> tuple[str, ...]:
        assert self.serve is not None, self.name
        return self.serve.to or self.roles


def not_read_by(name: str, role: str, roles: Sequence[str]) -> str:
    """The usage error of a flag given to a role that does not read it."""
    workers = [r for r in roles if r in WORKER_ROLES]
    readers = [f"{' and '.join(workers)} workers"] if workers else []
    readers += [r for r in roles if r not in WORKER_ROLES]
    return f"{name} is not a {role} flag: only {' and the '.join(readers)} read it"


class _RoleFlag(argparse.Action):
    """Stores a flag's value (a switch: True); refuses it where the role does not read it.
    `role`: the parser's fixed role, or None to check the namespace's --role."""

    def __init__(self, *args: Any, roles: Sequence[str], role: str | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.roles, self.role = tuple(roles), role

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        role = self.role or getattr(namespace, "role", None)
        if role is not None and role not in self.roles:
            parser.error(not_read_by(self.option_strings[0], role, self.roles))
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        if self.role is None:
            given = getattr(namespace, _GIVEN, ())
            setattr(namespace, _GIVEN, (*given, (self.option_strings[0], self.roles)))


class RoleChoice(argparse._StoreAction):
    """`--role`: also refuses the role-specific flags given before it that it does not read."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        super().__call__(parser, namespace, values, option_string)
        for name, roles in getattr(namespace, _GIVEN, ()):
            if values not in roles:
                parser.error(not_read_by(name, values, roles))


def add_flags(
    parser: argparse.ArgumentParser,
    flags: Iterable[Flag],
    role: str | None,
    groups: Mapping[str, str] | None = None,
) -> None:
    """Add `flags` for `role` (None: every flag, each checked against --role); flags of
    other roles are hidden and refused. `groups`: a description per --help section."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags:
        target: Any = parser
        if flag.group is not None:
            if flag.group not in sections:
                description = (groups or {}).get(flag.group)
                sections[flag.group] = parser.add_argument_group(flag.group, description)
            target = sections[flag.group]
        reads = role is None or role in flag.roles
        target.add_argument(
            flag.name,
            action=_RoleFlag,
            roles=flag.roles,
            role=role,
            nargs=0 if flag.switch else None,
            type=flag.type if reads else None,
            choices=flag.choices if reads else None,
            default=False if flag.switch else flag.default_for(role),
            help=flag.help if reads else argparse.SUPPRESS,
            metavar=flag.metavar,
        )


def read_by(flags: Iterable[Flag], role: str) -> tuple[Flag, ...]:
    return tuple(flag for flag in flags if role in flag.roles)


def add_serve_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    """`pdserve serve`'s pass-through flags: each with the type and help of the flag it
    passes on, and its default (serve's own where the table gives one, and why)."""
    for flag in flags:
        if flag.serve is None:
            continue
        to = ", ".join(flag.serve_to)
        why = f"; here: {flag.serve.why}" if flag.serve.why else ""
        kwargs: dict[str, Any] = {"action": "store_true", "default": False}
        if not flag.switch:
            kwargs = {"type": flag.type, "choices": flag.choices, "metavar": flag.metavar}
            kwargs["default"] = flag.serve_default()
        parser.add_argument(flag.name, help=f"{flag.help} [passed to: {to}{why}]", **kwargs)


def serve_argv(args: argparse.Namespace, flags: Iterable[Flag], role: str) -> list[str]:
    """The pass-through flags `pdserve serve` gives a `role` process, from its `args`."""
    out: list[str] = []
    for flag in flags:
        if flag.serve is not None and role in flag.serve_to:
            out += flag.argv(getattr(args, flag.dest))
    return out


def reference(flags: Iterable[Flag], roles: Sequence[str]) -> str:
    """A Markdown table of `flags`: default, the roles that read each, its values key."""
    rows = [
        "| flag | default | " + " | ".join(roles) + " | values key | pdserve serve |",
        "| --- | --- | " + " | ".join("---" for _ in roles) + " | --- | --- |",
    ]
    for flag in flags:
        if isinstance(flag.default, PerRole):
            default = ", ".join(f"{r}: {v}" for r, v in flag.default.values.items())
        elif flag.switch or flag.default is None:
            default = "off" if flag.switch else "none"
        else:
            default = f"`{flag.format(flag.default)}`"
        if flag.env:
            default += f" (or ${flag.env})"
        marks = " | ".join("x" if r in flag.roles else "" for r in roles)
        chart = f"`{flag.chart}`" if flag.chart else ""
        serve = ""
        if flag.serve is not None:
            serve = "to " + ", ".join(flag.serve_to)
            serve += f"; default: {flag.serve.why}" if flag.serve.why else ""
        rows.append(f"| `{flag.name}` | {default} | {marks} | {chart} | {serve} |")
    return "\n".join(rows) + "\n"


def int_or_auto(text: str) -> int | None:
    """An integer, or "auto" (None): sized at startup from the devices' memory."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def format_int_or_auto(value: int | None) -> str:
    return "auto" if value is None else str(value)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def format_int_list(value: Sequence[int]) -> str:
    return ",".join(map(str, value))
