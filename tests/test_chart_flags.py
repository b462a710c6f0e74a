"""The chart's flags against the code's flag declarations, for every ci/ scenario and every
values file under charts/tests/values:

1. Every flag of every container (LeaderWorkerSet followers included) is one its role's
   real parser takes, and its value parses with that flag's type (run through the
   parser); a flag the role does not read fails the check (shown on a doctored pod).
2. Each values key a flag is declared with (FLAGS.md) reaches the flag, with its value,
   in exactly the roles that read it; a role's block has no key of a flag it does not read.
3. The parsed configs agree with the pods (ports, model, slots, page size, drain), the
   code's defaults with values.yaml, and charts/pdserve/FLAGS.md with the declarations.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from orchestrator.config import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    ORCHESTRATOR_FLAGS,
    orchestrator_parser,
)
from shared.flags import Flag
from shared.serving.flags import WORKER_FLAGS, worker_parser
from shared.serving.worker_config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, Role
from shared.weights.flags import QUANTIZE_CHOICES
from tests.chart_harness import (
    CHART,
    CI_FILES,
    ROOT,
    TEST_VALUES,
    Pod,
    Rendered,
    helm_binary,
    orchestrator_pod,
    parse_orchestrator,
    parse_worker,
    pods,
    render_all,
    worker_pods,
)

SCENARIOS = [*CI_FILES, *TEST_VALUES]


@pytest.fixture(scope="session")
def renders() -> dict[str, Rendered]:
    helm_binary()
    return render_all(SCENARIOS)


@pytest.fixture(params=[p.stem for p in SCENARIOS])
def rendered(request: pytest.FixtureRequest, renders: dict[str, Rendered]) -> Rendered:
    return renders[request.param]


def test_there_are_values_beyond_ci():
    assert len(TEST_VALUES) >= 2


# ------------------------------------------------------------- every flag, every role


def role_parser(pod: Pod) -> tuple[str, argparse.ArgumentParser, list[str]]:
    """The pod's role, that role's real parser, and its args after the subcommand."""
    args = pod.container["args"]
    if pod.component == "orchestrator":
        return "orchestrator", orchestrator_parser(), args[1:]
    if args[0] == "worker":
        assert args[1:3] == ["--role", pod.component], args[:3]
        return pod.component, worker_parser(pod.component), args[3:]
    assert args[0] == pod.component, args[0]
    return pod.component, worker_parser(pod.component), args[1:]


def takes(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags `parser` takes (not the other roles' flags it holds only to refuse)."""
    return {
        option: action
        for action in parser._actions
        if action.help is not argparse.SUPPRESS
        for option in action.option_strings
    }


def flag_errors(role: str, parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """What is wrong with `args` for `role`: a flag its parser does not take, or a value
    its parser refuses (each flag and its value run through the parser on their own)."""
    known, errors, i = takes(parser), [], 0
    while i < len(args):
        flag, action = args[i], known.get(args[i])
        takes_value = (
            action.nargs != 0 if action else i + 1 < len(args) and not args[i + 1].startswith("--")
        )
        words = args[i : i + 1 + takes_value]
        i += len(words)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
            parser.parse_args(words)
        why = stderr.getvalue().strip().splitlines()[-1:]
        if action is None:
            errors.append(f"{role}: {flag} is not a flag of its parser ({''.join(why)})")
        elif why:
            errors.append(f"{role}: {' '.join(words)}: {why[0]}")
    return errors


def test_every_flag_the_chart_passes_is_one_its_role_reads(rendered: Rendered):
    checked = set()
    for pod in pods(rendered):
        role, parser, args = role_parser(pod)
        assert flag_errors(role, parser, args) == []
        checked.add(role)
    assert checked == {*rendered.roles, "orchestrator"}


@pytest.mark.parametrize(
    ("role", "extra", "message"),
    [
        ("prefill", ["--slots", "8"], "--slots is not a prefill flag"),
        ("decode", ["--max-queue", "64"], "--max-queue is not a decode flag"),
        ("prefill", ["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
        ("decode", ["--page-size", "lots"], "invalid int value: 'lots'"),
    ],
)
def test_the_flag_check_fails_on_a_flag_the_role_does_not_take(
    renders: dict[str, Rendered], role: str, extra: list[str], message: str
):
    """The check above can fail: a real pod's args with one flag its role does not read
    (or a value its parser refuses) appended."""
    (pod,) = [p for p in worker_pods(renders["cpu-dev-values"]) if p.component == role]
    name, parser, args = role_parser(pod)
    assert flag_errors(name, parser, args) == []
    errors = flag_errors(name, parser, [*args, *extra])
    assert len(errors) == 1 and message in errors[0], errors
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        parser.parse_args([*args, *extra])
    assert exit_.value.code == 2 and extra[0] in stderr.getvalue()


# --------------------------------------------------------------- values keys -> flags


def lookup(values: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _tls(values: dict[str, Any], role: str) -> bool:
    return values["tls"]["public" if role == "orchestrator" else "internal"]["enabled"]


# Flags the chart passes only while something else is on (default: whenever their key
# holds a value).
PASSED_WHEN = {
    "--health-port": _tls,
    "--compilation-cache-dir": lambda v, _: v["compilationCache"]["enabled"],
    "--http-port": lambda v, _: v["orchestrator"]["http"]["enabled"],
    "--auth-token-file": lambda v, _: v["orchestrator"]["auth"]["enabled"],
    "--tls-server-name": lambda v, _: v["tls"]["internal"]["enabled"],
    "--internal-tls-server-name": lambda v, _: v["tls"]["internal"]["enabled"],
}
# Flags whose value the chart derives from their key rather than copying it.
DERIVED = {
    "--tensor-parallel",  # chipsPerHost on TPU pods, 1 on CPU ones
    "--tls-server-name",  # empty: <fullname>-internal.<namespace>.svc
    "--internal-tls-server-name",
    "--auth-token-file",  # the mounted Secret's file
}


def value_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def parsed(parser: argparse.ArgumentParser, flag: Flag, text: str) -> Any:
    return getattr(parser.parse_args([flag.name, text]), flag.dest)


def test_values_keys_reach_their_flags_in_exactly_the_roles_that_read_them(
    rendered: Rendered,
):
    values = rendered.values
    for pod in pods(rendered):
        role, parser, args = role_parser(pod)
        table = ORCHESTRATOR_FLAGS if role == "orchestrator" else WORKER_FLAGS
        for flag in (f for f in table if f.chart is not None):
            key = flag.chart.replace("<role>", role)
            present, value = lookup(values, key)
            if role not in flag.roles:
                assert flag.name not in args, (role, flag.name)
                continue
            when = PASSED_WHEN.get(flag.name, lambda v, r: True)
            expected = present and value is not None and when(values, role)
            assert (flag.name in args) == expected, (role, key, value)
            if expected and flag.name not in DERIVED:
                text = args[args.index(flag.name) + 1]
                wanted = parsed(parser, flag, value_text(value))
                assert parsed(parser, flag, text) == wanted, (role, key, value, text)


def test_role_blocks_hold_only_keys_of_flags_the_role_reads():
    """values.yaml: no `slots` for prefill, no `maxQueue` for decode, and so on, for every
    flag whose values key lives in a role's block (a few are optional keys)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    optional = ("--kv-memory-fraction", "--memory-headroom-mib")
    for flag in WORKER_FLAGS:
        if flag.chart is None or not flag.chart.startswith("<role>."):
            continue
        for role in Role:
            present, _ = lookup(values, flag.chart.replace("<role>", role.value))
            if role.value not in flag.roles:
                assert not present, f"{role.value} reads no {flag.name}: drop {flag.chart}"
            elif flag.name not in optional:
                assert present, f"{role.value} reads {flag.name}: values.yaml needs {flag.chart}"


def test_page_size_is_one_value_for_every_worker(rendered: Rendered, tmp_path: Path):
    page = rendered.values["kvCache"]["pageSize"]
    for pod in worker_pods(rendered):
        assert parse_worker(pod, tmp_path).page_size == page
    assert "--prefix-block-tokens" not in orchestrator_pod(rendered).container["args"]


def load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "charts" / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_reference_is_current():
    """charts/pdserve/FLAGS.md is what charts/tools/flag_reference.py writes from the
    declarations (run it after changing a flag)."""
    text = load_tool("flag_reference").render()
    assert (CHART / "FLAGS.md").read_text() == text
    for flag in (*WORKER_FLAGS, *ORCHESTRATOR_FLAGS):
        assert f"`{flag.name}`" in text


# ------------------------------------------------------------- configs and defaults


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
        slots = role_values.get("slots", 8)  # prefill: no slots key, no --slots (default)
        assert config.slots == (None if slots == "auto" else slots)
        assert config.page_size == values["kvCache"]["pageSize"]
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


def test_drain_fits_in_the_termination_grace_period(rendered: Rendered, tmp_path: Path):
    for pod in worker_pods(rendered):
        drain = parse_worker(pod, tmp_path).drain_grace_s
        assert pod.spec["terminationGracePeriodSeconds"] >= drain + 5
    pod = orchestrator_pod(rendered)
    drain = parse_orchestrator(pod, tmp_path).drain_grace_s
    assert pod.spec["terminationGracePeriodSeconds"] >= drain + 5


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
