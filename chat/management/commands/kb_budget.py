"""`manage.py kb_budget`: show daily budgets with today's spend, or set one.

    manage.py kb_budget
    manage.py kb_budget --set --scope global --daily-cost 20
    manage.py kb_budget --set --scope user --user alice --daily-tokens 200000 --daily-cost 2.5
    manage.py kb_budget --set --scope api_key --key kb_3f9a --daily-tokens none
    manage.py kb_budget --delete --scope user --user alice

A limit of `none` means unlimited. Without a row, a scope falls back to the KB_BUDGET_*
settings (chat.budgets); --delete returns a target to them.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.budgets import budget_delete, budget_set, day_start, usage_today
from chat.models import Budget
from kb.management.commands.kb_usage import table
from kb.models import ApiKey

UNLIMITED = {"none", "unlimited", "off"}


def _tokens(value: str) -> int | None:
    if value.lower() in UNLIMITED:
        return None
    try:
        tokens = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        raise CommandError(f"--daily-tokens takes a whole number or none, not {value!r}.") from None
    if tokens < 0:
        raise CommandError("--daily-tokens cannot be negative.")
    return tokens


def _cost(value: str) -> Decimal | None:
    if value.lower() in UNLIMITED:
        return None
    try:
        cost = Decimal(value.lstrip("$"))
    except InvalidOperation:
        raise CommandError(f"--daily-cost takes an amount in USD or none, not {value!r}.") from None
    if cost < 0 or not cost.is_finite():
        raise CommandError("--daily-cost must be a positive amount.")
    return cost.quantize(Decimal("0.0001"))


def budget_target(*, scope: str, username: str | None, key_prefix: str | None) -> dict:
    """The Budget fields naming the target of a scope, checked against the scope."""
    if scope == Budget.Scope.GLOBAL:
        if username or key_prefix:
            raise CommandError("A global budget names no --user or --key.")
        return {"scope": scope, "user": None, "api_key": None}
    if scope == Budget.Scope.USER:
        if not username or key_prefix:
            raise CommandError("A user budget needs --user NAME (and no --key).")
        user_model = get_user_model()
        user = user_model.objects.filter(**{user_model.USERNAME_FIELD: username}).first()
        if user is None:
            raise CommandError(f"No user {username!r}.")
        return {"scope": scope, "user": user, "api_key": None}
    if not key_prefix or username:
        raise CommandError("An API-key budget needs --key PREFIX (and no --user).")
    api_key = ApiKey.objects.filter(prefix=key_prefix.rstrip("…")).first()
    if api_key is None:
        raise CommandError(f"No API key with prefix {key_prefix!r}.")
    return {"scope": scope, "user": None, "api_key": api_key}


def _tokens_limit(value) -> str:
    return "unlimited" if not value else f"{value:,}"


def _cost_limit(value) -> str:
    return "unlimited" if not value else f"${value:,.2f}"


def _used(spent, limit) -> str:
    if not limit:
        return "—"
    return f"{float(spent) / float(limit):.0%}"


class Command(BaseCommand):
    help = "Show daily token and cost budgets with today's spend, or set one with --set."

    def add_arguments(self, parser: CommandParser) -> None:
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--set", action="store_true", help="Create or update a budget.")
        action.add_argument("--delete", action="store_true",
                            help="Remove a budget row (the KB_BUDGET_* settings apply again).")
        parser.add_argument("--scope", choices=Budget.Scope.values)
        parser.add_argument("--user", dest="username", help="Username, for --scope user.")
        parser.add_argument("--key", dest="key_prefix", help="API key prefix, for --scope api_key.")
        parser.add_argument("--daily-tokens", help="Tokens per day, or none for unlimited.")
        parser.add_argument("--daily-cost", help="USD per day, or none for unlimited.")

    def handle(self, *args: str, set: bool, delete: bool, scope: str | None,
               username: str | None, key_prefix: str | None, **options: object) -> None:
        if set or delete:
            if not scope:
                raise CommandError("--scope is required with --set and --delete.")
            target = budget_target(scope=scope, username=username, key_prefix=key_prefix)
            if delete:
                deleted = budget_delete(**target)
                self.stdout.write("Budget removed; the settings defaults apply.\n" if deleted
                                  else "There was no such budget.\n")
            else:
                self._set(target, options)
        self._show()

    def _set(self, target: dict, options: dict) -> None:
        changes: dict[str, int | Decimal | None] = {}
        if options["daily_tokens"] is not None:
            changes["daily_token_limit"] = _tokens(options["daily_tokens"])
        if options["daily_cost"] is not None:
            changes["daily_cost_limit_usd"] = _cost(options["daily_cost"])
        if not changes:
            raise CommandError("Give --daily-tokens and/or --daily-cost with --set.")
        budget, created = budget_set(**target, changes=changes)
        self.stdout.write(f"{'Created' if created else 'Updated'}: {budget}.\n")

    def _show(self) -> None:
        rows = []
        budgets = Budget.objects.select_related("user", "api_key").order_by("scope", "pk")
        has_global = False
        for budget in budgets:
            has_global |= budget.scope == Budget.Scope.GLOBAL
            spent_tokens, spent_cost = usage_today(
                scopes=[budget.scope], user=budget.user, api_key=budget.api_key
            )[budget.scope]
            target = {Budget.Scope.GLOBAL: "everyone", Budget.Scope.USER: str(budget.user),
                      Budget.Scope.API_KEY: str(budget.api_key)}[Budget.Scope(budget.scope)]
            rows.append([budget.scope, target, _tokens_limit(budget.daily_token_limit),
                         f"{spent_tokens:,}", _used(spent_tokens, budget.daily_token_limit),
                         _cost_limit(budget.daily_cost_limit_usd), f"${spent_cost:.4f}",
                         _used(spent_cost, budget.daily_cost_limit_usd)])
        if not has_global:
            spent_tokens, spent_cost = usage_today(scopes=[Budget.Scope.GLOBAL], user=None,
                                                   api_key=None)[Budget.Scope.GLOBAL]
            tokens_limit = settings.KB_BUDGET_GLOBAL_DAILY_TOKENS or None
            cost_limit = settings.KB_BUDGET_GLOBAL_DAILY_COST_USD or None
            rows.insert(0, ["global", "everyone (settings)", _tokens_limit(tokens_limit),
                            f"{spent_tokens:,}", _used(spent_tokens, tokens_limit),
                            _cost_limit(cost_limit), f"${spent_cost:.4f}",
                            _used(spent_cost, cost_limit)])
        self.stdout.write(f"Budgets today (since {day_start():%Y-%m-%d %H:%M %Z}):")
        self.stdout.write(table(
            ["scope", "target", "token limit", "tokens today", "used",
             "cost limit", "cost today", "used"],
            rows, text_columns=2,
        ))
        self.stdout.write(
            "\nUsers and keys without a row use the settings defaults: "
            f"users {_tokens_limit(settings.KB_BUDGET_USER_DAILY_TOKENS)} tokens and "
            f"{_cost_limit(settings.KB_BUDGET_USER_DAILY_COST_USD)} a day, API keys "
            f"{_tokens_limit(settings.KB_BUDGET_API_KEY_DAILY_TOKENS)} tokens and "
            f"{_cost_limit(settings.KB_BUDGET_API_KEY_DAILY_COST_USD)} a day."
        )
