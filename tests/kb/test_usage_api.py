"""The usage ledger over REST: its rows as the admin lists them, and the dashboard's totals."""

from __future__ import annotations

import pytest

from kb.models import UsageRecord
from kb.services.collections import collection_get_or_create
from tests.kb.test_management_api import client_for, user_with

pytestmark = pytest.mark.django_db


@pytest.fixture
def ledger(ingest_one):
    """Ingestion's own embedding rows, plus one chat call and one row about a document in a
    restricted collection."""
    public = collection_get_or_create(slug="public")
    secret = collection_get_or_create(slug="secret")
    secret.is_public = False
    secret.save()
    ingest_one(public, "a.md", "# A\n\nThe lamp is lit at dusk.\n")
    hidden = ingest_one(secret, "b.md", "# B\n\nThe vault code changes weekly.\n")
    UsageRecord.objects.create(kind=UsageRecord.Kind.CHAT, provider="openai", model="gpt-4o-mini",
                               input_tokens=120, output_tokens=30, cost_usd="0.0001")
    UsageRecord.objects.create(kind=UsageRecord.Kind.EMBEDDING, provider="local",
                               model="secret-doc", document=hidden)
    return hidden


def test_rows_are_listed_newest_first_without_documents_the_caller_cannot_read(
    django_user_model, ledger
):
    api, _ = client_for(user_with(django_user_model, "auditor", "view_usagerecord"))
    rows = api.get("/api/v1/usage/", {"limit": 500}).json()["results"]
    assert rows[0]["kind"] == "embedding" or rows[0]["kind"] == "chat"
    assert [row["created_at"] for row in rows] == sorted(
        (row["created_at"] for row in rows), reverse=True)
    assert ledger.pk not in {row["document"] for row in rows}
    chats = api.get("/api/v1/usage/", {"kind": "chat"}).json()["results"]
    assert [(row["model"], row["input_tokens"]) for row in chats] == [("gpt-4o-mini", 120)]


def test_the_report_has_totals_by_kind_model_and_day(django_user_model, ledger):
    api, _ = client_for(user_with(django_user_model, "auditor", "view_usagerecord"))
    report = api.get("/api/v1/usage/report/").json()
    assert report["totals"]["input_tokens"] >= 120
    assert "chat" in {row["group"] for row in report["by_kind"]}
    assert "openai/gpt-4o-mini" in {row["group"] for row in report["by_model"]}
    assert len(report["daily"]) == 30


@pytest.mark.parametrize("query, field", [
    ({"since": "yesterday"}, "since"),
    ({"kind": "lunch"}, "kind"),
])
def test_bad_filters_are_400s(django_user_model, query, field):
    api, _ = client_for(user_with(django_user_model, "auditor", "view_usagerecord"))
    response = api.get("/api/v1/usage/", query)
    assert response.status_code == 400 and field in response.json()["error"]["fields"]


def test_a_reversed_or_overlong_period_is_a_400(django_user_model):
    api, _ = client_for(user_with(django_user_model, "auditor", "view_usagerecord"))
    assert api.get("/api/v1/usage/report/", {"start": "2026-02-01",
                                             "end": "2026-01-01"}).status_code == 400
    assert api.get("/api/v1/usage/report/", {"start": "2020-01-01",
                                             "end": "2026-01-01"}).status_code == 400


def test_the_ledger_needs_the_view_permission_and_an_unnarrowed_key(django_user_model):
    api, _ = client_for(user_with(django_user_model, "nobody"))
    assert api.get("/api/v1/usage/").status_code == 403
    assert api.get("/api/v1/usage/report/").status_code == 403
    auditor = user_with(django_user_model, "auditor", "view_usagerecord")
    narrowed, _ = client_for(auditor, collections=[collection_get_or_create(slug="public")])
    response = narrowed.get("/api/v1/usage/")
    assert response.status_code == 403 and "narrowed" in response.json()["error"]["message"]
