"""A child process that dies with its parent: no orphaned workers.

`pdserve serve` and the test harness start workers with `PDSERVE_PARENT_PID` set to their
own pid. A process started so asks the kernel (Linux `PR_SET_PDEATHSIG`) for SIGKILL when
its parent dies, whatever kills the parent: SIGKILL, a crash, a SIGTERM without cleanup.
Without the variable (a pod, a shell), nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "PDSERVE_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) plus the variable naming this process as parent."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """If started by a pdserve parent, die with it. True when armed.

    Call first thing in the child. The parent may already be gone before the signal is
    armed, so the parent pid is checked after arming: a mismatch means we were orphaned
    in between (re-parented to init or a subreaper) and we exit at once.
    """
    expected = environ.get(PARENT_PID_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False  # not permitted here: run on, as before
    if os.getppid() != int(expected):
        os._exit(1)
    return True
