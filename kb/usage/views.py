"""The usage dashboard in the admin (/admin/usage/): charts of the ledger, and its CSV export.

A thin view: the form validates the period, kb.usage.reports reads, kb.usage.charts draws. It sits
behind admin.site.admin_view (active staff only, others go to the admin login) and also
needs the permission to view usage records, like the ledger's own admin page.
"""

from __future__ import annotations

import csv
from datetime import date, timedelta

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.translation import ngettext

from kb.usage import charts, reports
from kb.usage.charts import Series

DEFAULT_DAYS = 30
MAX_DAYS = 366

# The CSV columns, in order: the daily aggregates the dashboard charts.
CSV_COLUMNS = (
    ("date", lambda d: d.label),
    ("calls", lambda d: d.calls),
    ("model_calls", lambda d: d.model_calls),
    ("searches", lambda d: d.searches),
    ("input_tokens", lambda d: d.input_tokens),
    ("output_tokens", lambda d: d.output_tokens),
    ("cost_usd", lambda d: f"{d.cost_usd:.8f}"),
    ("saved_cost_usd", lambda d: f"{d.saved_cost_usd:.8f}"),
    ("cache_hits", lambda d: d.cache_hits),
    ("cache_lookups", lambda d: d.cache_lookups),
    ("cache_hit_rate", lambda d: _fixed(d.cache_hit_rate, 4)),
    ("errors", lambda d: d.errors),
    ("chat_latency_p50_ms", lambda d: _fixed(d.latency_p50_ms)),
    ("chat_latency_p95_ms", lambda d: _fixed(d.latency_p95_ms)),
    ("time_to_first_token_p50_ms", lambda d: _fixed(d.ttft_p50_ms)),
    ("time_to_first_token_p95_ms", lambda d: _fixed(d.ttft_p95_ms)),
    ("search_latency_p50_ms", lambda d: _fixed(d.search_p50_ms)),
    ("search_latency_p95_ms", lambda d: _fixed(d.search_p95_ms)),
)


def _fixed(value: float | None, places: int = 1) -> str:
    return "" if value is None else f"{value:.{places}f}"


class PeriodForm(forms.Form):
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, object]:
        super().clean()
        cleaned = self.cleaned_data
        today = timezone.localdate()
        end: date = cleaned.get("end") or today
        start: date = cleaned.get("start") or end - timedelta(days=DEFAULT_DAYS - 1)
        if start > end:
            raise forms.ValidationError("The start date must be on or before the end date.")
        if (end - start).days + 1 > MAX_DAYS:
            raise forms.ValidationError(f"Choose at most {MAX_DAYS} days.")
        cleaned["period"] = reports.Period(start=start, end=end)
        return cleaned


def usage_dashboard(request: HttpRequest) -> HttpResponse:
    """Charts of cost, tokens, latency, caching, top spenders and cited documents; ?format=csv."""
    if not request.user.has_perm("kb.view_usagerecord"):
        raise PermissionDenied
    form = PeriodForm(request.GET)
    if form.is_valid():
        period = form.cleaned_data["period"]
        if not (request.GET.get("start") and request.GET.get("end")):
            # Show the dates the defaults chose.
            form = PeriodForm(initial={"start": period.start, "end": period.end})
    else:
        period = reports.Period.last_days(DEFAULT_DAYS)
    daily = reports.usage_daily(period=period)
    if request.GET.get("format") == "csv":
        return _csv_response(period, daily)
    top_users = reports.usage_top_users(period=period)
    top_api_keys = reports.usage_top_api_keys(period=period)
    cited_documents = reports.documents_most_cited(period=period, user=request.user)
    context = {
        **admin.site.each_context(request),
        "title": "Usage dashboard",
        "form": form,
        "period": period,
        "totals": reports.usage_totals(period=period),
        "by_kind": reports.usage_breakdown(period=period, by=("kind",)),
        "top_users": top_users,
        "top_api_keys": top_api_keys,
        "cited_documents": cited_documents,
        "charts": {
            **_daily_charts(period, daily),
            "top_users": _spenders_chart("Top users", top_users),
            "top_api_keys": _spenders_chart("Top API keys", top_api_keys),
            "cited": charts.hbar_chart(
                title="Most-cited documents (cited passages)",
                labels=[c.title for c in cited_documents],
                values=[c.citations for c in cited_documents],
            ),
        },
        "csv_query": _csv_query(period),
    }
    return TemplateResponse(request, "admin/kb/usage_dashboard.html", context)


def _daily_charts(period: reports.Period, daily: list[reports.UsageSummary]) -> dict:
    labels = [d.label[5:] for d in daily]  # MM-DD; the year is in the period shown above
    tokens = reports.usage_tokens_by_model_daily(period=period)
    return {
        "cost": charts.bar_chart(
            title="Cost per day (USD)", x_labels=labels,
            series=[Series("Cost", [d.cost_usd for d in daily])], value_format=charts.format_usd,
            zero_note=_free_calls_note(sum(d.model_calls for d in daily)),
        ),
        "tokens": charts.bar_chart(
            title="Tokens per day by model", x_labels=labels,
            series=[Series(name, values) for name, values in tokens.items()],
        ),
        "latency": charts.line_chart(
            title="Chat latency and time to first token", x_labels=labels,
            value_format=charts.format_ms,
            series=[
                Series("latency p50", [d.latency_p50_ms for d in daily]),
                Series("latency p95", [d.latency_p95_ms for d in daily]),
                Series("first token p50", [d.ttft_p50_ms for d in daily]),
                Series("first token p95", [d.ttft_p95_ms for d in daily]),
            ],
        ),
        "search_latency": charts.line_chart(
            title="Search latency", x_labels=labels, value_format=charts.format_ms,
            series=[Series("p50", [d.search_p50_ms for d in daily]),
                    Series("p95", [d.search_p95_ms for d in daily])],
        ),
        "cache_rate": charts.line_chart(
            title="Cache hit rate (answers and query vectors)", x_labels=labels,
            value_format=charts.format_percent, y_max=1.0,
            series=[Series("hit rate", [d.cache_hit_rate for d in daily])],
        ),
        "cache_saved": charts.bar_chart(
            title="Cost saved by caches (USD)", x_labels=labels, value_format=charts.format_usd,
            series=[Series("Saved", [d.saved_cost_usd for d in daily])],
        ),
    }


def _free_calls_note(calls: int) -> str:
    # Local models record their calls at $0: a blank chart would read as "nothing happened".
    if not calls:
        return ""
    return ngettext("%(calls)s model call, at no cost", "%(calls)s model calls, all at no cost",
                    calls) % {"calls": f"{calls:,}"}


def _spenders_chart(title: str, spenders: list[reports.TopSpender]):
    # Ranked by cost; with local models everything costs $0, so rank by tokens instead.
    if any(s.cost_usd for s in spenders):
        return charts.hbar_chart(title=f"{title} by cost", labels=[s.name for s in spenders],
                                 values=[s.cost_usd for s in spenders],
                                 value_format=charts.format_usd)
    return charts.hbar_chart(title=f"{title} by tokens", labels=[s.name for s in spenders],
                             values=[s.tokens for s in spenders])


def _csv_query(period: reports.Period) -> str:
    return f"start={period.start.isoformat()}&end={period.end.isoformat()}&format=csv"


def _csv_response(period: reports.Period, daily: list[reports.UsageSummary]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="kb-usage-{period.start.isoformat()}-{period.end.isoformat()}.csv"'
    )
    writer = csv.writer(response)
    writer.writerow([name for name, _ in CSV_COLUMNS])
    for day in daily:
        writer.writerow([value(day) for _, value in CSV_COLUMNS])
    return response
