"""shared/cluster's own parts: the ready line both ways, a child that never serves, and the
cluster spec's worker names. (Clusters that serve are every process test's.)"""

from __future__ import annotations

import pytest

from shared.cluster.cluster import ClusterSpec, orchestrator_argv, worker_argv
from shared.cluster.processes import launch, wait_ready
from shared.cluster.ready import ReadyLine, format_ready_line, parse_ready_line


def test_a_worker_ready_line_reads_back_as_printed() -> None:
    line = format_ready_line("decode", "0.0.0.0", 50061, metrics_port=9161, health_port=-1)
    ready = parse_ready_line(f"[decode-0] {line}\n")  # relayed lines carry a prefix
    assert ready == ReadyLine("decode", "0.0.0.0:50061", 50061, 9161, -1, -1)
    assert ready.dial_address == "127.0.0.1:50061"  # a wildcard bind is dialled on loopback


def test_the_orchestrator_ready_line_carries_its_http_port() -> None:
    line = format_ready_line(
        "orchestrator", "127.0.0.1", 1, metrics_port=2, health_port=3, http_port=4
    )
    assert parse_ready_line(line) == ReadyLine("orchestrator", "127.0.0.1:1", 1, 2, 3, 4)
    assert parse_ready_line(line).dial_address == "127.0.0.1:1"


@pytest.mark.parametrize(
    "line", ["[pdserve] decode: loading model 'tiny'", "serving on 127.0.0.1:1", ""]
)
def test_other_lines_are_not_ready_lines(line: str) -> None:
    assert parse_ready_line(line) is None


def test_a_child_that_exits_before_serving_raises_with_its_output() -> None:
    child = launch("bad", ["worker", "--role", "decode", "--no-such-flag"])
    with pytest.raises(RuntimeError) as err:
        wait_ready(child, timeout=60)
    assert "bad did not start (exit code 2)" in str(err.value)
    assert "--no-such-flag" in str(err.value)  # the child's own error, relayed


def test_spec_names_and_argv() -> None:
    spec = ClusterSpec(prefill=2, decode=1)
    assert spec.worker_names() == [
        ("prefill-0", "prefill"),
        ("prefill-1", "prefill"),
        ("decode-0", "decode"),
    ]
    assert worker_argv("decode", "--slots", "2")[:3] == ["worker", "--role", "decode"]
    argv = orchestrator_argv({"prefill": ["a:1", "b:2"], "decode": []}, "--model", "tiny")
    assert argv[argv.index("--prefill") + 1] == "a:1,b:2" and "--decode" not in argv
    assert argv[-2:] == ["--model", "tiny"]
