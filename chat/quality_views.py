"""The editors' Quality screen in the admin (/admin/quality/), and its CSV export.

A thin view over chat.quality: the form picks the period and the collection. It sits
behind admin.site.admin_view (active staff only) and needs “Can view message”, the
permission that lets an editor read answers in the message admin.
"""

from __future__ import annotations

import csv

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import urlencode

from chat import quality
from kb.models import Collection
from kb.selectors import AnyUser, collections_visible
from kb.usage import reports
from kb.usage.views import DEFAULT_DAYS, PeriodForm

CSV_COLUMNS = ("kind", "created_at", "question", "answer", "rating", "reason", "comment",
               "collections", "asked_by", "answerability", "retrieved")


class QualityFilterForm(PeriodForm):
    collection = forms.ModelChoiceField(queryset=Collection.objects.none(), required=False,
                                        to_field_name="slug", empty_label="All collections")

    def __init__(self, *args, user: AnyUser, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["collection"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = collections_visible(user=user).order_by("name")


def quality_screen(request: HttpRequest) -> HttpResponse:
    """Rated-down and not-covered answers with what they retrieved, unanswered topics, the
    most and never cited documents; ?format=csv exports the answers."""
    if not request.user.has_perm("chat.view_message"):
        raise PermissionDenied
    form = QualityFilterForm(request.GET or None, user=request.user)
    if form.is_valid():
        period, collection = form.cleaned_data["period"], form.cleaned_data["collection"]
    else:
        period, collection = reports.Period.last_days(DEFAULT_DAYS), None
    report = quality.quality_report(user=request.user, period=period, collection=collection)
    rated_down, not_covered = report.rated_down, report.not_covered
    if request.GET.get("format") == "csv":
        return _csv_response(period, rated_down, not_covered)
    if request.user.has_perm("search.add_goldenquery"):
        for answer in rated_down:
            answer.golden_add_url = _golden_add_url(answer)  # type: ignore[attr-defined]
        for answer in not_covered:
            # What retrieval found did not answer it: the editor picks the documents.
            answer.golden_add_url = _golden_add_url(  # type: ignore[attr-defined]
                answer, with_documents=False)
    context = {
        **admin.site.each_context(request),
        "title": "Quality",
        "form": form,
        "period": period,
        "collection": collection,
        "rated_down": rated_down,
        "not_covered": not_covered,
        "topics": report.topics,
        "most_cited": report.most_cited,
        "never_cited": report.never_cited,
        "csv_query": _csv_query(request),
    }
    return TemplateResponse(request, "admin/chat/quality.html", context)


def _golden_add_url(answer: quality.ReviewedAnswer, *, with_documents: bool = True) -> str:
    """The golden set admin's add form, filled in from the answer."""
    initial = quality.golden_initial(answer, with_documents=with_documents)
    return f"{reverse('admin:search_goldenquery_add')}?{urlencode(initial)}"


def _csv_query(request: HttpRequest) -> str:
    query = request.GET.copy()
    query["format"] = "csv"
    return query.urlencode()


def _csv_response(period: reports.Period, rated_down: list[quality.ReviewedAnswer],
                  not_covered: list[quality.ReviewedAnswer]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="quality-{period.start}-{period.end}.csv"')
    writer = csv.writer(response)
    writer.writerow(CSV_COLUMNS)
    for kind, answers in (("rated_down", rated_down), ("not_covered", not_covered)):
        for answer in answers:
            writer.writerow([
                kind, answer.created_at.isoformat(), answer.question, answer.answer,
                answer.rating, answer.reason, answer.comment, " ".join(answer.collections),
                answer.asked_by,
                "" if answer.answerability is None else f"{answer.answerability:.3f}",
                "; ".join(f"{p.title} ({p.score:.4f})" for p in answer.retrieved),
            ])
    return response
