"""`pdserve bench` end to end: a real orchestrator + prefill + decode on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pdserve_cli


@pytest.fixture
def target(process_cluster) -> str:
    return process_cluster.orchestrator.address


def bench(target: str, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "bench.json"
    argv = ["bench", "--target", target, "--no-progress", "--out", str(out), *flags]
    assert pdserve_cli.main([*argv, "--plots", str(tmp_path / "plots")]) == 0
    return json.loads(out.read_text())


def test_closed_loop_run_reports_every_request(target: str, tmp_path: Path):
    flags = ["--concurrency", "3", "--num-requests", "6", "--prompt-len", "8:16"]
    result = bench(target, tmp_path, *flags, "--output-len", "4", "--slo-ttft-ms", "60000")
    report, rows = result["report"], result["requests"]
    assert report["num_requests"] == report["completed"] == 6
    assert report["errors"] == {}
    assert report["output_tokens"] == 24  # ignore_eos: exactly --output-len each
    assert report["good_requests"] == 6
    assert [r["index"] for r in rows] == list(range(6))
    for row in rows:
        assert row["output_tokens"] == 4 and row["finish_reason"] == "length"
        assert 8 <= row["prompt_len"] <= 16  # token-id prompts: the server counts them exactly
        assert 0 < row["ttft_ms"] <= row["e2e_ms"]
    assert report["output_token_throughput"] == pytest.approx(24 / report["duration_s"])
    for name in ("latency_cdf.png", "latency_over_time.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_open_loop_run_and_unreachable_target(target: str, tmp_path: Path):
    flags = ["--rate", "20", "--num-requests", "4", "--prompt-len", "8", "--output-len", "2"]
    result = bench(target, tmp_path, *flags)
    assert result["report"]["completed"] == 4
    starts = [r["start_s"] for r in result["requests"]]
    assert starts == sorted(starts)  # sent at increasing Poisson offsets
    # Nothing listens on port 1: every request fails with a code, and the exit code says so.
    argv = ["bench", "--target", "127.0.0.1:1", "--no-progress", "--concurrency", "2"]
    out = tmp_path / "down.json"
    assert pdserve_cli.main([*argv, "--num-requests", "2", "--out", str(out)]) == 1
    report = json.loads(out.read_text())["report"]
    assert report["errors"] == {"UNAVAILABLE": 2}
    assert report["error_examples"]["UNAVAILABLE"]  # the channel's reason, for the reader
