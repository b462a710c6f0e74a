"""Load generator units: workload draws, Poisson arrivals, report math, PNG output.

Records are built by hand so every expected number can be worked out on paper."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from shared.client.loadgen.plots import write_plots
from shared.client.loadgen.report import Slo, build_report, latency_stats_ms
from shared.client.loadgen.runner import RequestRecord, RunConfig
from shared.client.loadgen.workload import (
    LengthDist,
    WorkloadError,
    from_file,
    load_file,
    poisson_offsets,
    synthetic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(index: int, start: float, token_times: list[float], end: float, error=None):
    return RequestRecord(index, start, 8, len(token_times), list(token_times), end, error)


# Workload ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [("7", 7, 7), ("3:9", 3, 9), ("5:5", 5, 5)],
    ids=["fixed", "uniform", "degenerate"],
)
def test_length_spec_parses(text: str, low: int, high: int):
    assert LengthDist.parse(text) == LengthDist(low, high)


@pytest.mark.parametrize("text", ["0", "9:3", "a", "1:2:3", ""])
def test_bad_length_spec_is_refused(text: str):
    with pytest.raises(WorkloadError):
        LengthDist.parse(text)


def test_fixed_lengths_are_exact_and_tokens_in_range():
    specs = list(itertools.islice(synthetic(LengthDist(64, 64), LengthDist(4, 4), 255, 0), 50))
    assert {len(s.prompt) for s in specs} == {64}
    assert {s.output_len for s in specs} == {4}
    tokens = np.concatenate([s.prompt for s in specs])
    assert tokens.min() >= 1 and tokens.max() <= 255
    assert len(set(tokens.tolist())) > 200  # spread over the range, not a constant


def test_uniform_lengths_cover_the_range_and_are_seeded():
    def draw(seed: int) -> list:
        return list(itertools.islice(synthetic(LengthDist(2, 6), LengthDist(10, 12), 9, seed), 400))

    a, b, c = draw(1), draw(1), draw(2)
    assert a == b and a != c
    assert {len(s.prompt) for s in a} == {2, 3, 4, 5, 6}
    assert {s.output_len for s in a} == {10, 11, 12}
    # Uniform: each prompt length about 1/5 of the draws.
    counts = np.bincount([len(s.prompt) for s in a])[2:]
    assert counts.min() > 400 / 5 * 0.6


def test_workload_file_round_trip_and_cycles(tmp_path: Path):
    path = tmp_path / "w.json"
    path.write_text(
        json.dumps([{"prompt": "hi", "output_len": 3}, {"prompt": [5, 6], "output_len": 1}])
    )
    specs = load_file(path)
    assert [(s.prompt, s.output_len) for s in specs] == [("hi", 3), ((5, 6), 1)]
    cycled = [s.prompt for s in itertools.islice(from_file(path), 5)]
    assert cycled == ["hi", (5, 6), "hi", (5, 6), "hi"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "non-empty JSON list"),
        ('{"prompt": "x"}', "non-empty JSON list"),
        ('[{"prompt": "x"}]', "entry 0"),
        ('[{"prompt": "x", "output_len": 0}]', "output_len must be an integer >= 1"),
        ('[{"prompt": "x", "output_len": 2}, {"prompt": [], "output_len": 2}]', "entry 1: prompt"),
        ('[{"prompt": [1, "a"], "output_len": 2}]', "prompt must be"),
    ],
)
def test_bad_workload_file_names_the_problem(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=message):
        load_file(path)


def test_missing_workload_file_is_a_workload_error(tmp_path: Path):
    with pytest.raises(WorkloadError, match="No such file"):
        load_file(tmp_path / "absent.json")


def test_poisson_inter_arrival_mean_and_spread():
    rate, n = 20.0, 4000
    offsets = np.array(list(itertools.islice(poisson_offsets(rate, seed=3), n)))
    gaps = np.diff(offsets, prepend=0.0)
    assert (gaps > 0).all()
    # Exponential(1/rate): mean 1/rate and std 1/rate; the sample mean's std is
    # (1/rate)/sqrt(n) = 0.8 % here, so 5 % is > 6 sigma.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.1)
    again = list(itertools.islice(poisson_offsets(rate, seed=3), 10))
    assert again == offsets[:10].tolist()


def test_run_config_needs_one_mode_and_a_bound():
    with pytest.raises(WorkloadError, match="exactly one"):
        RunConfig("x:1", rate=1.0, concurrency=2, num_requests=1)
    with pytest.raises(WorkloadError, match="num-requests and/or --duration-s"):
        RunConfig("x:1", rate=1.0)
    RunConfig("x:1", concurrency=2, duration_s=1.0)


# Report -----------------------------------------------------------------------------------


def test_record_latencies():
    r = record(0, 1.0, [1.25, 1.35, 1.45, 1.55], 1.6)
    assert r.ttft_s == pytest.approx(0.25)
    assert r.tpot_s == pytest.approx(0.1)  # 3 gaps over 0.3 s
    assert r.e2e_s == pytest.approx(0.6)
    assert record(0, 0.0, [0.5], 0.5).tpot_s is None


def test_percentiles_interpolate_linearly():
    stats = latency_stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["mean"] == pytest.approx(50.5)
    assert latency_stats_ms([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_report_throughput_goodput_and_errors():
    records = [
        record(0, 0.0, [0.1, 0.2, 0.3], 0.3),  # TTFT 100 ms, TPOT 100 ms: good
        record(1, 0.5, [0.9, 0.95, 1.0], 1.0),  # TTFT 400 ms: misses the TTFT SLO
        record(2, 1.0, [1.1, 1.4, 1.7], 1.7),  # TPOT 300 ms: misses the TPOT SLO
        record(3, 1.5, [1.55], 1.55),  # one token, no TPOT: good
        record(4, 1.8, [], 2.0, error="UNAVAILABLE"),
        record(5, 1.9, [1.95], 2.0, error="FINISH_ERROR"),
    ]
    report = build_report(records, duration_s=2.0, slo=Slo(ttft_ms=200.0, tpot_ms=150.0))
    assert report["num_requests"] == 6 and report["completed"] == 4
    assert report["errors"] == {"FINISH_ERROR": 1, "UNAVAILABLE": 1}
    assert set(report["error_examples"]) == {"FINISH_ERROR", "UNAVAILABLE"}
    assert report["output_tokens"] == 10  # failed requests' tokens do not count
    assert report["request_throughput"] == pytest.approx(2.0)
    assert report["output_token_throughput"] == pytest.approx(5.0)
    assert report["good_requests"] == 2
    assert report["goodput"] == pytest.approx(1.0)
    # TTFTs of the 4 good requests: 100, 400, 100, 50 ms.
    assert report["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert report["ttft_ms"]["mean"] == pytest.approx(162.5)
    assert report["tpot_ms"]["p50"] == pytest.approx(100.0)  # of 100, 50, 300
    # Without SLOs every successful request is good.
    assert build_report(records, 2.0, Slo())["good_requests"] == 4


# Plots ------------------------------------------------------------------------------------


def test_plots_are_png_files(tmp_path: Path):
    records = [
        record(i, i * 0.1, [i * 0.1 + 0.05, i * 0.1 + 0.08], i * 0.1 + 0.1) for i in range(20)
    ]
    records.append(record(20, 2.0, [], 2.1, error="UNAVAILABLE"))
    paths = write_plots(records, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["latency_cdf.png", "latency_over_time.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
