"""kb_usage prints the ledger as terminal tables; kb_budget shows and sets daily budgets."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from chat.models import Budget
from kb.management.commands.kb_usage import since_parse
from kb.models import ApiKey
from kb.services.api_keys import api_key_generate, api_key_hash

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def row(output: str, label: str) -> list[str]:
    """The cells after the label on the table line that starts with it."""
    (line,) = [line for line in output.splitlines() if line.split() and line.split()[0] == label]
    return line.split()[1:]


def test_kb_usage_last_7_days(ledger):
    """Totals, per kind and per provider/model: tokens, cost, p50/p95, cache hit rate, saved."""
    output = run("kb_usage", "--since", "7d")

    assert "By kind" in output and "By provider/model" in output
    total = row(output, "total")
    assert total[:4] == ["13", "1", "6,100", "1,200"]  # calls, errors, input, output
    assert total[4] == "$0.0016" and total[-1] == "$0.0005"
    chat = row(output, "chat")
    # p50/p95 of the six successful calls, 100..1000 ms: 350 and 500 + 0.75 * 500.
    assert chat[:2] == ["9", "1"] and chat[5:9] == ["350", "ms", "875", "ms"]
    assert "22%" in chat  # 2 answer-cache hits of 9 lookups
    assert row(output, "openai/gpt-4o-mini")[4] == "$0.0016"
    assert row(output, "postgres/hybrid")[-2] == "—"


def test_kb_usage_since_24h_leaves_older_days_out(ledger):
    """--since 24h only counts today's rows."""
    assert row(run("kb_usage", "--since", "24h"), "total")[0] == "9"


def test_kb_usage_with_no_usage_and_bad_since(db):
    assert "No usage recorded" in run("kb_usage", "--since", "30d")
    with pytest.raises(CommandError, match="--since takes"):
        run("kb_usage", "--since", "last tuesday")


def test_since_parse():
    now = timezone.make_aware(datetime(2025, 3, 10, 15, 0))
    assert since_parse("24h", now=now) == now - timedelta(hours=24)
    assert since_parse("2w", now=now) == now - timedelta(days=14)
    assert since_parse("2025-03-01", now=now) == timezone.make_aware(datetime(2025, 3, 1))


def test_kb_budget_set_and_show(ledger):
    """--set creates or updates one row per target; the listing shows today's spend against it."""
    alice = ledger["alice"]
    raw, prefix = api_key_generate()
    key = ApiKey.objects.create(name="ci", prefix=prefix, hashed_key=api_key_hash(raw), user=alice)

    run("kb_budget", "--set", "--scope", "global", "--daily-cost", "5")
    run("kb_budget", "--set", "--scope", "user", "--user", "alice", "--daily-tokens", "10000",
        "--daily-cost", "0.01")
    output = run("kb_budget", "--set", "--scope", "api_key", "--key", key.prefix,
                 "--daily-tokens", "500")
    run("kb_budget", "--set", "--scope", "user", "--user", "alice", "--daily-cost", "none")

    assert Budget.objects.count() == 3
    budget = Budget.objects.get(scope="user")
    assert (budget.user, budget.daily_token_limit, budget.daily_cost_limit_usd) == (
        alice, 10000, None)
    assert Budget.objects.get(scope="global").daily_cost_limit_usd == Decimal("5.0000")
    assert "Created: Budget for key" in output
    listing = run("kb_budget")
    alice_row = row(listing, "user")
    assert alice_row[:4] == ["alice", "10,000", "6,000", "60%"]  # 5 calls of 1,200 tokens today
    assert "unlimited" in alice_row
    assert row(listing, "global")[:2] == ["everyone", "unlimited"]


def test_kb_budget_refuses_bad_targets_and_deletes(ledger):
    with pytest.raises(CommandError, match="needs --user"):
        run("kb_budget", "--set", "--scope", "user", "--daily-tokens", "1")
    with pytest.raises(CommandError, match="No user"):
        run("kb_budget", "--set", "--scope", "user", "--user", "nobody", "--daily-tokens", "1")
    with pytest.raises(CommandError, match="names no --user"):
        run("kb_budget", "--set", "--scope", "global", "--user", "alice", "--daily-tokens", "1")
    with pytest.raises(CommandError, match="Give --daily-tokens"):
        run("kb_budget", "--set", "--scope", "global")
    with pytest.raises(CommandError, match="whole number"):
        run("kb_budget", "--set", "--scope", "global", "--daily-tokens", "lots")

    run("kb_budget", "--set", "--scope", "user", "--user", "bob", "--daily-tokens", "1")
    assert "Budget removed" in run("kb_budget", "--delete", "--scope", "user", "--user", "bob")
    assert not Budget.objects.exists()
    assert "everyone (settings)" in run("kb_budget")

