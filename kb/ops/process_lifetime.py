"""Tie a child process's life to the process that started it (Linux's parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# How long an orphaned worker cluster may take over its graceful stop before its whole
# process group is killed. A task it was running stays queued and runs again.
ORPHAN_STOP_GRACE_SECONDS = 10.0


def process_stop_with_parent(*, parent_pid: int) -> None:
    """Stop this process, and its process group, when parent_pid, its parent, ends.

    `serve` starts the worker cluster in a session of its own so that signals meant for
    `serve` reach the cluster only through `serve`; this covers the one case `serve` cannot
    handle itself, being killed with SIGKILL (or crashing), which would otherwise orphan it.
    The kernel sends SIGTERM at once (django-q's graceful stop); a graceful stop waits for
    every running task, so after ORPHAN_STOP_GRACE_SECONDS the group is killed. A watcher
    thread does that, and sends the SIGTERM itself where the kernel cannot (not Linux).
    """
    # Only the process `serve` started is tied to it; its own children (forked or spawned
    # workers, the PDF reader) must not inherit the request and its parent's pid.
    os.environ.pop("KB_STOP_WITH_PARENT_PID", None)
    kernel_signals = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        kernel_signals = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # the parent ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
        kernel_signals = True  # the one SIGTERM is sent: a second would interrupt the stop
    threading.Thread(target=_orphan_watch, args=(parent_pid, not kernel_signals),
                     name="kb-orphan-watch", daemon=True).start()


def _orphan_watch(parent_pid: int, send_sigterm: bool) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    if send_sigterm:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_STOP_GRACE_SECONDS)
    # Only a group this process leads (serve made it a session): never anyone else's.
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
