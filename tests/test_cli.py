"""The one `pdserve` command: help for every subcommand, clear usage errors, and no JAX
for the commands that do not need it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pdserve_cli
from tests.worker_harness import REPO


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]):
    assert pdserve_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in pdserve_cli.SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(pdserve_cli.SUBCOMMANDS))
def test_every_subcommand_prints_help_and_exits_0(name: str, capsys):
    assert pdserve_cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pdserve {name}")
    assert "--" in out  # its flags are listed


def test_worker_help_lists_its_roles(capsys: pytest.CaptureFixture[str]):
    assert pdserve_cli.main(["worker", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--role {prefill,decode,colocated}" in out
    for role in ("prefill", "decode", "colocated"):
        assert f"{role}:" in out  # described, not only named


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "usage: pdserve"),
        (["nope"], "invalid choice: 'nope'"),
        (["generate", "--bogus"], "unrecognized arguments: --bogus"),
        (["worker", "--port", "0"], "the following arguments are required: --role"),
        (["worker", "--role", "cook"], "invalid choice: 'cook'"),
        # No abbreviations: a typo must not silently match a longer flag.
        (["orchestrator", "--prefil", "a:1"], "unrecognized arguments: --prefil"),
        (["decode", "--slots", "many"], "expected an integer or 'auto', got 'many'"),
    ],
)
def test_usage_errors_exit_2_and_say_what_was_wrong(argv, message, capsys):
    assert pdserve_cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["bench", "--help"]])
def test_help_does_not_import_jax(argv: list[str]):
    """Help and the client commands stay instant: JAX is imported only by the subcommands
    that run a model, and only once their flags parsed."""
    code = (
        "import sys, pdserve_cli\n"
        f"rc = pdserve_cli.main({argv!r})\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'orbax', 'aqt') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'RC', rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY [] RC 0" in done.stdout, done.stdout[-500:]


def test_worker_role_goes_to_that_roles_entry_point():
    assert pdserve_cli._without_role(["--role", "decode", "--port", "1"]) == ["--port", "1"]
    assert pdserve_cli._without_role(["--port", "1", "--role=prefill"]) == ["--port", "1"]
    assert set(pdserve_cli.WORKER_ROLES) == {"prefill", "decode", "colocated"}
