"""The Dockerfile, checked without a Docker engine: its structure (multi-stage, non-root,
no build tools at runtime), that what it copies exists and is not docker-ignored, and
that the commands it runs exist in the package and are accepted by the CLI."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

import pdserve_cli
from orchestrator.config import DEFAULT_METRICS_PORT, DEFAULT_PORT
from shared.serving.worker_config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

# Packages and programs that compile code; none may be installed in the runtime stage.
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "cmake", "cargo", "rustc")


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuations joined

    def args(self, instruction: str) -> list[str]:
        return [arg for ins, arg in self.instructions if ins == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile; enough of the syntax for ours."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert match, f"unparsed FROM {rest!r}"
            stages.append(Stage(match[1], match[2], []))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD must use the JSON (exec) form: signals reach pdserve, not a shell."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def test_multi_stage_on_a_slim_python_base(dockerfile: tuple[dict[str, str], list[Stage]]):
    global_args, stages = dockerfile
    assert len(stages) >= 2
    runtime = stages[-1]
    build_names = {s.name for s in stages[:-1]}
    copied_from = [
        m[1] for arg in runtime.args("COPY") for m in [re.search(r"--from=(\S+)", arg)] if m
    ]
    assert copied_from and set(copied_from) <= build_names, "runtime copies from a build stage"
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], stage.base)
        assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?", base), base


def test_builder_installs_the_tpu_extra_from_the_source_tree(
    dockerfile: tuple[dict[str, str], list[Stage]],
):
    _, stages = dockerfile
    runs = " ".join(arg for stage in stages[:-1] for arg in stage.args("RUN"))
    installs = re.findall(r"pip install\s+(?:-\S+\s+)*('[^']*'|\S+)", runs)
    assert "'.[tpu]'" in installs, installs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "tpu" in pyproject["project"]["optional-dependencies"]


def test_runtime_stage_has_no_build_tools_and_no_installs(
    dockerfile: tuple[dict[str, str], list[Stage]],
):
    runtime = dockerfile[1][-1]
    for run in runtime.args("RUN"):
        words = set(shlex.split(run.replace("&&", " ")))
        assert not words & set(BUILD_TOOLS), run
        assert "pip" not in words and "apt-get" not in words, run


def test_runtime_runs_as_a_fixed_non_root_uid_the_chart_matches(
    dockerfile: tuple[dict[str, str], list[Stage]],
):
    runtime = dockerfile[1][-1]
    users = runtime.args("USER")
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    security = yaml.safe_load((ROOT / "charts/pdserve/values.yaml").read_text())["security"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert any(f"--uid {uid}" in run for run in runtime.args("RUN")), "the user must exist"


def test_entrypoint_is_the_pdserve_script_and_cmd_is_accepted(
    dockerfile: tuple[dict[str, str], list[Stage]], capsys: pytest.CaptureFixture[str]
):
    runtime = dockerfile[1][-1]
    assert exec_form(runtime.args("ENTRYPOINT")[-1]) == ["pdserve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pdserve"] == "pdserve_cli:main"
    cmd = exec_form(runtime.args("CMD")[-1])
    assert pdserve_cli.main(cmd) == 0
    assert "SUBCOMMAND" in capsys.readouterr().out


def test_build_smoke_check_runs_an_existing_command(
    dockerfile: tuple[dict[str, str], list[Stage]],
):
    runs = [arg for stage in dockerfile[1][:-1] for arg in stage.args("RUN")]
    # `pdserve ...` in command position: at the start of a RUN or after && ; ||
    invocations = [
        m for run in runs for m in re.findall(r"(?:^|&&|;|\|\|)\s*pdserve\s+([^&|;>]+)", run)
    ]
    assert invocations, "the builder should smoke-check the installed `pdserve` command"
    for invocation in invocations:
        argv = shlex.split(invocation)
        assert argv[0] in ("--help", "-h") or argv[0] in pdserve_cli.SUBCOMMANDS, argv


def test_copied_sources_exist_and_are_not_dockerignored(
    dockerfile: tuple[dict[str, str], list[Stage]],
):
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied: set[str] = set()
    for stage in dockerfile[1]:
        for arg in stage.args("COPY"):
            if arg.startswith("--from="):
                continue
            *sources, _dest = arg.split()
            copied.update(sources)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    # Every package setuptools installs must be in the build context it sees.
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"
    for module in pyproject["tool"]["setuptools"]["py-modules"]:
        assert f"{module}.py" in copied
    assert pyproject["project"]["readme"] in copied


def test_exposed_ports_are_the_code_defaults(dockerfile: tuple[dict[str, str], list[Stage]]):
    exposed = {int(p) for arg in dockerfile[1][-1].args("EXPOSE") for p in arg.split()}
    expected = {DEFAULT_PORT, DEFAULT_METRICS_PORT, *DEFAULT_PORTS.values()}
    expected |= set(DEFAULT_METRICS_PORTS.values())
    assert exposed == expected
