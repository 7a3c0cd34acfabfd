"""Reads for the usage dashboard and `kb_usage`: the UsageRecord ledger aggregated over a period.

Everything is aggregated in PostgreSQL, one query per table or chart. Days are local days
(settings.TIME_ZONE), like the budgets. Latency percentiles are over calls that went to a
model: a cache hit costs nothing and takes no time, and would drag p50 towards zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db.models import Aggregate, Count, DecimalField, F, FloatField, Q, QuerySet, Sum
from django.db.models.expressions import Combinable
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from kb.models import UsageRecord

if TYPE_CHECKING:
    from kb.selectors import Caller


class PercentileCont(Aggregate):
    """PostgreSQL's `percentile_cont(f) WITHIN GROUP (ORDER BY expr)`: the f-quantile,
    interpolated between the two nearest values; NULL over no rows. Takes `filter=`."""

    function = "percentile_cont"
    name = "PercentileCont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: str | Combinable, fraction: float, *,
                 filter: Q | None = None) -> None:
        fraction = float(fraction)
        if not 0 <= fraction <= 1:
            raise ValueError("A percentile is a fraction between 0 and 1.")
        # A float literal, never user input: formatted into the SQL, not passed as a parameter,
        # because PostgreSQL wants the fraction as a constant of the ordered-set aggregate.
        super().__init__(expression, fraction=repr(fraction), filter=filter)


@dataclass(frozen=True)
class Period:
    """Local calendar days from start to end, both included."""

    start: date
    end: date

    @classmethod
    def last_days(cls, days: int, *, today: date | None = None) -> Period:
        """The `days` days ending today."""
        today = today or timezone.localdate()
        return cls(start=today - timedelta(days=days - 1), end=today)

    @property
    def since(self) -> datetime:
        return timezone.make_aware(datetime.combine(self.start, time.min))

    @property
    def until(self) -> datetime:
        """The first instant after the period (exclusive bound)."""
        return timezone.make_aware(datetime.combine(self.end + timedelta(days=1), time.min))

    @property
    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


@dataclass(frozen=True)
class TimeWindow:
    """Any span of time, `since` included, `until` excluded (kb_usage --since 24h)."""

    since: datetime
    until: datetime


Window = Period | TimeWindow


@dataclass
class UsageSummary:
    """Ledger totals for one group of rows (a day, a kind, a model, or everything)."""

    label: str = ""
    calls: int = 0
    model_calls: int = 0
    searches: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    saved_cost_usd: Decimal = Decimal(0)
    cache_hits: int = 0
    cache_lookups: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    search_p50_ms: float | None = None
    search_p95_ms: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cache_hit_rate(self) -> float | None:
        """Hits over lookups of the answer and query-vector caches; None without lookups."""
        return self.cache_hits / self.cache_lookups if self.cache_lookups else None


_ZERO_USD = Decimal(0)
_CACHED_KINDS = (UsageRecord.Kind.CHAT, UsageRecord.Kind.EMBEDDING)
_MODEL_CALL = ~Q(kind=UsageRecord.Kind.SEARCH)
_TIMED_CALL = Q(cache_hit=False, status=UsageRecord.Status.OK)


def _usd(name: str) -> Coalesce:
    return Coalesce(
        Sum(name), _ZERO_USD, output_field=DecimalField(max_digits=20, decimal_places=8)
    )


def _summary_aggregates(*, latency_filter: Q) -> dict:
    return {
        "calls": Count("pk"),
        "model_calls": Count("pk", filter=_MODEL_CALL),
        "searches": Count("pk", filter=Q(kind=UsageRecord.Kind.SEARCH)),
        "input_tokens": Coalesce(Sum("input_tokens"), 0),
        "output_tokens": Coalesce(Sum("output_tokens"), 0),
        "cost_usd": _usd("cost_usd"),
        "saved_cost_usd": _usd("saved_cost_usd"),
        "cache_hits": Count("pk", filter=Q(cache_hit=True, kind__in=_CACHED_KINDS)),
        "cache_lookups": Count("pk", filter=Q(kind__in=_CACHED_KINDS)),
        "errors": Count("pk", filter=Q(status=UsageRecord.Status.ERROR)),
        "latency_p50_ms": PercentileCont("latency_ms", 0.5, filter=latency_filter),
        "latency_p95_ms": PercentileCont("latency_ms", 0.95, filter=latency_filter),
        "ttft_p50_ms": PercentileCont(
            "time_to_first_token_ms", 0.5, filter=_TIMED_CALL & Q(kind=UsageRecord.Kind.CHAT)
        ),
        "ttft_p95_ms": PercentileCont(
            "time_to_first_token_ms", 0.95, filter=_TIMED_CALL & Q(kind=UsageRecord.Kind.CHAT)
        ),
        "search_p50_ms": PercentileCont(
            "latency_ms", 0.5, filter=Q(kind=UsageRecord.Kind.SEARCH, status=UsageRecord.Status.OK)
        ),
        "search_p95_ms": PercentileCont(
            "latency_ms", 0.95, filter=Q(kind=UsageRecord.Kind.SEARCH, status=UsageRecord.Status.OK)
        ),
    }


_SUMMARY_FIELDS = tuple(_summary_aggregates(latency_filter=Q()).keys())


def _summary(label: str, row: Mapping[str, Any]) -> UsageSummary:
    return UsageSummary(label=label, **{name: row[name] for name in _SUMMARY_FIELDS})


def usage_in(*, period: Window) -> QuerySet[UsageRecord]:
    """The ledger rows of a period."""
    return UsageRecord.objects.filter(created_at__gte=period.since, created_at__lt=period.until)


def usage_totals(*, period: Window) -> UsageSummary:
    """Totals over the period; latency percentiles are over model calls (searches apart)."""
    row = usage_in(period=period).aggregate(
        **_summary_aggregates(latency_filter=_TIMED_CALL & _MODEL_CALL)
    )
    return _summary("Total", row)


def usage_daily(*, period: Period) -> list[UsageSummary]:
    """One summary per day of the period, zero-filled; latency percentiles are of chat calls."""
    rows = (
        usage_in(period=period)
        .annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone()))
        .values("day")
        .annotate(**_summary_aggregates(latency_filter=_TIMED_CALL & Q(kind=UsageRecord.Kind.CHAT)))
        .order_by("day")
    )
    by_day = {row["day"]: row for row in rows}
    return [
        _summary(day.isoformat(), by_day[day]) if day in by_day
        else UsageSummary(label=day.isoformat())
        for day in period.days
    ]


def usage_breakdown(*, period: Window, by: Sequence[str]) -> list[UsageSummary]:
    """Summaries grouped by ledger fields (("kind",), ("provider", "model"), ...), costliest first.

    Latency percentiles are over each group's own calls that reached the model.
    """
    rows = (
        usage_in(period=period)
        .values(*by)
        .annotate(**_summary_aggregates(latency_filter=_TIMED_CALL))
        .order_by("-cost_usd", *by)
    )
    return [_summary("/".join(str(row[name]) for name in by if row[name]), row) for row in rows]


def usage_tokens_by_model_daily(*, period: Period, limit: int = 8) -> dict[str, list[int]]:
    """Tokens per day for each provider/model, the `limit` busiest apart and the rest as "other"."""
    rows = (
        usage_in(period=period)
        .filter(_MODEL_CALL)
        .annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone()))
        .values("day", "provider", "model")
        .annotate(tokens=Sum(F("input_tokens") + F("output_tokens")))
        .order_by("day")
    )
    index = {day: i for i, day in enumerate(period.days)}
    series: dict[str, list[int]] = {}
    for row in rows:
        name = f"{row['provider']}/{row['model']}" if row["model"] else row["provider"]
        series.setdefault(name, [0] * len(index))[index[row["day"]]] += row["tokens"] or 0
    busiest = sorted(series, key=lambda name: (-sum(series[name]), name))
    result = {name: series[name] for name in busiest[:limit] if sum(series[name])}
    rest = busiest[limit:]
    if rest:
        result["other"] = [sum(series[name][i] for name in rest) for i in range(len(index))]
    return result


@dataclass(frozen=True)
class TopSpender:
    id: int
    name: str
    calls: int
    tokens: int
    cost_usd: Decimal


def usage_top_users(*, period: Window, limit: int = 10) -> list[TopSpender]:
    """The users who spent the most (cost, then tokens) in the period."""
    rows = (
        usage_in(period=period)
        .filter(user__isnull=False)
        .values("user_id", "user__username")
        .annotate(calls=Count("pk"), tokens=Sum(F("input_tokens") + F("output_tokens")),
                  cost=_usd("cost_usd"))
        .order_by("-cost", "-tokens", "user__username")[:limit]
    )
    return [TopSpender(r["user_id"], r["user__username"], r["calls"], r["tokens"] or 0, r["cost"])
            for r in rows]


def usage_top_api_keys(*, period: Window, limit: int = 10) -> list[TopSpender]:
    """The API keys that spent the most (cost, then tokens) in the period."""
    rows = (
        usage_in(period=period)
        .filter(api_key__isnull=False)
        .values("api_key_id", "api_key__name", "api_key__prefix")
        .annotate(calls=Count("pk"), tokens=Sum(F("input_tokens") + F("output_tokens")),
                  cost=_usd("cost_usd"))
        .order_by("-cost", "-tokens", "api_key__prefix")[:limit]
    )
    return [
        TopSpender(r["api_key_id"], f"{r['api_key__name']} ({r['api_key__prefix']}…)", r["calls"],
                   r["tokens"] or 0, r["cost"])
        for r in rows
    ]


@dataclass(frozen=True)
class CitedDocument:
    document_id: int
    title: str
    citations: int
    answers: int
    exists: bool


# Who answers "which documents do answers cite": chat registers its selector in its
# AppConfig.ready, because the answers are chat's (kb imports nothing from chat).
CitedDocumentsSource = Callable[..., list[CitedDocument]]
_cited_documents_source: CitedDocumentsSource | None = None


def cited_documents_source_set(source: CitedDocumentsSource | None) -> None:
    """Register the function that reads the most-cited documents (chat does, at startup)."""
    global _cited_documents_source
    _cited_documents_source = source


def documents_most_cited(
    *, period: Window, user: Caller, limit: int = 10
) -> list[CitedDocument]:
    """The documents cited most often by answers in the period that the viewer (`user`, or
    SYSTEM) may read (chat.selectors reads them); none without an app that answers."""
    if _cited_documents_source is None:
        return []
    return _cited_documents_source(period=period, limit=limit, user=user)
