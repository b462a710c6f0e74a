"""Session-wide fixtures (one tiny engine, compiled once; one process cluster) and the
suite's guard against hangs.

Every test has a time limit (pyproject.toml: `timeout`, raised per test with
`@pytest.mark.timeout(N)` only where a test needs it). When a test reaches its limit:
1. faulthandler prints every thread's stack (C-level safe: it works even while the main
   thread is stuck in native code), so the hang names itself;
2. pytest-timeout fails the test (SIGALRM) and the suite goes on;
3. if the test still has not let go a minute later, a watchdog prints the stacks again and
   ends the whole run: one hang must not hold CI for 90 minutes. Worker processes die with
   pytest (shared/serving/lifetime.py).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by this process and every worker process the
# tests start (they inherit the environment): the suite compiles the same tiny programs in
# many processes, and a hit costs milliseconds instead of seconds. Traces still happen, so
# the compile-count assertions are unaffected.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 (the cache settings above must come first)
import pytest  # noqa: E402 (the cache settings above must come first)

from shared.config import EngineConfig, ModelConfig  # noqa: E402 (the cache settings above must come first)
from shared.engine.engine import Engine, Params  # noqa: E402 (the cache settings above must come first)

# Eight simulated CPU devices for the tensor-parallel tests, set before JAX initialises its
# backend (importing pdserve does not). Engines use one device unless given a mesh; worker
# processes the tests start get their own device count (tests/worker_harness.py).
SIMULATED_DEVICES = 8
jax.config.update("jax_num_cpu_devices", SIMULATED_DEVICES)

HARD_KILL_GRACE_S = 60.0
_watchdog: threading.Timer | None = None
_config: pytest.Config | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=None,
        help="a long fuzz run: this many examples per fuzz test (random, with hypothesis's "
        "example database), and no time limit on those tests; default: each test's own "
        "bounded, derandomized count",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
    from tests import fuzzing

    fuzzing.configure(config.getoption("--fuzz-examples"))


def _hard_kill(nodeid: str, limit: float) -> None:
    capture = _config.pluginmanager.getplugin("capturemanager") if _config else None
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # write to the terminal, not a capture
    sys.stderr.write(
        f"\n+++ {nodeid} still running {HARD_KILL_GRACE_S:.0f}s past its "
        f"{limit:.0f}s limit: ending the test run +++\n"
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(3)


PROCESS_TEST_TIMEOUT_S = 120
# A slower or busier machine than CI's: multiply every limit (e.g. 3 while other jobs run).
TIMEOUT_SCALE = float(os.environ.get("PDSERVE_TEST_TIMEOUT_SCALE", "1"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the session's process cluster may be the one that starts it (three
    processes loading and compiling): they get `PROCESS_TEST_TIMEOUT_S` unless they say.
    Every limit is multiplied by `PDSERVE_TEST_TIMEOUT_SCALE`."""
    default = float(config.getini("timeout") or 0)
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_processes = "process_cluster" in getattr(item, "fixturenames", ()) or (
            callspec is not None and callspec.params.get("kind") == "process"
        )
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker and marker.args else None
        if limit is None:
            limit = PROCESS_TEST_TIMEOUT_S if on_processes else default
        if marker is None or TIMEOUT_SCALE != 1:
            item.add_marker(pytest.mark.timeout(limit * TIMEOUT_SCALE), append=False)
        if item.get_closest_marker("fuzz") and config.getoption("--fuzz-examples"):
            item.add_marker(pytest.mark.timeout(0), append=False)  # bounded by its count


@pytest.hookimpl
def pytest_timeout_set_timer(item: pytest.Item, settings) -> None:
    """Runs beside pytest-timeout's own timer (returns None, so that one is set too)."""
    global _watchdog
    if not settings.timeout or settings.timeout <= 0:
        return
    faulthandler.dump_traceback_later(settings.timeout, repeat=False, file=sys.stderr)
    _watchdog = threading.Timer(
        settings.timeout + HARD_KILL_GRACE_S, _hard_kill, (item.nodeid, settings.timeout)
    )
    _watchdog.daemon = True
    _watchdog.start()


@pytest.hookimpl
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    global _watchdog
    faulthandler.cancel_dump_traceback_later()
    if _watchdog is not None:
        _watchdog.cancel()
        _watchdog = None


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def engine_config() -> EngineConfig:
    # Pages of 8: prompts at the bucket edges (8, 16, 32) fill whole pages, so their first
    # decode step starts a new page.
    return EngineConfig(max_slots=4, prefill_buckets=(8, 16, 32), max_seq_len=64, page_size=8)


@pytest.fixture(scope="session")
def engine(tiny_config: ModelConfig, engine_config: EngineConfig) -> Engine:
    return Engine(tiny_config, engine_config)


@pytest.fixture(scope="session")
def params(engine: Engine) -> Params:
    return engine.init_params(seed=0)


@pytest.fixture(scope="session")
def tiny_fingerprint(engine_config: EngineConfig) -> str:
    """The model fingerprint worker processes serving `tiny` report (KV wire check)."""
    from shared.serving.runtime import model_fingerprint
    from shared.weights.checkpoint import load_model

    return model_fingerprint(load_model("tiny", engine_config=engine_config, seed=0))


@pytest.fixture(scope="session")
def process_cluster():
    """One orchestrator + prefill + decode process cluster (tests/worker_harness.py engine
    flags), shared by every module; a test that kills or reconfigures workers starts its
    own instead."""
    from tests.cluster_harness import ProcessCluster

    cluster = ProcessCluster()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def openai_cluster(tmp_path_factory):
    """The OpenAI-compatible API's cluster (tests/openai_support.py), shared by its test
    modules."""
    from tests.openai_support import start_openai_cluster

    with start_openai_cluster(tmp_path_factory.mktemp("openai")) as cluster:
        yield cluster
