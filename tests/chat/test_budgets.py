"""Daily budgets from the usage ledger: scopes, overrides, and the cost of checking."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from chat.budgets import (
    BudgetExceeded,
    budget_check,
    budget_delete,
    budget_set,
    seconds_until_reset,
)
from chat.models import Budget
from kb.models import UsageRecord
from kb.usage.ledger import usage_record_create

pytestmark = pytest.mark.django_db


def spend(tokens: int, **fields) -> UsageRecord:
    return usage_record_create(kind="chat", provider="openai", model="gpt-4o-mini",
                               input_tokens=tokens, **fields)


def test_no_limits_costs_one_query(user, django_assert_num_queries):
    with django_assert_num_queries(1):
        budget_check(user=user, api_key=None)


def test_limits_cost_two_queries_whatever_the_scopes(settings, user, api_key_pair,
                                                     django_assert_num_queries):
    _, key = api_key_pair
    settings.KB_BUDGET_GLOBAL_DAILY_TOKENS = 10**9
    settings.KB_BUDGET_USER_DAILY_TOKENS = 10**9
    settings.KB_BUDGET_API_KEY_DAILY_COST_USD = 100.0

    with django_assert_num_queries(2):
        budget_check(user=user, api_key=key)


def test_api_key_budget_counts_only_that_key(settings, user, api_key_pair):
    """The key's budget ignores what its owner spent on the site."""
    _, key = api_key_pair
    settings.KB_BUDGET_API_KEY_DAILY_TOKENS = 100
    spend(500, user=user)
    budget_check(user=user, api_key=key)

    spend(100, user=user, api_key=key)

    with pytest.raises(BudgetExceeded) as raised:
        budget_check(user=user, api_key=key)
    assert raised.value.scope == "api_key"


def test_a_budget_row_overrides_the_setting(settings, user):
    """An admin raises one user's ceiling above the default; an empty limit is unlimited."""
    settings.KB_BUDGET_USER_DAILY_TOKENS = 100
    spend(150, user=user)
    with pytest.raises(BudgetExceeded):
        budget_check(user=user, api_key=None)

    Budget.objects.create(scope=Budget.Scope.USER, user=user, daily_token_limit=None,
                          daily_cost_limit_usd=Decimal("5"))

    budget_check(user=user, api_key=None)


def test_yesterday_and_cache_hits_do_not_count(settings, user):
    settings.KB_BUDGET_USER_DAILY_TOKENS = 100
    old = spend(1000, user=user)
    UsageRecord.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=2))
    usage_record_create(kind="chat", provider="openai", model="gpt-4o-mini", input_tokens=1000,
                        cache_hit=True, user=user)

    budget_check(user=user, api_key=None)


def test_reset_is_within_a_day():
    assert 0 < seconds_until_reset() <= 24 * 3600 + 1


def test_budget_set_creates_then_changes_only_the_limits_given(user):
    """One row per target: a second call updates it, leaving the limits it does not name."""
    budget, created = budget_set(
        scope=Budget.Scope.USER, user=user,
        changes={"daily_token_limit": 1000, "daily_cost_limit_usd": Decimal("2")})
    assert created
    again, created = budget_set(scope=Budget.Scope.USER, user=user,
                                changes={"daily_token_limit": None})
    assert not created and again.pk == budget.pk
    again.refresh_from_db()
    assert (again.daily_token_limit, again.daily_cost_limit_usd) == (None, Decimal("2.0000"))
    assert Budget.objects.count() == 1


def test_budget_set_refuses_a_target_that_does_not_match_its_scope(user):
    with pytest.raises(ValidationError):
        budget_set(scope=Budget.Scope.GLOBAL, user=user, changes={"daily_token_limit": 1})
    assert not Budget.objects.exists()


def test_budget_delete_returns_to_the_settings(settings, user):
    settings.KB_BUDGET_USER_DAILY_TOKENS = 0
    budget_set(scope=Budget.Scope.USER, user=user, changes={"daily_token_limit": 10})
    spend(50, user=user)
    with pytest.raises(BudgetExceeded):
        budget_check(user=user, api_key=None)
    assert budget_delete(scope=Budget.Scope.USER, user=user)
    assert not budget_delete(scope=Budget.Scope.USER, user=user)
    budget_check(user=user, api_key=None)
