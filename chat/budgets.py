"""Daily token and cost budgets, checked before any chat model call.

Usage is what the ledger (kb.UsageRecord) says was spent since local midnight
(settings.TIME_ZONE), summed over every kind of model call. Cache hits cost nothing and
are not counted. Three budgets apply to a call, each from its Budget row if there is one,
else from the KB_BUDGET_* settings (0 = unlimited):

- global: everything everyone spent today;
- user: what the user spent, through the site or any of their API keys;
- api_key: what that one key spent.

The check is "already at or over the limit": the next call's cost is unknown until it
has run, so a budget can be overshot by at most one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from chat.models import Budget
from kb.models import ApiKey, UsageRecord

if TYPE_CHECKING:
    from kb.selectors import AnyUser


@dataclass(frozen=True)
class BudgetLimit:
    scope: str
    token_limit: int | None
    cost_limit_usd: Decimal | None


class BudgetExceeded(Exception):
    """A daily budget is used up; retry_after is the number of seconds until it resets."""

    def __init__(self, message: str, *, scope: str, retry_after: int):
        super().__init__(message)
        self.scope = scope
        self.retry_after = retry_after


def day_start(now: datetime | None = None) -> datetime:
    """Local midnight today: when the daily budgets reset."""
    local = timezone.localtime(now or timezone.now())
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def seconds_until_reset(now: datetime | None = None) -> int:
    """Seconds until the next local midnight (at least 1)."""
    now = now or timezone.now()
    return max(1, int((day_start(now) + timedelta(days=1) - now).total_seconds()) + 1)


def _limit(scope: str, row: Budget | None, tokens_default: int, cost_default: float) -> BudgetLimit:
    if row is not None:
        return BudgetLimit(scope, row.daily_token_limit, row.daily_cost_limit_usd)
    return BudgetLimit(
        scope,
        tokens_default or None,
        Decimal(str(cost_default)) if cost_default else None,
    )


def budget_limits_for(*, user: AnyUser, api_key: ApiKey | None) -> list[BudgetLimit]:
    """The limits that apply to this caller, with admin rows overriding the settings."""
    rows = Budget.objects.filter(
        Q(scope=Budget.Scope.GLOBAL)
        | Q(scope=Budget.Scope.USER, user_id=getattr(user, "pk", None))
        | Q(scope=Budget.Scope.API_KEY, api_key_id=getattr(api_key, "pk", None))
    )
    by_scope = {row.scope: row for row in rows}
    limits = [
        _limit(Budget.Scope.GLOBAL, by_scope.get(Budget.Scope.GLOBAL),
               settings.KB_BUDGET_GLOBAL_DAILY_TOKENS, settings.KB_BUDGET_GLOBAL_DAILY_COST_USD)
    ]
    if getattr(user, "is_authenticated", False):
        limits.append(_limit(Budget.Scope.USER, by_scope.get(Budget.Scope.USER),
                             settings.KB_BUDGET_USER_DAILY_TOKENS,
                             settings.KB_BUDGET_USER_DAILY_COST_USD))
    if api_key is not None:
        limits.append(_limit(Budget.Scope.API_KEY, by_scope.get(Budget.Scope.API_KEY),
                             settings.KB_BUDGET_API_KEY_DAILY_TOKENS,
                             settings.KB_BUDGET_API_KEY_DAILY_COST_USD))
    return [limit for limit in limits if limit.token_limit or limit.cost_limit_usd]


def usage_today(
    *, scopes: list[str], user: AnyUser | None, api_key: ApiKey | None
) -> dict[str, tuple[int, Decimal]]:
    """Tokens and USD spent today per scope, in one query over the ledger."""
    tokens = F("input_tokens") + F("output_tokens")
    filters: dict[str, Q] = {
        Budget.Scope.GLOBAL: Q(),
        Budget.Scope.USER: Q(user_id=getattr(user, "pk", None)),
        Budget.Scope.API_KEY: Q(api_key_id=getattr(api_key, "pk", None)),
    }
    aggregates = {}
    for scope in scopes:
        aggregates[f"{scope}_tokens"] = Sum(tokens, filter=filters[scope])
        aggregates[f"{scope}_cost"] = Sum("cost_usd", filter=filters[scope])
    if not aggregates:
        return {}
    sums = UsageRecord.objects.filter(created_at__gte=day_start(), cache_hit=False).aggregate(
        **aggregates
    )
    return {
        scope: (int(sums[f"{scope}_tokens"] or 0), Decimal(sums[f"{scope}_cost"] or 0))
        for scope in scopes
    }


def budget_check(*, user: AnyUser, api_key: ApiKey | None) -> None:
    """Raise BudgetExceeded if any budget that applies to this caller is used up today."""
    limits = budget_limits_for(user=user, api_key=api_key)
    if not limits:
        return
    spent = usage_today(scopes=[limit.scope for limit in limits], user=user, api_key=api_key)
    names: dict[str, str] = {Budget.Scope.GLOBAL: "The daily budget for this service",
                             Budget.Scope.USER: "Your daily budget",
                             Budget.Scope.API_KEY: "This API key's daily budget"}
    for limit in limits:
        tokens, cost = spent[limit.scope]
        over = None
        if limit.token_limit and tokens >= limit.token_limit:
            over = f"{tokens:,} of {limit.token_limit:,} tokens"
        elif limit.cost_limit_usd and cost >= limit.cost_limit_usd:
            over = f"${cost:.4f} of ${limit.cost_limit_usd:.4f}"
        if over:
            raise BudgetExceeded(
                f"{names[limit.scope]} is used up ({over} today). It resets at midnight "
                f"({settings.TIME_ZONE}); retry after the number of seconds in Retry-After.",
                scope=limit.scope,
                retry_after=seconds_until_reset(),
            )


@transaction.atomic
def budget_set(
    *, scope: str, user: User | None = None, api_key: ApiKey | None = None,
    changes: dict[str, int | Decimal | None],
) -> tuple[Budget, bool]:
    """Create or update the Budget row of a target; only the limits in changes change
    (None: unlimited). Returns the row and whether it was created."""
    target = {"scope": scope, "user": user, "api_key": api_key}
    budget = Budget.objects.select_for_update().filter(**target).first()
    created = budget is None
    if budget is None:
        budget = Budget(**target)
    for name, value in changes.items():
        setattr(budget, name, value)
    budget.full_clean()
    budget.save()
    return budget, created


def budget_delete(
    *, scope: str, user: User | None = None, api_key: ApiKey | None = None
) -> bool:
    """Remove the Budget row of a target, so the KB_BUDGET_* settings apply again;
    False if there was none."""
    deleted, _ = Budget.objects.filter(scope=scope, user=user, api_key=api_key).delete()
    return bool(deleted)
