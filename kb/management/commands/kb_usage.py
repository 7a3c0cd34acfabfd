"""`manage.py kb_usage [--since 7d|24h|30d|YYYY-MM-DD]`: cost and usage report in the terminal."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from kb.usage import reports
from kb.usage.reports import UsageSummary

_RELATIVE = re.compile(r"(\d+)([hdw])")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def since_parse(value: str, *, now: datetime | None = None) -> datetime:
    """`24h`, `7d`, `2w` before now, or local midnight of a `YYYY-MM-DD` date."""
    now = now or timezone.now()
    match = _RELATIVE.fullmatch(value.strip().lower())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        day = date.fromisoformat(value.strip())
    except ValueError:
        raise CommandError(
            f"--since takes 24h, 7d, 2w or a date like 2025-01-31, not {value!r}."
        ) from None
    return timezone.make_aware(datetime.combine(day, time.min))


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms"


def _rate(row: UsageSummary) -> str:
    return "—" if row.cache_hit_rate is None else f"{row.cache_hit_rate:.0%}"


def _usd(value) -> str:
    return f"${value:,.4f}"


COLUMNS: tuple[tuple[str, Callable[[UsageSummary], str]], ...] = (
    ("calls", lambda r: f"{r.calls:,}"),
    ("errors", lambda r: f"{r.errors:,}"),
    ("input tok", lambda r: f"{r.input_tokens:,}"),
    ("output tok", lambda r: f"{r.output_tokens:,}"),
    ("cost", lambda r: _usd(r.cost_usd)),
    ("p50", lambda r: _ms(r.latency_p50_ms)),
    ("p95", lambda r: _ms(r.latency_p95_ms)),
    ("cache hits", _rate),
    ("saved", lambda r: _usd(r.saved_cost_usd)),
)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: int = 1) -> str:
    """A plain-text table: the first `text_columns` left-aligned, the numbers right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if i < text_columns else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


class Command(BaseCommand):
    help = "Print tokens, cost, latency and cache use from the usage ledger."

    def add_arguments(self, parser):
        parser.add_argument("--since", default="7d",
                            help="How far back: 24h, 7d, 30d, 2w, or a date YYYY-MM-DD "
                                 "(default 7d).")

    def handle(self, *args, since: str, **options):
        now = timezone.now()
        window = reports.TimeWindow(
            since=since_parse(since, now=now), until=now + timedelta(seconds=1)
        )
        totals = reports.usage_totals(period=window)
        by_kind = reports.usage_breakdown(period=window, by=("kind",))
        by_model = reports.usage_breakdown(period=window, by=("provider", "model"))
        started = timezone.localtime(window.since)
        self.stdout.write(f"Usage since {started:%Y-%m-%d %H:%M %Z} ({since})\n")
        if not totals.calls:
            self.stdout.write("No usage recorded in this period.")
            return
        headers = [name for name, _ in COLUMNS]
        self.stdout.write(table(["", *headers], [["total", *(fmt(totals) for _, fmt in COLUMNS)]]))
        self.stdout.write(
            f"\n{totals.model_calls:,} model calls, {totals.searches:,} searches. Latency is over "
            "calls that reached a model; cache hits are answer-cache and query-vector hits."
        )
        for title, rows in (("kind", by_kind), ("provider/model", by_model)):
            self.stdout.write(f"\nBy {title}")
            self.stdout.write(table([title, *headers],
                                    [[row.label or "—", *(fmt(row) for _, fmt in COLUMNS)]
                                     for row in rows]))
