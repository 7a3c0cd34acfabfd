"""Tie a child process's life to the process that started it (Linux's parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def process_stop_with_parent(*, parent_pid: int) -> None:
    """Have the kernel send this process SIGTERM when parent_pid, its parent, ends.

    `serve` starts the worker cluster in a session of its own so that signals meant for
    `serve` reach the cluster only through `serve`; this covers the one case `serve` cannot
    handle itself, being killed with SIGKILL (or crashing), which would otherwise orphan it.
    """
    # Only the process `serve` started is tied to it; its own children (forked or spawned
    # workers, the PDF reader) must not inherit the request and its parent's pid.
    os.environ.pop("KB_STOP_WITH_PARENT_PID", None)
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not fatal: `serve` still stops the cluster on every signal it can catch
    if os.getppid() != parent_pid:  # the parent ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
