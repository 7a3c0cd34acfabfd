"""A small usage ledger for the operations tests, written through kb.usage.ledger like real
calls."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from kb.models import UsageRecord
from kb.usage.ledger import usage_record_create

# gpt-4o-mini at $0.15 / $0.60 per million tokens: 1000 in + 200 out = $0.00027.
CALL_COST = Decimal("0.00027")


def record(*, days_ago: int = 0, **fields) -> UsageRecord:
    """One ledger row through the real service, moved back `days_ago` days."""
    row = usage_record_create(**fields)
    if days_ago:
        UsageRecord.objects.filter(pk=row.pk).update(
            created_at=row.created_at - timedelta(days=days_ago))
        row.refresh_from_db()
    return row


@pytest.fixture
def ledger(db, django_user_model, settings):
    """Today: five chat calls by alice (100..1000 ms), an answer-cache hit and a query
    embedding and a search by bob, one failed call. Two days ago: one of each again."""
    settings.KB_MODEL_PRICES = {"gpt-4o-mini": {"input": 0.15, "output": 0.60}}
    alice = django_user_model.objects.create_user("alice", password="pw")
    bob = django_user_model.objects.create_user("bob", password="pw")
    chat = {"kind": UsageRecord.Kind.CHAT, "provider": "openai", "model": "gpt-4o-mini"}
    for days_ago, latencies in ((0, [100, 200, 300, 400, 1000]), (2, [500])):
        for latency in latencies:
            record(days_ago=days_ago, **chat, input_tokens=1000, output_tokens=200,
                   latency_ms=latency, time_to_first_token_ms=latency / 4, user=alice)
        record(days_ago=days_ago, **chat, cache_hit=True, saved_cost_usd=CALL_COST, user=bob)
        record(days_ago=days_ago, kind=UsageRecord.Kind.EMBEDDING, provider="local",
               model="all-MiniLM-L6-v2", input_tokens=50, latency_ms=12, user=bob)
        record(days_ago=days_ago, kind=UsageRecord.Kind.SEARCH, provider="postgres", model="hybrid",
               latency_ms=40, user=bob)
    record(**chat, latency_ms=30, status=UsageRecord.Status.ERROR,
           error="RateLimitError: slow down")
    return {"alice": alice, "bob": bob, "today": timezone.localdate()}
