"""enqueue(), alone: services and tasks both import it, and neither imports the other's module."""

from __future__ import annotations

from django.conf import settings
from django_q.tasks import async_task

from kb.ops import observability

# Queued tasks carry the current request id to the worker, which sets it while they run.
observability.task_signals_connect()


def enqueue(task_path: str, *args: object, **kwargs: object) -> str:
    """Queue a task by dotted path; runs inline when KB_TASKS_SYNC is set (tests, --sync).

    The current request id travels with the task (kb.ops.observability).
    """
    return async_task(task_path, *args, sync=settings.KB_TASKS_SYNC, **kwargs)
