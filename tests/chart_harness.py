"""Rendering the Helm chart (charts/pdserve) with the real `helm`, and reading the
manifests back: pods, their containers' args parsed by the real CLI parsers. Shared by
tests/test_chart.py and tests/test_chart_flags.py.

helm comes from PATH or .tools/helm (`make tools` installs the pinned binary there). If
neither exists the chart tests fail rather than skip: CI must run them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

import pdserve_cli
from orchestrator.config import OrchestratorConfig, orchestrator_parser, parse_orchestrator_args
from shared.serving.worker_config import Role, WorkerConfig, parse_worker_args, worker_parser

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "pdserve"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
BAD_FILES = sorted((ROOT / "charts" / "tests" / "bad-values").glob("*.yaml"))
CRD_SCHEMAS = ROOT / "charts" / "tests" / "schemas"
# Values files that render (unlike bad-values/): scenarios beyond ci/, for the flag checks.
TEST_VALUES = sorted((ROOT / "charts" / "tests" / "values").glob("*.yaml"))
NAMESPACE = "pdserve-test"
RELEASE = "pds"
# The oldest Kubernetes minor GKE's regular channel runs at the time of writing; the
# chart's Chart.yaml kubeVersion allows 1.29+, whose APIs used here are the same.
K8S_VERSION = "1.31"
WORKER_ROLES = ("prefill", "decode", "colocated")
GKE_METRIC = re.compile(r"prometheus\.googleapis\.com\|(\w+)\|gauge")


@functools.cache
def helm_binary() -> str:
    found = shutil.which("helm") or (ROOT / ".tools" / "helm")
    if not Path(found).is_file():
        pytest.fail("no helm: put one on PATH or run `make tools` (installs .tools/helm)")
    return str(found)


def run_helm(helm: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def template(helm: str, values: Path) -> subprocess.CompletedProcess[str]:
    return run_helm(helm, "template", RELEASE, CHART, "-n", NAMESPACE, "-f", values)


@dataclasses.dataclass
class Rendered:
    values: dict[str, Any]  # values.yaml with the ci file merged over it
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        (doc,) = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        return doc

    @property
    def roles(self) -> list[str]:
        return ["colocated"] if self.values["mode"] == "colocated" else ["prefill", "decode"]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's values coalescing: maps merge key by key, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.cache
def render(values: Path) -> Rendered:
    """`values` rendered (once per session) over the chart's values.yaml."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    result = template(helm_binary(), values)
    assert result.returncode == 0, f"{values.name}: {result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return Rendered(deep_merge(defaults, yaml.safe_load(values.read_text())), docs)


def render_all(paths: Sequence[Path]) -> dict[str, Rendered]:
    return {path.stem: render(path) for path in paths}


@dataclasses.dataclass
class Pod:
    workload: dict[str, Any]
    component: str
    template: dict[str, Any]  # a PodTemplateSpec
    serving: bool  # False only for LeaderWorkerSet non-leader pods

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"]["labels"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return container

    def port(self, name: str) -> int:
        (port,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        return port


def pods(rendered: Rendered) -> Iterator[Pod]:
    for doc in rendered.of_kind("Deployment"):
        template = doc["spec"]["template"]
        yield Pod(
            doc, template["metadata"]["labels"]["app.kubernetes.io/component"], template, True
        )
    for doc in rendered.of_kind("LeaderWorkerSet"):
        lwt = doc["spec"]["leaderWorkerTemplate"]
        for template, serving in ((lwt["leaderTemplate"], True), (lwt["workerTemplate"], False)):
            component = template["metadata"]["labels"]["app.kubernetes.io/component"]
            yield Pod(doc, component, template, serving)


def worker_pods(rendered: Rendered) -> list[Pod]:
    return [p for p in pods(rendered) if p.component in WORKER_ROLES]


def orchestrator_pod(rendered: Rendered) -> Pod:
    (pod,) = [p for p in pods(rendered) if p.component == "orchestrator"]
    return pod


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def assert_exact_flags(args: list[str], parser: argparse.ArgumentParser) -> None:
    """argparse accepts unique prefixes (`--max-queu`); the chart must spell flags out, so
    a flag renamed in the code cannot keep "working" through an abbreviation."""
    known = {option for action in parser._actions for option in action.option_strings}
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
    assert set(flags) <= known, sorted(set(flags) - known)


# Flags that name a file the pod reads from a mounted Secret.
FILE_FLAGS = (
    "--auth-token-file",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
    "--tls-client-ca",
    "--internal-tls-cert",
    "--internal-tls-key",
    "--internal-tls-ca",
)


def secret_file(pod: Pod, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The read-only mount and the Secret volume that put `path` in the pod: the mount is
    the file's directory (never a subPath, which the kubelet never updates: a rotated
    certificate would not reach the process)."""
    (mount,) = [m for m in pod.container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    (volume,) = [v for v in pod.spec["volumes"] if v["name"] == mount["name"]]
    items = volume["secret"].get("items")
    if items is not None:  # only these keys: the file must be one of them
        assert path.name in [item["path"] for item in items]
    return mount, volume


def with_stand_ins(pod: Pod, args: list[str], tmp_path: Path) -> list[str]:
    """`args` with every Secret file (checked to be mounted) pointed at a local stand-in:
    the parsers check that the files exist."""
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg in FILE_FLAGS:
            secret_file(pod, Path(args[i + 1]))
            stand_in = tmp_path / arg.lstrip("-")
            stand_in.write_text("t")
            args[i + 1] = str(stand_in)
    return args


def parse_worker(pod: Pod, tmp_path: Path) -> WorkerConfig:
    """What `pdserve ARGS` would run for a worker, parsed by the worker's own parser."""
    args = with_stand_ins(pod, pod.container["args"], tmp_path)
    subcommand, rest = args[0], args[1:]
    assert subcommand in pdserve_cli.SUBCOMMANDS, subcommand
    role = None if subcommand == "worker" else Role(subcommand)
    assert_exact_flags(rest, worker_parser(role))
    return parse_worker_args(rest, role)


def parse_orchestrator(pod: Pod, tmp_path: Path) -> OrchestratorConfig:
    """The orchestrator's args, parsed (Secret files pointed at local stand-ins)."""
    args = with_stand_ins(pod, pod.container["args"], tmp_path)
    assert args[0] == "orchestrator" and "orchestrator" in pdserve_cli.SUBCOMMANDS
    assert_exact_flags(args[1:], orchestrator_parser())
    return parse_orchestrator_args(args[1:])
