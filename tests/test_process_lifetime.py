"""Processes a test (or `pdserve serve`) starts die with it, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shared.serving.lifetime import PARENT_PID_ENV, child_environment, die_with_parent
from tests.worker_harness import REPO

# A stand-in for pytest: starts a real `pdserve orchestrator` through the test harness (no
# worker behind it; it serves anyway), prints its pid, then waits to be killed.
HARNESS_PARENT = textwrap.dedent(
    """
    import time
    from tests.worker_harness import spawn_pdserve
    child = spawn_pdserve("orchestrator", ["orchestrator", "--host", "127.0.0.1", "--port",
                          "0", "--metrics-port", "-1", "--prefill", "127.0.0.1:9",
                          "--decode", "127.0.0.1:9"], 120)
    print("CHILD", child.proc.pid, flush=True)
    time.sleep(600)
    """
)

# The same mechanism with a child that only sleeps: cheap enough for every signal.
PLAIN_PARENT = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from shared.serving.lifetime import child_environment
    # A shell may start this one with SIGINT ignored (a background job); the test sends it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = "from shared.serving.lifetime import die_with_parent; die_with_parent(); " \\
           "import time; time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code], env=child_environment())
    print("CHILD", child.pid, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def _child_dies_with_parent(script: str, sig: int, start_timeout: float) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        text=True,
    )
    child_pid = None
    try:
        deadline = time.monotonic() + start_timeout
        while child_pid is None and time.monotonic() < deadline:
            line = parent.stdout.readline()
            if line.startswith("CHILD "):
                child_pid = int(line.split()[1])
        assert child_pid is not None, "the parent never started its child"
        time.sleep(0.5)  # let the child arm the signal (it does so first thing)
        assert _alive(child_pid)
        parent.send_signal(sig)
        parent.wait(30)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), f"child {child_pid} outlived its parent ({sig!r})"
    finally:
        parent.kill()
        parent.wait()
        if child_pid is not None and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_pdserve_process_the_harness_started_dies_with_a_sigtermed_pytest():
    _child_dies_with_parent(HARNESS_PARENT, signal.SIGTERM, start_timeout=90)


# The test's own waits (start 20 s, the parent's exit 30 s, the child's 10 s) must fit in
# its limit: the 30 s default cut one run under load inside the parent's wait.
@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_child_dies_with_its_parent(sig: int):
    _child_dies_with_parent(PLAIN_PARENT, sig, start_timeout=20)


def test_without_a_pdserve_parent_nothing_is_armed():
    assert die_with_parent({}) is False
    assert child_environment({"A": "1"}) == {"A": "1", PARENT_PID_ENV: str(os.getpid())}
