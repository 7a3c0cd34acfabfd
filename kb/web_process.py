"""What a process that serves requests needs, and commands and the qcluster must not have."""

from __future__ import annotations

from django.conf import settings
from django.db import connections


def web_process_prepare() -> None:
    """Tune this process for serving requests; call it before the first request.

    - Database connections come from a pool (KB_DB_POOL=web). Django runs each ASGI
      request on a new thread, so thread-local persistent connections are never reused.
      The qcluster must not pool: it forks workers, which would share the pool's sockets.
    - Local models use KB_WEB_TORCH_THREADS intra-op threads: a query's forward pass runs
      beside PostgreSQL answering the same request.
    """
    if settings.KB_DB_POOL == "web":
        # Django reads these when the first connection of a thread is opened, so closing
        # this thread's connection is enough for every later one to come from the pool.
        connections.close_all()
        database = settings.DATABASES["default"]
        database["CONN_MAX_AGE"] = 0
        database["OPTIONS"]["pool"] = settings.KB_DB_POOL_OPTIONS
    settings.KB_TORCH_THREADS = settings.KB_WEB_TORCH_THREADS
