"""The Helm chart (charts/pdserve), rendered by the real `helm` for every ci/ scenario.

1. `helm lint --strict` passes and `helm template` renders each ci/ values file (once per
   session); every bad values file in charts/tests/bad-values fails, for its stated reason.
2. Every rendered manifest validates strictly against the Kubernetes schemas shipped by
   `kubernetes-validate` (Kubernetes K8S_VERSION), and the CRDs it does not know
   (PodMonitoring, PodMonitor, LeaderWorkerSet) against charts/tests/schemas.
3. The manifests agree with the code: container args parse with the real CLI parsers;
   ports agree between args, container ports, probes, Services and NetworkPolicies; the
   orchestrator's `--*-dns` names are the headless Services that select the serving
   worker pods; HPA metrics are metrics the workers export.

helm comes from PATH or .tools/helm (`make tools` installs the pinned binary there). If
neither exists these tests fail rather than skip: CI must run them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from prometheus_client import CollectorRegistry

import pdserve_cli
from decode_server.slots import SlotState
from orchestrator.config import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    OrchestratorConfig,
    orchestrator_parser,
    parse_orchestrator_args,
)
from shared.metrics import WorkerMetrics
from shared.serving.worker_config import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    Role,
    WorkerConfig,
    parse_worker_args,
    worker_parser,
)
from shared.weights.flags import QUANTIZE_CHOICES

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "pdserve"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
BAD_FILES = sorted((ROOT / "charts" / "tests" / "bad-values").glob("*.yaml"))
CRD_SCHEMAS = ROOT / "charts" / "tests" / "schemas"
NAMESPACE = "pdserve-test"
RELEASE = "pds"
# The oldest Kubernetes minor GKE's regular channel runs at the time of writing; the
# chart's Chart.yaml kubeVersion allows 1.29+, whose APIs used here are the same.
K8S_VERSION = "1.31"
WORKER_ROLES = ("prefill", "decode", "colocated")
GKE_METRIC = re.compile(r"prometheus\.googleapis\.com\|(\w+)\|gauge")


# ---------------------------------------------------------------------------- helm


@pytest.fixture(scope="session")
def helm() -> str:
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


@pytest.fixture(scope="session")
def renders(helm: str) -> dict[str, Rendered]:
    """Each ci/ values file rendered once for the whole session."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    out = {}
    for path in CI_FILES:
        result = template(helm, path)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        values = deep_merge(defaults, yaml.safe_load(path.read_text()))
        out[path.stem] = Rendered(values, docs)
    return out


@pytest.fixture(params=[p.stem for p in CI_FILES])
def rendered(request: pytest.FixtureRequest, renders: dict[str, Rendered]) -> Rendered:
    return renders[request.param]


def test_ci_scenarios_cover_the_deployment_shapes():
    names = {p.stem for p in CI_FILES}
    for scenario in ("cpu-dev", "v5e-single-host", "v6e-single-host", "v5p-multi-host"):
        assert f"{scenario}-values" in names


@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_helm_lint_strict(helm: str, values: Path):
    result = run_helm(helm, "lint", "--strict", CHART, "-n", NAMESPACE, "-f", values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", BAD_FILES, ids=lambda p: p.stem)
def test_bad_values_fail_to_render_for_their_reason(helm: str, values: Path):
    expected = re.search(r"^# expect: (.+)$", values.read_text(), flags=re.MULTILINE)
    assert expected, f"{values.name} must say `# expect: <error text>`"
    result = template(helm, values)
    assert result.returncode != 0, f"{values.name} rendered:\n{result.stdout[:2000]}"
    assert expected[1] in result.stderr, result.stderr


def test_there_are_bad_values_cases():
    assert len(BAD_FILES) >= 8


# ----------------------------------------------------------------- schema checks


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """Our CRD subsets; their pod templates $ref the Kubernetes definitions (strict)."""
    definitions = json.loads(
        (
            Path(kubernetes_validate.__file__).parent
            / "kubernetes-json-schema"
            / f"v{K8S_VERSION}.0-local-strict"
            / "_definitions.json"
        ).read_text()
    )
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    out = {}
    for path in sorted(CRD_SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        out[(props["apiVersion"]["const"], props["kind"]["const"])] = validator
    return out


def test_manifests_validate_strictly(rendered: Rendered):
    crds = crd_validators()
    assert len(crds) == 4
    for doc in rendered.docs:
        key = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            if key in crds:
                crds[key].validate(doc)
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except jsonschema.ValidationError as err:
            pytest.fail(f"{where}: {'.'.join(map(str, err.absolute_path))}: {err.message}")


def test_strict_validation_catches_a_wrong_field(renders: dict[str, Rendered]):
    """The validators above really check: a misplaced field fails each kind we render."""
    crds = crd_validators()
    lws = next(d for r in renders.values() for d in r.of_kind("LeaderWorkerSet"))
    broken = copy.deepcopy(lws)
    broken["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0][
        "livenessProbe"
    ]["grpcPort"] = 1
    with pytest.raises(jsonschema.ValidationError):
        crds[(lws["apiVersion"], lws["kind"])].validate(broken)
    deployment = copy.deepcopy(next(r for r in renders.values()).of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnly"] = 1
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ------------------------------------------------------------- pods and workloads


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


def test_worker_args_parse_and_agree_with_the_pod(rendered: Rendered, tmp_path: Path):
    values = rendered.values
    seen = set()
    for pod in worker_pods(rendered):
        config = parse_worker(pod, tmp_path)
        role_values = values[pod.component]
        seen.add(config.role.value)
        assert config.role.value == pod.component
        assert (config.port, config.metrics_port) == (pod.port("grpc"), pod.port("metrics"))
        assert config.port == role_values["port"]
        assert config.metrics_port == role_values["metricsPort"]
        assert config.model == values["model"]["path"]
        assert config.dtype == values["model"]["dtype"]
        # --quantize none parses to no quantization; int8(-blocks) to its Quantization.
        assert config.quantization == QUANTIZE_CHOICES[values["model"]["quantize"]]
        assert config.slots == (None if role_values["slots"] == "auto" else role_values["slots"])
        tpu = role_values["tpu"]
        assert config.tensor_parallel == (tpu["chipsPerHost"] if tpu["enabled"] else 1)
        assert config.drain_grace_s == role_values["drainGraceS"]
        assert pod.spec["terminationGracePeriodSeconds"] > config.drain_grace_s
    assert seen == set(rendered.roles)


def test_orchestrator_args_parse_and_agree_with_the_pod(rendered: Rendered, tmp_path: Path):
    pod = orchestrator_pod(rendered)
    config = parse_orchestrator(pod, tmp_path)
    assert (config.port, config.metrics_port) == (pod.port("grpc"), pod.port("metrics"))
    http = rendered.values["orchestrator"]["http"]
    assert config.http_port == (pod.port("http") if http["enabled"] else -1)
    assert config.model == rendered.values["model"]["path"]
    assert (config.auth_token_file is not None) == rendered.values["orchestrator"]["auth"][
        "enabled"
    ]
    assert pod.spec["terminationGracePeriodSeconds"] > config.drain_grace_s
    assert not (config.prefill or config.decode or config.colocated), "discovery is DNS only"
    # Prefix-aware routing hashes blocks of the prefill workers' page size.
    for worker in worker_pods(rendered):
        if worker.component in ("prefill", "colocated"):
            assert parse_worker(worker, tmp_path).page_size == config.prefix_block_tokens


def test_orchestrator_discovers_the_charts_headless_services(rendered: Rendered, tmp_path: Path):
    config = parse_orchestrator(orchestrator_pod(rendered), tmp_path)
    dns = {"prefill": config.prefill_dns, "decode": config.decode_dns}
    dns["colocated"] = config.colocated_dns
    assert {role for role, names in dns.items() if names} == set(rendered.roles)
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for role in rendered.roles:
        (name_port,) = dns[role]
        host, _, port = name_port.rpartition(":")
        match = re.fullmatch(rf"([a-z0-9-]+)(\.{NAMESPACE}\.svc\.cluster\.local)?", host)
        assert match, host
        service = services[match[1]]
        assert service["spec"]["clusterIP"] == "None", "DNS must list pods: headless"
        (svc_port,) = service["spec"]["ports"]
        assert svc_port["port"] == int(port)
        selected = [p for p in pods(rendered) if selects(service["spec"]["selector"], p.labels)]
        # It selects exactly the serving pods of this role: every one of them, and no
        # multi-host follower (those run no reachable worker of their own).
        assert selected and {p.component for p in selected} == {role}
        assert all(p.serving for p in selected)
        assert [p for p in worker_pods(rendered) if p.component == role and p.serving] == selected
        for pod in selected:
            assert parse_worker(pod, tmp_path).port == int(port)
            assert svc_port["targetPort"] in ("grpc", int(port))
            assert pod.port("grpc") == int(port)


def test_frontend_service_points_at_the_orchestrator(rendered: Rendered):
    pod = orchestrator_pod(rendered)
    frontends = [
        s
        for s in rendered.of_kind("Service")
        if s["spec"].get("clusterIP") != "None" and selects(s["spec"]["selector"], pod.labels)
    ]
    (service,) = frontends
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    http = rendered.values["orchestrator"]["http"]["enabled"]
    assert set(ports) == ({"grpc", "http"} if http else {"grpc"})
    tls = rendered.values["tls"]["public"]["enabled"]
    for name, port in ports.items():
        assert port["port"] == pod.port(name) and port["targetPort"] == name
        # The HTTP API serves HTTPS with the public certificate under public TLS.
        assert port.get("appProtocol") == ("https" if tls and name == "http" else name)


def test_every_service_selects_pods_and_named_ports(rendered: Rendered):
    for service in rendered.of_kind("Service"):
        selected = [p for p in pods(rendered) if selects(service["spec"]["selector"], p.labels)]
        assert selected, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            if isinstance(port["targetPort"], str):
                for pod in selected:
                    assert port["targetPort"] in [q["name"] for q in pod.container["ports"]]


def test_probes_are_grpc_health_on_the_numeric_grpc_port(rendered: Rendered, tmp_path: Path):
    """On the gRPC port; with TLS there (Kubernetes' gRPC probes cannot speak TLS) on the
    process's plaintext health-only port instead."""
    for pod in pods(rendered):
        is_orchestrator = pod.component == "orchestrator"
        parse = parse_orchestrator if is_orchestrator else parse_worker
        config = parse(pod, tmp_path)
        tls = config.tls_cert if is_orchestrator else config.transport.tls
        port = pod.port("grpc") if tls is None else pod.port("health")
        assert tls is None or config.health_port == port
        budget = rendered.values[pod.component]["startupBudgetSeconds"]
        # With the HTTP API on, readiness is its /health (503 while draining): HTTPS under
        # public TLS, and not at all when client certificates are required (the kubelet
        # has none), where readiness stays gRPC on the health port.
        http_probe = is_orchestrator and config.http_port >= 0 and config.tls_client_ca is None
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = pod.container[kind]
            if kind == "readinessProbe" and http_probe:
                scheme = "HTTP" if tls is None else "HTTPS"
                expected = {"path": "/health", "port": pod.port("http"), "scheme": scheme}
                assert probe["httpGet"] == expected
                continue
            assert probe["grpc"] == {"port": port}, (pod.component, kind)
        startup = pod.container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= budget


def test_tls_files_come_from_their_certificates(rendered: Rendered, tmp_path: Path):
    """With TLS on, every component reads its certificate from a read-only Secret mount;
    with cert-manager, that Secret is the one its Certificate writes, for names the
    clients verify (the internal name every worker is dialled by; the public Service)."""
    values = rendered.values["tls"]
    certificates = {c["spec"]["secretName"]: c for c in rendered.of_kind("Certificate")}
    for pod in [*worker_pods(rendered), orchestrator_pod(rendered)]:
        is_orchestrator = pod.component == "orchestrator"
        config = (parse_orchestrator if is_orchestrator else parse_worker)(pod, tmp_path)
        args = pod.container["args"]
        internal = config.internal_tls_cert if is_orchestrator else config.transport.tls
        assert (internal is not None) == values["internal"]["enabled"], pod.component
        if internal is None:
            continue
        prefix = "--internal-tls" if is_orchestrator else "--tls"
        cert = Path(args[args.index(f"{prefix}-cert") + 1])
        _, volume = secret_file(pod, cert)
        secret = volume["secret"]["secretName"]
        name = args[args.index(f"{prefix}-server-name") + 1]
        if values["internal"]["certManager"]["enabled"]:
            certificate = certificates[secret]
            assert name in certificate["spec"]["dnsNames"]
            assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
        else:
            assert secret == values["internal"]["existingSecrets"][pod.component]
    pod = orchestrator_pod(rendered)
    config = parse_orchestrator(pod, tmp_path)
    assert (config.tls_cert is not None) == values["public"]["enabled"]
    assert (config.tls_client_ca is not None) == values["public"]["clientCa"]["enabled"]
    if values["public"]["enabled"] and values["public"]["certManager"]["enabled"]:
        args = pod.container["args"]
        _, volume = secret_file(pod, Path(args[args.index("--tls-cert") + 1]))
        certificate = certificates[volume["secret"]["secretName"]]
        service = f"{RELEASE}-pdserve-orchestrator.{NAMESPACE}.svc"
        assert service in certificate["spec"]["dnsNames"]
    # Internal certificates for every component, a public one when asked; no others.
    expected = len(rendered.roles) + 1 if values["internal"]["certManager"]["enabled"] else 0
    expected += bool(values["public"]["enabled"] and values["public"]["certManager"]["enabled"])
    assert len(certificates) == expected


def test_rollouts_drain_one_pod_at_a_time(rendered: Rendered, tmp_path: Path):
    """What a rolling upgrade needs so that it loses no stream: replace one pod at a time
    (CPU pods: the new one first), count a new pod available only after the orchestrators
    can have found it, and a disruption budget for every component."""
    dns_refresh = rendered.values["orchestrator"]["dnsRefreshS"]
    budgets = rendered.of_kind("PodDisruptionBudget")
    for doc in rendered.of_kind("Deployment"):
        spec = doc["spec"]
        component = spec["selector"]["matchLabels"]["app.kubernetes.io/component"]
        rolling = spec["strategy"]["rollingUpdate"]
        assert spec["strategy"]["type"] == "RollingUpdate"
        assert rolling["maxUnavailable"] <= 1 and rolling["maxSurge"] <= 1
        assert rolling["maxUnavailable"] + rolling["maxSurge"] >= 1
        if component == "orchestrator":
            assert rolling == {"maxSurge": 1, "maxUnavailable": 0}
        else:
            assert spec["minReadySeconds"] > dns_refresh
            tpu = rendered.values[component]["tpu"]["enabled"]
            assert rolling["maxUnavailable"] == (1 if tpu else 0)
        if rendered.values[component]["pdb"]["enabled"]:
            labels = spec["template"]["metadata"]["labels"]
            assert any(selects(b["spec"]["selector"]["matchLabels"], labels) for b in budgets)


def test_drain_fits_in_the_termination_grace_period(rendered: Rendered, tmp_path: Path):
    for pod in worker_pods(rendered):
        drain = parse_worker(pod, tmp_path).drain_grace_s
        assert pod.spec["terminationGracePeriodSeconds"] >= drain + 5
    pod = orchestrator_pod(rendered)
    drain = parse_orchestrator(pod, tmp_path).drain_grace_s
    assert pod.spec["terminationGracePeriodSeconds"] >= drain + 5


def test_pods_are_non_root_with_a_read_only_root_and_a_writable_tmp(rendered: Rendered):
    for pod in pods(rendered):
        assert pod.spec["securityContext"]["runAsNonRoot"] is True
        assert pod.spec["securityContext"]["runAsUser"] > 0
        security = pod.container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security.get("privileged", False) is False
        assert security["capabilities"]["drop"] == ["ALL"]
        (tmp,) = [m for m in pod.container["volumeMounts"] if m["mountPath"] == "/tmp"]
        (volume,) = [v for v in pod.spec["volumes"] if v["name"] == tmp["name"]]
        assert "emptyDir" in volume


def test_workers_keep_compiled_programs_in_a_writable_cache_volume(
    rendered: Rendered, tmp_path: Path
):
    """`--compilation-cache-dir` is the mounted cache volume (writable: JAX writes the
    entries): an emptyDir of sizeLimit, or the named claim. The orchestrator compiles
    nothing and mounts none."""
    cache = rendered.values["compilationCache"]
    for pod in worker_pods(rendered):
        config = parse_worker(pod, tmp_path)
        if not cache["enabled"]:
            assert config.compilation_cache_dir is None
            continue
        assert config.compilation_cache_dir == Path(cache["mountPath"])
        mounts = pod.container["volumeMounts"]
        (mount,) = [m for m in mounts if m["mountPath"] == cache["mountPath"]]
        assert not mount.get("readOnly", False)
        (volume,) = [v for v in pod.spec["volumes"] if v["name"] == mount["name"]]
        if cache["pvc"]["claimName"]:
            assert volume["persistentVolumeClaim"] == {"claimName": cache["pvc"]["claimName"]}
        else:
            assert volume["emptyDir"] == {"sizeLimit": cache["sizeLimit"]}
    orchestrator = orchestrator_pod(rendered)
    mounted = [m["mountPath"] for m in orchestrator.container["volumeMounts"]]
    assert cache["mountPath"] not in mounted


def test_ci_scenarios_cover_both_cache_volumes(renders: dict[str, Rendered]):
    claims = {r.values["compilationCache"]["pvc"]["claimName"] for r in renders.values()}
    assert "" in claims and len(claims) > 1  # an emptyDir somewhere, a claim somewhere


def test_tpu_workers_land_on_their_slices(rendered: Rendered):
    for pod in worker_pods(rendered):
        tpu = rendered.values[pod.component]["tpu"]
        resources = pod.container.get("resources", {})
        if not tpu["enabled"]:
            assert "google.com/tpu" not in json.dumps(pod.template)
            assert pod.workload["kind"] == "Deployment"
            continue
        selector = pod.spec["nodeSelector"]
        assert selector["cloud.google.com/gke-tpu-accelerator"] == tpu["accelerator"]
        assert selector["cloud.google.com/gke-tpu-topology"] == tpu["topology"]
        chips = tpu["chipsPerHost"]
        assert resources["requests"]["google.com/tpu"] == resources["limits"]["google.com/tpu"]
        assert resources["limits"]["google.com/tpu"] == chips
        assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod.spec[
            "tolerations"
        ]
        topology_chips = 1
        for side in tpu["topology"].split("x"):
            topology_chips *= int(side)
        assert topology_chips == chips * tpu["hosts"]
        env = {e["name"]: e.get("value") for e in pod.container["env"]}
        assert env["JAX_PLATFORMS"] == "tpu"
        if tpu["hosts"] == 1:
            assert pod.workload["kind"] == "Deployment"
        else:
            lwt = pod.workload["spec"]["leaderWorkerTemplate"]
            assert pod.workload["kind"] == "LeaderWorkerSet"
            assert lwt["size"] == tpu["hosts"]
            assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
        # TPU workers serve a real model from a volume, in bfloat16.
        assert rendered.values["model"]["dtype"] == "bfloat16"
        model = rendered.values["model"]
        mount = model["volume"]["mountPath"]
        assert model["path"].startswith(mount + "/")
        assert any(m["mountPath"] == mount and m["readOnly"] for m in pod.container["volumeMounts"])


def test_orchestrator_stays_off_tpu_nodes(rendered: Rendered):
    pod = orchestrator_pod(rendered)
    assert "google.com/tpu" not in json.dumps(pod.template)
    terms = pod.spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
    assert {"key": "cloud.google.com/gke-tpu-accelerator", "operator": "DoesNotExist"} in [
        {k: e[k] for k in ("key", "operator")} for e in expressions
    ]
    env = {e["name"]: e.get("value") for e in pod.container["env"]}
    assert env["JAX_PLATFORMS"] == "cpu"


def test_hpas_scale_workloads_on_metrics_workers_export(rendered: Rendered):
    registry = CollectorRegistry()
    WorkerMetrics(registry, "test")
    exported = {m.name: m for m in registry.collect()}
    slot_states = {s.value for s in SlotState}
    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    gke = rendered.values["metrics"]["provider"] == "gke"
    expected_roles = {r for r in rendered.roles if rendered.values[r]["hpa"]["enabled"]}
    assert {h["metadata"]["labels"]["app.kubernetes.io/component"] for h in hpas} == (
        expected_roles
    )
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        workload = rendered.one(target["kind"], target["name"])
        assert workload["apiVersion"] == target["apiVersion"]
        assert "replicas" not in workload["spec"], "the HPA owns replicas"
        (metric,) = hpa["spec"]["metrics"]
        name = metric["pods"]["metric"]["name"]
        if gke:
            match = GKE_METRIC.fullmatch(name)
            assert match, name
            name = match[1]
        assert name in exported and exported[name].type == "gauge", name
        role = hpa["metadata"]["labels"]["app.kubernetes.io/component"]
        assert name == (
            "pdserve_prefill_queue_depth" if role == "prefill" else "pdserve_decode_slots"
        )
        labels = metric["pods"]["metric"].get("selector", {}).get("matchLabels", {})
        for key, value in labels.items():
            label = key.removeprefix("metric.labels.") if gke else key
            assert label == "state" and value in slot_states


def test_network_policy_admits_only_the_expected_peers(rendered: Rendered):
    policies = rendered.of_kind("NetworkPolicy")
    assert rendered.values["networkPolicy"]["enabled"] and policies
    expected_grpc_peers = {
        "prefill": {"orchestrator"},
        "decode": {"orchestrator", "prefill"},  # prefill pushes KV to decode's gRPC port
        "colocated": {"orchestrator"},
    }
    covered = set()
    for pod in pods(rendered):
        (policy,) = [
            p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], pod.labels)
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        covered.add(pod.component)
        rules = policy["spec"]["ingress"]
        grpc_rules = [
            r for r in rules if {"port": pod.port("grpc"), "protocol": "TCP"} in r.get("ports", [])
        ]
        metrics_rules = [
            r
            for r in rules
            if {"port": pod.port("metrics"), "protocol": "TCP"} in r.get("ports", [])
        ]
        assert len(grpc_rules) == 1 and len(metrics_rules) == 1
        if pod.component == "orchestrator" and rendered.values["orchestrator"]["http"]["enabled"]:
            # The HTTP API is a front door like gRPC: the same rule admits both.
            assert {"port": pod.port("http"), "protocol": "TCP"} in grpc_rules[0]["ports"]
        if pod.component in expected_grpc_peers:
            peers = set()
            for peer in grpc_rules[0]["from"]:
                labels = peer["podSelector"]["matchLabels"]
                assert set(peer) == {"podSelector"}, "same namespace, pods only"
                assert labels["app.kubernetes.io/instance"] == RELEASE
                peers.add(labels["app.kubernetes.io/component"])
            assert peers == expected_grpc_peers[pod.component]
        # Port-less rules (all ports) are only for the pods of one multi-host group.
        for rule in rules:
            if "ports" not in rule:
                assert pod.workload["kind"] == "LeaderWorkerSet"
                (peer,) = rule["from"]
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
                    pod.component
                )
    assert covered == {*rendered.roles, "orchestrator"}


def test_disruption_budgets_and_scrapes_select_the_pods(rendered: Rendered):
    all_pods = list(pods(rendered))
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selects(selector, p.labels) for p in all_pods), pdb["metadata"]["name"]
    provider = rendered.values["metrics"]["provider"]
    kind = {"gke": "PodMonitoring", "prometheus-operator": "PodMonitor"}.get(provider)
    scrapes = rendered.of_kind("PodMonitoring") + rendered.of_kind("PodMonitor")
    if kind is None:
        assert not scrapes
        return
    (scrape,) = scrapes
    assert scrape["kind"] == kind
    endpoints = scrape["spec"].get("endpoints") or scrape["spec"]["podMetricsEndpoints"]
    (endpoint,) = endpoints
    for pod in all_pods:
        assert selects(scrape["spec"]["selector"]["matchLabels"], pod.labels)
        assert endpoint["port"] in [p["name"] for p in pod.container["ports"]]


def test_chart_default_ports_are_the_code_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for role in Role:
        assert values[role.value]["port"] == DEFAULT_PORTS[role]
        assert values[role.value]["metricsPort"] == DEFAULT_METRICS_PORTS[role]
    assert values["orchestrator"]["port"] == DEFAULT_PORT
    assert values["orchestrator"]["metricsPort"] == DEFAULT_METRICS_PORT


def test_the_schemas_quantize_choices_are_the_flags():
    schema = json.loads((CHART / "values.schema.json").read_text())
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "quantize" in node.get("properties", {}):
                found.append(node["properties"]["quantize"]["enum"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(schema)
    assert found == [list(QUANTIZE_CHOICES)]


def test_values_schema_is_self_contained():
    schema_text = (CHART / "values.schema.json").read_text()
    refs = re.findall(r'"\$ref":\s*"([^"]*)"', schema_text)
    assert refs and all(ref.startswith("#/") for ref in refs), refs
    jsonschema.Draft7Validator.check_schema(json.loads(schema_text))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(json.loads(schema_text)).validate(values)


def load_installer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "install_helm", ROOT / "charts" / "tools" / "install_helm.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_helm_installer_accepts_only_the_pinned_binary(tmp_path: Path):
    installer = load_installer()
    (tmp_path / "helm").write_bytes(b"#!/bin/sh\necho not helm\n")
    assert installer.helm_in_dest(tmp_path) is None, "a binary with another sha256 is refused"
    pinned = ROOT / ".tools" / "helm"
    if pinned.is_file():  # installed by `make tools` unless helm was on PATH
        assert installer.helm_in_dest(pinned.parent) == pinned
