"""The usage dashboard: selectors over the ledger, the admin page, its CSV export."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from xml.etree import ElementTree

import pytest
from django.urls import reverse

from kb.selectors import SYSTEM
from kb.usage import reports
from kb.usage.reports import Period
from tests.ops.conftest import CALL_COST

pytestmark = pytest.mark.django_db


def test_daily_aggregates_and_percentiles(ledger):
    """Each day sums cost, tokens and cache use; p50/p95 come from percentile_cont."""
    today = ledger["today"]
    days = reports.usage_daily(period=Period.last_days(3, today=today))

    assert [d.label for d in days] == [(today - timedelta(days=n)).isoformat() for n in (2, 1, 0)]
    older, empty, latest = days
    assert latest.cost_usd == 5 * CALL_COST
    assert latest.input_tokens == 5 * 1000 + 50 and latest.output_tokens == 5 * 200
    assert latest.errors == 1
    # 5 calls, 1 hit, 1 error, 1 embedding
    assert (latest.cache_hits, latest.cache_lookups) == (1, 8)
    assert latest.saved_cost_usd == CALL_COST
    assert latest.latency_p50_ms == pytest.approx(300)
    assert latest.latency_p95_ms == pytest.approx(880)  # 400 + 0.8 * (1000 - 400)
    assert latest.ttft_p50_ms == pytest.approx(75)
    assert latest.search_p50_ms == pytest.approx(40)
    assert (empty.calls, empty.cost_usd, empty.latency_p50_ms) == (0, 0, None)
    assert older.cost_usd == CALL_COST and older.latency_p50_ms == pytest.approx(500)


def test_breakdowns_and_top_spenders(ledger):
    """Per-kind and per-model groups, and the users who spent most, costliest first."""
    period = Period.last_days(7, today=ledger["today"])

    by_kind = {row.label: row for row in reports.usage_breakdown(period=period, by=("kind",))}
    by_model = reports.usage_breakdown(period=period, by=("provider", "model"))
    users = reports.usage_top_users(period=period)
    tokens = reports.usage_tokens_by_model_daily(period=period)

    assert set(by_kind) == {"chat", "embedding", "search"}
    assert by_kind["chat"].calls == 9 and by_kind["chat"].cost_usd == 6 * CALL_COST
    assert by_kind["embedding"].latency_p50_ms == pytest.approx(12)
    assert by_model[0].label == "openai/gpt-4o-mini"
    assert [u.name for u in users] == ["alice", "bob"]
    assert users[0].cost_usd == 6 * CALL_COST and users[0].tokens == 6 * 1200
    assert tokens["openai/gpt-4o-mini"][-1] == 5 * 1200
    assert tokens["local/all-MiniLM-L6-v2"][-1] == 50


def test_most_cited_documents_count_only_cited_passages(ledger, collection, ingest_one):
    """A passage given to the model counts only when the answer cites its number."""
    from chat.models import Conversation, Message

    first = ingest_one(collection, "first.md", "# First\n\nAlpha beta gamma.")
    second = ingest_one(collection, "second.md", "# Second\n\nDelta epsilon zeta.")
    conversation = Conversation.objects.create(user=ledger["alice"], id=uuid.uuid4())

    def answer(citations: list, cited: list) -> None:
        Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, content="…",
                               citations=citations, cited=cited)

    def passage(n: int, document) -> dict:
        return {"n": n, "chunk_id": n, "document_id": document.pk, "document_title": document.title}

    answer([passage(1, first), passage(2, second)], [1])
    answer([passage(1, second), passage(2, first), passage(3, first)], [2, 3])
    answer([passage(1, second)], [])  # given but not cited
    Message.objects.create(conversation=conversation, role=Message.Role.USER, content="q",
                           citations=[passage(1, second)], cited=[1])

    cited = reports.documents_most_cited(period=Period.last_days(1), user=SYSTEM)

    assert [(c.document_id, c.citations, c.answers) for c in cited] == [(first.pk, 3, 2)]
    assert cited[0].title == str(first) and cited[0].exists


def test_dashboard_renders_charts_for_staff(admin_client, ledger):
    """The page shows every chart as inline SVG that parses as XML, with the totals."""
    response = admin_client.get(reverse("usage-dashboard"))
    page = response.content.decode()

    assert response.status_code == 200
    svgs = re.findall(r"<svg [^>]*class=\"kb-chart\".*?</svg>", page, flags=re.S)
    assert len(svgs) == 9
    for svg in svgs:
        ElementTree.fromstring(svg)
    for title in ("Cost per day (USD)", "Tokens per day by model",
                  "Chat latency and time to first token", "Cache hit rate",
                  "Cost saved by caches", "Top users by cost", "Most-cited documents"):
        assert title in page
    assert "openai/gpt-4o-mini" in page and "alice" in page
    assert f"${6 * CALL_COST:.4f}" in page
    assert "Export daily CSV" in page


def test_dashboard_is_staff_only(client, django_user_model, ledger):
    """Anonymous users go to the admin login; signed-in non-staff users too."""
    url = reverse("usage-dashboard")
    assert client.get(url).status_code == 302
    client.force_login(ledger["alice"])
    response = client.get(url)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_staff_without_usage_permission_is_refused(client, django_user_model, db):
    """Staff who may not view usage records get 403 and no link on the index."""
    editor = django_user_model.objects.create_user("editor", password="pw", is_staff=True)
    client.force_login(editor)
    assert client.get(reverse("usage-dashboard")).status_code == 403
    assert "Usage dashboard" not in client.get(reverse("admin:index")).content.decode()


def test_admin_index_links_to_dashboard(admin_client):
    """The admin index carries a link to the usage reports."""
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert f'href="{reverse("usage-dashboard")}"' in page


def test_date_range_filter_limits_the_period(admin_client, ledger):
    """start/end pick the days shown; a reversed range is refused with a message."""
    today = ledger["today"]
    two_days_ago = (today - timedelta(days=2)).isoformat()
    response = admin_client.get(reverse("usage-dashboard"),
                                {"start": two_days_ago, "end": two_days_ago})
    assert f"${CALL_COST:.4f}" in response.content.decode()
    assert response.context["period"] == Period(start=today - timedelta(days=2),
                                                end=today - timedelta(days=2))

    bad = admin_client.get(reverse("usage-dashboard"),
                           {"start": today.isoformat(), "end": two_days_ago})
    assert "The start date must be on or before the end date." in bad.content.decode()
    assert bad.context["period"] == Period.last_days(30)


def test_csv_export_of_daily_aggregates(admin_client, ledger):
    """?format=csv returns one row per day with the same numbers as the charts."""
    today = ledger["today"]
    response = admin_client.get(reverse("usage-dashboard"), {
        "start": (today - timedelta(days=2)).isoformat(), "end": today.isoformat(), "format": "csv",
    })

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [row["date"] for row in rows] == [
        (today - timedelta(days=n)).isoformat() for n in (2, 1, 0)
    ]
    assert Decimal(rows[-1]["cost_usd"]) == 5 * CALL_COST
    assert rows[-1]["chat_latency_p95_ms"] == "880.0"
    assert rows[1]["calls"] == "0" and rows[1]["chat_latency_p50_ms"] == ""


def test_cost_chart_counts_free_calls_instead_of_saying_no_data(admin_client, db):
    """Local models record calls at $0: the cost chart says how many calls there were."""
    from kb.models import UsageRecord
    from tests.ops.conftest import record

    for _ in range(3):
        record(kind=UsageRecord.Kind.EMBEDDING, provider="local", model="all-MiniLM-L6-v2",
               input_tokens=50, latency_ms=12)
    page = admin_client.get(reverse("usage-dashboard")).content.decode()
    cost_chart = page[page.index("Cost per day (USD)"):]
    cost_chart = cost_chart[:cost_chart.index("</svg>")]
    assert "3 model calls, all at no cost" in cost_chart
    assert "No data for this period" not in cost_chart
