"""Hypothesis settings of the fuzz tests: bounded and derandomized in `make test` (the same
examples every run: a failure is reproducible, never a flake), or a long random run with
`pytest --fuzz-examples N -m fuzz` (hypothesis keeps the failures it finds in .hypothesis/
and replays them first next time)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_long_run: int | None = None


def configure(examples: int | None) -> None:
    global _long_run
    _long_run = examples


def fuzz_settings(examples: int) -> settings:
    """`examples` in make test; --fuzz-examples in a long run."""
    checks = [HealthCheck.too_slow, HealthCheck.data_too_large]
    if _long_run:
        return settings(max_examples=_long_run, deadline=None, suppress_health_check=checks)
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=checks,
        print_blob=True,
    )
