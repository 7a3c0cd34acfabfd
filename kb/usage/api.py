"""The usage ledger over REST, as the admin shows it: the rows, and totals over a period.

Both need “Can view usage record”, and a key that reads every collection: the ledger spans
them all. A row that names a document is listed only if the caller may read that document
(the admin's rule); the totals name no document, as on the admin's usage dashboard.
"""

from __future__ import annotations

from datetime import date, timedelta

from django.contrib.auth.models import User
from django.db.models import Q, QuerySet
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from kb.api.pagination import NewestCreatedFirstCursorPagination
from kb.api.permissions import ADMIN_MODEL
from kb.models import ApiKey, UsageRecord
from kb.selectors import documents_visible
from kb.usage import reports
from kb.usage.views import DEFAULT_DAYS, MAX_DAYS


class UsageRecordSerializer(serializers.ModelSerializer):
    user: serializers.SlugRelatedField[User] = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True)
    api_key: serializers.SlugRelatedField[ApiKey] = serializers.SlugRelatedField(
        slug_field="prefix", read_only=True, allow_null=True)

    class Meta:
        model = UsageRecord
        fields = ["id", "created_at", "kind", "provider", "model", "input_tokens",
                  "output_tokens", "cost_usd", "saved_cost_usd", "latency_ms",
                  "time_to_first_token_ms", "cache_hit", "status", "error", "user", "api_key",
                  "document", "conversation_id", "request_id"]


class UsageFiltersSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=UsageRecord.Kind.choices, required=False)
    status = serializers.ChoiceField(choices=UsageRecord.Status.choices, required=False)
    provider = serializers.CharField(max_length=64, required=False)
    model = serializers.CharField(max_length=255, required=False)
    cache_hit = serializers.BooleanField(required=False, allow_null=True, default=None)
    since = serializers.DateTimeField(required=False, help_text="Included.")
    until = serializers.DateTimeField(required=False, help_text="Excluded.")


class PeriodSerializer(serializers.Serializer):
    start = serializers.DateField(required=False, help_text=f"Default: {DEFAULT_DAYS} days "
                                                            "before `end`.")
    end = serializers.DateField(required=False, help_text="Included; default today.")

    def validate(self, attrs: dict) -> dict:
        end: date = attrs.get("end") or timezone.localdate()
        start: date = attrs.get("start") or end - timedelta(days=DEFAULT_DAYS - 1)
        if start > end:
            raise ValidationError({"start": ["The start date must be on or before the end."]})
        if (end - start).days + 1 > MAX_DAYS:
            raise ValidationError({"start": [f"Choose at most {MAX_DAYS} days."]})
        return {"period": reports.Period(start=start, end=end)}


class UsageSummarySerializer(serializers.Serializer):
    # `label` and `errors` are names DRF's own classes use.
    group = serializers.CharField(source="label", help_text="The day, kind or provider/model.")
    calls = serializers.IntegerField()
    model_calls = serializers.IntegerField()
    searches = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cost_usd = serializers.DecimalField(max_digits=20, decimal_places=8)
    saved_cost_usd = serializers.DecimalField(max_digits=20, decimal_places=8)
    cache_hits = serializers.IntegerField()
    cache_lookups = serializers.IntegerField()
    cache_hit_rate = serializers.FloatField(allow_null=True)
    failed_calls = serializers.IntegerField(source="errors")
    latency_p50_ms = serializers.FloatField(allow_null=True)
    latency_p95_ms = serializers.FloatField(allow_null=True)
    ttft_p50_ms = serializers.FloatField(allow_null=True)
    ttft_p95_ms = serializers.FloatField(allow_null=True)


class UsageReportSerializer(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    totals = UsageSummarySerializer()
    by_kind = UsageSummarySerializer(many=True)
    by_model = UsageSummarySerializer(many=True)
    daily = UsageSummarySerializer(many=True)


def _query(request: Request, serializer_class: type[serializers.Serializer]) -> dict:
    serializer = serializer_class(data=request.query_params)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class UsageRecordList(generics.ListAPIView):
    """The ledger, newest first: one row per model call, served search or cache hit."""

    serializer_class = UsageRecordSerializer
    permission_classes = ADMIN_MODEL
    pagination_class = NewestCreatedFirstCursorPagination

    def get_queryset(self) -> QuerySet[UsageRecord]:
        filters = _query(self.request, UsageFiltersSerializer)
        rows = UsageRecord.objects.select_related("user", "api_key").filter(
            Q(document__isnull=True)
            | Q(document__in=documents_visible(user=self.request.user, include_disabled=True))
        )
        for name in ("kind", "status", "provider", "model"):
            if name in filters:
                rows = rows.filter(**{name: filters[name]})
        if filters.get("cache_hit") is not None:
            rows = rows.filter(cache_hit=filters["cache_hit"])
        if "since" in filters:
            rows = rows.filter(created_at__gte=filters["since"])
        if "until" in filters:
            rows = rows.filter(created_at__lt=filters["until"])
        return rows

    @extend_schema(parameters=[UsageFiltersSerializer])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class UsageReport(APIView):
    """Totals over a period of local calendar days, by kind, by provider/model and by day:
    the admin's usage dashboard as data."""

    permission_classes = ADMIN_MODEL
    queryset = UsageRecord.objects.none()  # names the model whose permissions apply

    @extend_schema(parameters=[PeriodSerializer], responses={200: UsageReportSerializer})
    def get(self, request: Request) -> Response:
        period: reports.Period = _query(request, PeriodSerializer)["period"]
        body = {
            "start": period.start, "end": period.end,
            "totals": reports.usage_totals(period=period),
            "by_kind": reports.usage_breakdown(period=period, by=("kind",)),
            "by_model": reports.usage_breakdown(period=period, by=("provider", "model")),
            "daily": reports.usage_daily(period=period),
        }
        return Response(UsageReportSerializer(body).data)
