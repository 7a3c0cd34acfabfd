"""django-q2 entry points: an id goes in, a service is called. Nothing else lives here."""

from __future__ import annotations

from django.conf import settings
from django_q.tasks import async_task

from kb import embeddings, observability, services

# Queued tasks carry the current request id to the worker, which sets it while they run.
observability.task_signals_connect()

def enqueue(task_path: str, *args, **kwargs) -> str:
    """Queue a task by dotted path; runs inline when KB_TASKS_SYNC is set (tests, --sync).

    The current request id travels with the task (kb.observability).
    """
    return async_task(task_path, *args, sync=settings.KB_TASKS_SYNC, **kwargs)


def document_ingest_task(document_id: int) -> str:
    document = services.document_ingest(document_id=document_id)
    return document.status if document is not None else "deleted"


def reembed_task(embedding_model_id: int, activate: bool = False) -> str:
    return embeddings.reembed_run(model_id=embedding_model_id, activate=activate).status


def documents_mark_stalled_task() -> int:
    return services.documents_mark_stalled()
