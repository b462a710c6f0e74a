"""What the load generator sends: prompt/output lengths and arrival times, all seeded.

Every draw comes from a NumPy generator built from `--seed`, so two runs with the same
flags send the same prompts at the same offsets. Synthetic prompts are random token ids in
[1, vocab_max] sent as token-id prompts, so the prompt length the server sees is exact
(text would go through the tokenizer and change length).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class WorkloadError(ValueError):
    """A length spec or workload file is malformed; the message names the fix."""


@dataclasses.dataclass(slots=True, frozen=True)
class LengthDist:
    """A length drawn uniformly from [low, high] (both inclusive); fixed when equal."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise WorkloadError(f"length range {self.low}:{self.high} needs 1 <= A <= B")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """`N` (fixed) or `A:B` (uniform, inclusive)."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise WorkloadError(f"length {text!r}: expected N or A:B (integers)") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise WorkloadError(f"length {text!r}: expected N or A:B")

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))


@dataclasses.dataclass(slots=True, frozen=True)
class RequestSpec:
    prompt: str | tuple[int, ...]
    output_len: int


def synthetic(
    prompt_len: LengthDist, output_len: LengthDist, vocab_max: int, seed: int
) -> Iterator[RequestSpec]:
    """An endless, reproducible stream of random token-id prompts."""
    if vocab_max < 1:
        raise WorkloadError(f"--vocab-max={vocab_max} must be >= 1")
    rng = np.random.default_rng([seed, 0])  # its own stream: arrivals use [seed, 1]
    while True:
        n = prompt_len.sample(rng)
        prompt = tuple(int(t) for t in rng.integers(1, vocab_max + 1, n))
        yield RequestSpec(prompt, output_len.sample(rng))


def load_file(path: Path) -> list[RequestSpec]:
    """`[{"prompt": str | list[int], "output_len": int}, ...]`; WorkloadError on any flaw."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as err:
        raise WorkloadError(f"workload file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise WorkloadError(f"workload file {path}: not JSON ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise WorkloadError(f"workload file {path}: expected a non-empty JSON list of objects")
    return [_entry(path, i, e) for i, e in enumerate(entries)]


def _entry(path: Path, i: int, entry: object) -> RequestSpec:
    where = f"workload file {path}, entry {i}"
    if not isinstance(entry, dict) or set(entry) != {"prompt", "output_len"}:
        raise WorkloadError(f'{where}: expected {{"prompt": ..., "output_len": N}}, got {entry!r}')
    prompt, output_len = entry["prompt"], entry["output_len"]
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise WorkloadError(f"{where}: output_len must be an integer >= 1, got {output_len!r}")
    if isinstance(prompt, str) and prompt:
        return RequestSpec(prompt, output_len)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return RequestSpec(tuple(prompt), output_len)
    raise WorkloadError(f"{where}: prompt must be a non-empty string or list of token ids >= 0")


def from_file(path: Path) -> Iterator[RequestSpec]:
    """The file's entries in order, cycled, so `--duration-s` can outlast the file."""
    return itertools.cycle(load_file(path))


def poisson_offsets(rate: float, seed: int) -> Iterator[float]:
    """Endless arrival offsets (seconds from the start) of a Poisson process at `rate`/s:
    exponential inter-arrival gaps with mean 1/rate."""
    if rate <= 0:
        raise WorkloadError(f"--rate={rate} must be > 0")
    rng = np.random.default_rng([seed, 1])
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        yield t
