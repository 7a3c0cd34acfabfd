"""The usage ledger: one row per request sent, rows that survive a dropped connection."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest
from django.db import connection

from kb.models import UsageRecord
from kb.providers.base import ProviderError
from kb.providers.retrying import RetryPolicy, call_with_retries
from kb.usage.ledger import tracked_model_call, usage_record_create
from tests.fakes.openai_server import FakeOpenAIServer, Fault

POLICY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, timeout=2.0)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


def list_models(server: FakeOpenAIServer) -> dict:
    response = httpx.get(server.base_url + "/models", timeout=2.0)
    response.raise_for_status()
    return response.json()


@pytest.mark.django_db
def test_a_retried_request_gets_its_own_error_row(server):
    """A 429 then a success is two requests sent: the ledger shows both."""
    server.enqueue(Fault(status=429, retry_after=0))

    with tracked_model_call(kind=UsageRecord.Kind.EMBEDDING, provider="openai", model="m") as call:
        call_with_retries(lambda: list_models(server), policy=POLICY, describe="t")
        call.input_tokens = 7

    rows = list(UsageRecord.objects.order_by("created_at").values_list("status", "input_tokens",
                                                                       "error"))
    assert len(server.requests) == 2
    assert [row[:2] for row in rows] == [("error", 0), ("ok", 7)], rows
    assert rows[0][2].startswith("retried: ")


@pytest.mark.django_db
def test_a_call_that_gives_up_has_one_row_per_request(server):
    """Three failed attempts: two retried rows and the final failure, no more."""
    for _ in range(3):
        server.enqueue(Fault(status=500))

    with pytest.raises(ProviderError), tracked_model_call(
            kind=UsageRecord.Kind.EMBEDDING, provider="openai", model="m"):
        call_with_retries(lambda: list_models(server), policy=POLICY, describe="t")

    assert len(server.requests) == 3
    assert list(UsageRecord.objects.values_list("status", flat=True)) == ["error"] * 3


@pytest.mark.django_db
def test_provider_errors_are_stored_without_credentials(settings):
    settings.OPENAI_API_KEY = "sk-live-0123456789abcdefghij"
    record = usage_record_create(
        kind=UsageRecord.Kind.CHAT, provider="openai", model="m", status="error",
        error="401: Incorrect API key provided: sk-live-0123456789abcdefghij "
              "(via http://proxy:hunter2hunter2@proxy.example)",
    )
    record.refresh_from_db()
    assert "sk-live" not in record.error and "hunter2hunter2" not in record.error
    assert "Incorrect API key provided" in record.error


@pytest.mark.django_db(transaction=True)
def test_the_ledger_reconnects_when_the_connection_was_cut():
    """A call made just before a database restart is billed: its row is written anyway."""
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    settings_dict = connection.get_connection_params()
    with psycopg.connect(**{k: v for k, v in settings_dict.items() if k != "cursor_factory"},
                         autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])

    usage_record_create(kind=UsageRecord.Kind.EMBEDDING, provider="local", model="m",
                        input_tokens=3)

    assert UsageRecord.objects.filter(input_tokens=3).count() == 1
    assert connection.connection.info.backend_pid != pid


@pytest.mark.django_db
def test_a_billable_call_is_in_the_ledger_before_it_is_made(settings):
    """write_ahead: while the call runs its row already says "interrupted", so a process
    killed mid-call leaves it accounted for; the outcome then completes the same row."""
    settings.KB_MODEL_PRICES = {"m": {"input": 1.0}}
    with tracked_model_call(kind=UsageRecord.Kind.EMBEDDING, provider="openai", model="m",
                            write_ahead=True) as call:
        (during,) = UsageRecord.objects.all()
        assert (during.status, during.input_tokens) == ("interrupted", 0)
        assert "stopped during the call" in during.error
        call.input_tokens = 2_000_000

    (after,) = UsageRecord.objects.all()
    assert after.pk == during.pk
    assert (after.status, after.input_tokens, after.error) == ("ok", 2_000_000, "")
    assert after.cost_usd == 2


@pytest.mark.django_db
def test_a_failed_billable_call_completes_its_row_as_an_error():
    with pytest.raises(RuntimeError), tracked_model_call(
            kind=UsageRecord.Kind.EMBEDDING, provider="openai", model="m", write_ahead=True):
        raise RuntimeError("upstream said no")

    (row,) = UsageRecord.objects.all()
    assert row.status == "error" and "upstream said no" in row.error
