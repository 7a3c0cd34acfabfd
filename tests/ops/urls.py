"""Test-only routes: the real site plus sync, async and streaming views that record usage."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path

from kb import queue
from kb.models import UsageRecord
from kb.ops.observability import current_request_id
from kb.urls import urlpatterns as site_urlpatterns
from kb.usage.ledger import usage_record_create


def _record() -> UsageRecord:
    return usage_record_create(kind=UsageRecord.Kind.CHAT, provider="test", model="echo",
                               input_tokens=3, output_tokens=4)


def sync_view(request):
    record = _record()
    return JsonResponse({"request_id": current_request_id(), "record": str(record.pk)})


async def async_view(request):
    record = await sync_to_async(_record)()
    return JsonResponse({"request_id": current_request_id(), "record": str(record.pk)})


def sync_stream(request):
    def events():
        yield b"data: one\n\n"
        yield b"data: two\n\n"
        _record()  # written after the middleware has returned, like chat's finally block

    return StreamingHttpResponse(events(), content_type="text/event-stream")


async def async_stream(request):
    async def events():
        try:
            for word in ("one", "two"):
                await asyncio.sleep(0)
                yield f"data: {word}\n\n".encode()
        finally:
            await sync_to_async(_record)()

    return StreamingHttpResponse(events(), content_type="text/event-stream")


def enqueue_view(request):
    queue.enqueue("tests.ops.urls.task_record_usage")
    return JsonResponse({"request_id": current_request_id()})


def task_record_usage() -> str:
    """A task body: records usage the way an ingestion task's embedding calls do."""
    return str(_record().pk)


urlpatterns = [
    path("ops/sync", sync_view, name="ops-sync"),
    path("ops/async", async_view, name="ops-async"),
    path("ops/sync-stream", sync_stream, name="ops-sync-stream"),
    path("ops/async-stream", async_stream, name="ops-async-stream"),
    path("ops/enqueue", enqueue_view, name="ops-enqueue"),
    *site_urlpatterns,
]
