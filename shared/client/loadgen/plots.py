"""Request records -> two PNGs: latency CDFs (TTFT, TPOT, E2E) and latency over time.

matplotlib is imported here only, with the Agg backend, so `pdserve bench` needs no
display and the rest of the package never pays matplotlib's import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a GUI backend (headless CI, servers)

import matplotlib.pyplot as plt
import numpy as np

from shared.client.loadgen.runner import RequestRecord

CDF_FILE = "latency_cdf.png"
OVER_TIME_FILE = "latency_over_time.png"


def _series(records: Sequence[RequestRecord]) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (send times s, latencies ms) over successful requests."""
    ok = [r for r in records if r.ok]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name, get in (
        ("TTFT", lambda r: r.ttft_s),
        ("TPOT", lambda r: r.tpot_s),
        ("E2E", lambda r: r.e2e_s),
    ):
        pairs = [(r.start_s, v * 1e3) for r in ok if (v := get(r)) is not None]
        out[name] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def write_plots(records: Sequence[RequestRecord], out_dir: Path, title: str = "") -> list[Path]:
    """Write both PNGs into `out_dir` (created); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = _series(records)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, (_, ms)) in zip(axes, series.items(), strict=True):
        if ms:
            xs = np.sort(ms)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    cdf = out_dir / CDF_FILE
    fig.savefig(cdf, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for ax, (name, (starts, ms)) in zip(axes, series.items(), strict=True):
        ax.scatter(starts, ms, s=8)
        ax.set(ylabel=f"{name} ms")
        ax.grid(alpha=0.3)
    axes[-1].set(xlabel="request sent at (s from start)")
    fig.suptitle(title or "latency over time")
    fig.tight_layout()
    over_time = out_dir / OVER_TIME_FILE
    fig.savefig(over_time, dpi=100)
    plt.close(fig)
    return [cdf, over_time]
