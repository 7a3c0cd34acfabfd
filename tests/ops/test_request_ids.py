"""Request ids: the response header, every log line, usage records, and queued tasks."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from kb.models import UsageRecord
from kb.ops.observability import (
    JsonFormatter,
    RequestIdFilter,
    current_request_id,
    request_id_from_header,
)
from tests.ops.conftest import record

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.ops.urls")]


@pytest.fixture
def json_log():
    """Lines written through the JSON formatter, as the KB_LOG_FORMAT=json handler does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_request_id_is_generated_and_returned(client):
    """Without X-Request-ID the middleware makes one and sends it back."""
    response = client.get("/ops/sync")
    request_id = response["X-Request-ID"]

    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.json()["request_id"] == request_id


def test_sane_client_request_id_is_kept_and_junk_replaced(client):
    """A proxy's id is reused; spaces, newlines or overlong values are not."""
    kept = client.get("/ops/sync", HTTP_X_REQUEST_ID="lb-7f3a.42")
    assert kept.headers["X-Request-ID"] == "lb-7f3a.42"
    for junk in ("two words", "forged\nline", "x" * 65, ""):
        returned = client.get("/ops/sync", HTTP_X_REQUEST_ID=junk).headers["X-Request-ID"]
        assert returned != junk and re.fullmatch(r"[0-9a-f]{32}", returned)
    assert request_id_from_header("a" * 64) == "a" * 64


def test_usage_record_carries_the_request_id(client):
    """usage_record_create fills request_id from the request being served."""
    response = client.get("/ops/sync", HTTP_X_REQUEST_ID="req-usage-1")

    assert UsageRecord.objects.get(pk=response.json()["record"]).request_id == "req-usage-1"
    assert current_request_id() == ""  # reset once the response is returned
    assert record(kind="chat", provider="p", model="m").request_id == ""


def test_streamed_response_keeps_the_request_id_while_streaming(client):
    """Usage written at the end of a stream (after the middleware returned) still has the id."""
    response = client.get("/ops/sync-stream", HTTP_X_REQUEST_ID="req-stream-1")
    assert b"".join(response.streaming_content) == b"data: one\n\ndata: two\n\n"

    assert UsageRecord.objects.get().request_id == "req-stream-1"


def test_async_views_and_async_streams_keep_the_request_id():
    """The async middleware path sets the id for the view and for an async stream's finally."""

    async def requests():
        client = AsyncClient()
        plain = await client.get("/ops/async", headers={"X-Request-ID": "req-async-1"})
        stream = await client.get("/ops/async-stream", headers={"X-Request-ID": "req-async-2"})
        body = [chunk async for chunk in stream.streaming_content]
        return plain, stream, body

    plain, stream, body = async_to_sync(requests)()

    assert plain["X-Request-ID"] == "req-async-1" and stream["X-Request-ID"] == "req-async-2"
    assert len(body) == 2
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == [
        "req-async-1", "req-async-2"]


def test_log_lines_are_json_with_the_request_id(client, json_log):
    """Each request logs one JSON line carrying its id, method, path, status and duration."""
    logging.getLogger("kb.test").info("outside", extra={"document_id": 7})
    client.get("/ops/sync", HTTP_X_REQUEST_ID="req-log-1")

    lines = json_log()
    (request_line,) = [line for line in lines if line["logger"] == "kb.request"]
    (outside,) = [line for line in lines if line["message"] == "outside"]
    assert request_line["request_id"] == "req-log-1"
    assert request_line["level"] == "INFO"
    assert (request_line["method"], request_line["path"], request_line["status"]) == (
        "GET", "/ops/sync", 200)
    assert request_line["duration_ms"] >= 0 and "ts" in request_line
    assert outside["request_id"] == "" and outside["document_id"] == 7


def test_json_formatter_handles_exceptions_and_odd_extras():
    """Tracebacks become a field; an extra JSON cannot encode is written as text."""
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        entry = logging.LogRecord("kb.x", logging.ERROR, __file__, 1, "failed %s", ("job",),
                                  sys.exc_info())
    entry.when = object()

    line = json.loads(formatter.format(entry))

    assert line["message"] == "failed job" and line["level"] == "ERROR"
    assert "ValueError: boom" in line["exc_info"]
    assert line["when"].startswith("<object object")


def test_task_queued_during_a_request_runs_with_its_request_id(client):
    """kb.queue.enqueue carries the id to the worker (inline here), so its usage has it too."""
    response = client.get("/ops/enqueue", HTTP_X_REQUEST_ID="req-task-1")

    assert response.status_code == 200
    assert UsageRecord.objects.get().request_id == "req-task-1"
    assert current_request_id() == ""


def test_task_queued_outside_a_request_runs_under_its_task_id(db):
    """With no request, a task's usage and logs are tied together by the django-q task id."""
    from django_q.models import Task

    from kb import queue

    task_id = queue.enqueue("tests.ops.urls.task_record_usage")

    assert UsageRecord.objects.get().request_id == task_id == Task.objects.get().id


def test_kb_log_format_json_configures_json_lines():
    """KB_LOG_FORMAT=json makes the configured handler write JSON; plain shows the id in
    brackets."""
    code = ("import django, logging; django.setup(); "
            "from kb.ops.observability import request_id_set; request_id_set('req-cfg-1'); "
            "logging.getLogger('kb.x').warning('hello %s', 'there', extra={'n': 1})")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings"}
    as_json = subprocess.run([sys.executable, "-c", code], env={**env, "KB_LOG_FORMAT": "json"},
                             cwd=ROOT, capture_output=True, text=True, check=True).stderr
    plain = subprocess.run([sys.executable, "-c", code], env={**env, "KB_LOG_FORMAT": "plain"},
                           cwd=ROOT, capture_output=True, text=True, check=True).stderr

    line = json.loads(as_json.strip().splitlines()[-1])
    assert (line["message"], line["request_id"], line["n"], line["logger"]) == (
        "hello there", "req-cfg-1", 1, "kb.x")
    assert "WARNING [req-cfg-1] kb.x hello there" in plain
