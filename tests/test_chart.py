"""The Helm chart (charts/pdserve), rendered by the real `helm` for every ci/ scenario.

1. `helm lint --strict` passes and `helm template` renders each ci/ values file (once per
   session); every bad values file in charts/tests/bad-values fails, for its stated reason.
2. Every rendered manifest validates strictly against the Kubernetes schemas shipped by
   `kubernetes-validate` (Kubernetes K8S_VERSION), and the CRDs it does not know
   (PodMonitoring, PodMonitor, LeaderWorkerSet) against charts/tests/schemas.
3. The manifests agree with the code: ports agree between args, container ports, probes,
   Services and NetworkPolicies; the orchestrator's `--*-dns` names are the headless
   Services that select the serving worker pods; HPA metrics are metrics the workers
   export. (Flags and values: tests/test_chart_flags.py.)

Rendering and reading pods back: tests/chart_harness.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
from prometheus_client import CollectorRegistry

from decode_server.slots import SlotState
from shared.metrics import WorkerMetrics
from tests.chart_harness import (
    BAD_FILES,
    CHART,
    CI_FILES,
    CRD_SCHEMAS,
    GKE_METRIC,
    K8S_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    Rendered,
    helm_binary,
    orchestrator_pod,
    parse_orchestrator,
    parse_worker,
    pods,
    render_all,
    run_helm,
    secret_file,
    selects,
    template,
    worker_pods,
)


@pytest.fixture(scope="session")
def helm() -> str:
    return helm_binary()


@pytest.fixture(scope="session")
def renders(helm: str) -> dict[str, Rendered]:
    """Each ci/ values file rendered once for the whole session."""
    return render_all(CI_FILES)


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
