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
        # Each role takes only the flags it reads; the message names the flag and the role.
        (["prefill", "--slots", "4"], "--slots is not a prefill flag: only decode and"),
        (["decode", "--max-queue", "4"], "--max-queue is not a decode flag: only prefill and"),
        (["worker", "--role", "prefill", "--kv-pages", "9"], "--kv-pages is not a prefill flag"),
        # Before --role too: the flag is checked once the role is known.
        (["worker", "--attention", "xla", "--role", "prefill"], "--attention is not a prefill"),
        (["worker", "--role", "colocated", "--kv-chunk-kib", "8"], "not a colocated flag"),
        (["serve", "--max-queue", "4"], "unrecognized arguments: --max-queue"),
        (["decode", "--page-size", "12"], "page_size=12 must be a power of two"),
        (["decode", "--kv-pages", "-1"], "--kv-pages=-1 must be >= 0"),
        (
            ["decode", "--max-seq-len", "256", "--page-size", "16", "--kv-pages", "9"],
            "num_pages=9 holds 8 pages of 16, fewer than one request of max_seq_len=256",
        ),
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


def test_each_role_takes_the_flags_it_reads(capsys: pytest.CaptureFixture[str]):
    """A role's --help lists its own flags only; every flag is some worker role's."""
    assert pdserve_cli.main(["prefill", "--help"]) == 0
    prefill = capsys.readouterr().out
    assert "--prefix-cache-mib" in prefill and "--max-queue" in prefill
    assert "--slots" not in prefill and "--kv-pages" not in prefill
    assert pdserve_cli.main(["decode", "--help"]) == 0
    decode = capsys.readouterr().out
    assert "--slots" in decode and "--max-unsent-batches" in decode
    assert "--max-queue" not in decode and "--prefix-cache-mib" not in decode
    assert pdserve_cli.main(["worker", "--help"]) == 0
    assert "--slots" in capsys.readouterr().out


def test_serve_passes_worker_flags_with_the_workers_defaults(monkeypatch):
    """`pdserve serve`'s pass-through flags default to what the processes they go to
    default to, except where the declaration gives serve its own default and says why."""
    from orchestrator.config import orchestrator_parser
    from shared.cluster import local_cluster
    from shared.serving.flags import SERVE_FLAGS, worker_parser

    monkeypatch.delenv("PDSERVE_COMPILATION_CACHE_DIR", raising=False)
    serve = vars(local_cluster.build_parser().parse_args([]))
    own = {f.name for f in SERVE_FLAGS if f.serve.default is not None}
    assert own == {"--model", "--compilation-cache-dir"}
    assert all(f.serve.why for f in SERVE_FLAGS if f.name in own)
    for flag in SERVE_FLAGS:
        role = flag.serve_to[0]
        parser = orchestrator_parser() if role == "orchestrator" else worker_parser(role)
        default = vars(parser.parse_args([]))[flag.dest]
        if flag.name not in own:
            assert serve[flag.dest] == default, flag.name
    assert serve["compilation_cache_dir"]  # on here, off in a worker


def test_worker_role_goes_to_that_roles_entry_point():
    assert pdserve_cli._without_role(["--role", "decode", "--port", "1"]) == ["--port", "1"]
    assert pdserve_cli._without_role(["--port", "1", "--role=prefill"]) == ["--port", "1"]
    assert set(pdserve_cli.WORKER_ROLES) == {"prefill", "decode", "colocated"}
