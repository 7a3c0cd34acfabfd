"""Long-lived worker threads owned by one process.

Django under ASGI runs each request's sync code on a thread of its own, so work that is
costly to start on a new thread (torch's OpenMP team, above all) is handed to threads
that outlive requests.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_executors: weakref.WeakSet[WorkerThreads] = weakref.WeakSet()


class WorkerThreads:
    """A ThreadPoolExecutor started on first use and started afresh in a forked child.

    A child process (a qcluster worker) inherits the executor object but not its threads,
    so a submit there would wait forever; after a fork the next submit starts new ones.
    """

    def __init__(self, *, max_workers: int, name: str, setup: Callable[[], None] | None = None):
        self.max_workers = max_workers
        self.name = name
        # Run once on each thread as it starts.
        self.setup = setup
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._own = threading.local()
        _executors.add(self)

    def submit(self, fn: Callable[..., T], /, *args, **kwargs) -> Future[T]:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self.max_workers, thread_name_prefix=self.name, initializer=self._mark_own
                    )
        return self._executor.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """fn's result, computed on one of these threads (directly, if already on one)."""
        if getattr(self._own, "marked", False):
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def _mark_own(self) -> None:
        self._own.marked = True
        if self.setup is not None:
            self.setup()

    def _forget_after_fork(self) -> None:
        self._executor = None
        self._lock = threading.Lock()


def _forget_all_after_fork() -> None:
    for executor in list(_executors):
        executor._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)
