"""/metrics: request metrics from the middleware, ledger and queue metrics from the database,
and who may read them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from kb.models import Document, UsageRecord
from kb.ops.metrics import usage_ledger_collector
from kb.services.documents import document_queue_ingest
from kb.services.uploads import documents_upload
from tests.ops.conftest import record

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.ops.urls")]


@pytest.fixture(autouse=True)
def _fresh_ledger_totals():
    usage_ledger_collector.reset()
    yield
    usage_ledger_collector.reset()


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_ledger_counters_by_provider_and_model(client, ledger):
    """Tokens, cost, errors and cache lookups come from the ledger, so calls made in the
    qcluster workers count as well as the web process's own."""
    samples = scrape(client)

    chat = {"provider": "openai", "model": "gpt-4o-mini"}
    assert value(samples, "kb_tokens_used_total", **chat, kind="chat", direction="input") == 6000
    assert value(samples, "kb_tokens_used_total", **chat, kind="chat", direction="output") == 1200
    assert value(samples, "kb_tokens_used_total", provider="local", model="all-MiniLM-L6-v2",
                 kind="embedding", direction="input") == 100
    assert value(samples, "kb_cost_usd_total", **chat) == pytest.approx(6 * 0.00027)
    assert value(samples, "kb_cost_saved_usd_total", **chat) == pytest.approx(2 * 0.00027)
    assert value(samples, "kb_model_errors_total", **chat, kind="chat") == 1
    assert value(samples, "kb_model_calls_total", **chat, kind="chat", status="ok") == 8
    assert value(samples, "kb_cache_requests_total", cache="chat", result="hit") == 2
    assert value(samples, "kb_cache_requests_total", cache="chat", result="miss") == 7
    assert value(samples, "kb_cache_requests_total", cache="embedding", result="miss") == 2
    assert value(samples, "kb_metrics_database_up") == 1
    # Searches are served, not model calls: no token or cost series for them.
    assert not any(name.startswith("kb_tokens") and dict(labels).get("provider") == "postgres"
                   for name, labels in samples)


def test_ledger_counters_grow_across_the_settle_window(client, db):
    """Old rows are summed once and kept; recent rows are re-read each scrape; counters only
    grow."""
    llm = {"kind": UsageRecord.Kind.CHAT, "provider": "p", "model": "m"}
    old = record(**llm, input_tokens=10)
    UsageRecord.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(hours=3))
    first = value(scrape(client), "kb_tokens_used_total", provider="p", model="m", kind="chat",
                  direction="input")
    record(**llm, input_tokens=5)
    second = value(scrape(client), "kb_tokens_used_total", provider="p", model="m", kind="chat",
                   direction="input")

    assert (first, second) == (10, 15)


def test_queue_depth_ingestion_lag_and_documents(client, collection, settings):
    """Queued tasks, the age of the oldest waiting document, and documents by status."""
    settings.KB_TASKS_SYNC = False
    (outcome,) = documents_upload(collection=collection, filename="a.md", data=b"# A\n\nText.")
    document_queue_ingest(document=outcome.document)
    from kb import queue

    queue.enqueue("kb.tasks.documents_mark_stalled_task")  # the ORM broker: one OrmQ row
    Document.objects.filter(pk=outcome.document.pk).update(
        updated_at=timezone.now() - timedelta(seconds=120))

    samples = scrape(client)

    assert value(samples, "kb_queue_depth") == 1
    assert 119 <= value(samples, "kb_ingestion_lag_seconds") < 180
    assert value(samples, "kb_documents", status="pending") == 1
    assert value(samples, "kb_documents", status="ready") == 0


def test_request_metrics_for_sync_async_and_streaming_views(client):
    """The middleware counts requests by route name, method and status, for every kind of view."""
    before = scrape(client)
    assert client.get("/ops/sync").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/no/such/page").status_code == 404
    response = client.get("/ops/sync-stream")
    b"".join(response.streaming_content)
    after = scrape(client)

    def delta(**labels):
        return (value(after, "kb_http_requests_total", **labels)
                - value(before, "kb_http_requests_total", **labels))

    assert delta(endpoint="ops-sync", method="GET", status="200") == 1
    assert delta(endpoint="healthz", method="GET", status="200") == 1
    assert delta(endpoint="unmatched", method="GET", status="404") == 1
    assert delta(endpoint="ops-sync-stream", method="GET", status="200") == 1
    assert (value(after, "kb_http_request_duration_seconds_count", endpoint="ops-sync",
                  method="GET")
            > value(before, "kb_http_request_duration_seconds_count", endpoint="ops-sync",
                    method="GET"))


def test_request_metrics_for_async_views():
    """Under ASGI (the async middleware chain) async and streaming views are counted too."""
    from kb.ops.metrics import HTTP_REQUESTS

    def count(endpoint):
        return HTTP_REQUESTS.labels(endpoint, "GET", "200")._value.get()

    async def requests():
        client = AsyncClient()
        plain = await client.get("/ops/async")
        stream = await client.get("/ops/async-stream")
        return plain.status_code, [chunk async for chunk in stream.streaming_content]

    before = count("ops-async"), count("ops-async-stream")
    status, chunks = async_to_sync(requests)()

    assert status == 200 and chunks == [b"data: one\n\n", b"data: two\n\n"]
    assert (count("ops-async") - before[0], count("ops-async-stream") - before[1]) == (1, 1)


def test_metrics_refused_from_other_addresses(client, settings):
    """Outside KB_METRICS_ALLOWED_IPS and without the token, /metrics is 403."""
    settings.KB_METRICS_TOKEN = ""
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 403
    settings.KB_METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_metrics_bearer_token(client, settings):
    """With KB_METRICS_TOKEN set, the right bearer token opens /metrics from anywhere."""
    settings.KB_METRICS_TOKEN = "s3cret-token"
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token",
                      **remote).status_code == 200
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong", **remote).status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-token",
                      **remote).status_code == 403
    assert client.get("/metrics", **remote).status_code == 403


def test_request_metrics_add_up_across_processes(client, settings, tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, each uvicorn process writes its request counts there and
    any one /metrics reports the sum."""
    code = (
        "import time, django; django.setup()\n"
        "from django.test import RequestFactory\n"
        "from django.urls import resolve\n"
        "from kb.ops.metrics import _observe\n"
        "request = RequestFactory().get('/healthz'); request.resolver_match = resolve('/healthz')\n"
        "_observe(request, 200, time.perf_counter())\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kb.settings",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
    settings.PROMETHEUS_MULTIPROC_DIR = str(tmp_path)

    samples = scrape(client)

    assert value(samples, "kb_http_requests_total", endpoint="healthz", method="GET",
                 status="200") == 2
    assert value(samples, "kb_http_request_duration_seconds_count", endpoint="healthz",
                 method="GET") == 2
    assert value(samples, "kb_metrics_database_up") == 1  # the database metrics are still there
