"""What the chat admin does, over REST: budgets, the answer cache (read and clear), and the
Quality screen's report.

The admin's permissions apply (kb.api.permissions.ADMIN_MODEL): “Can view budget” to list
budgets, “Can add / change / delete budget” to write them; the cache's entries are read
with “Can view cached answer” and cleared with “Can delete cached answer”, and an editor
sees only the entries the cache admin shows them (chat.selectors). Both span every
collection, so a key narrowed to some collections is refused.
"""

from __future__ import annotations

from copy import copy
from dataclasses import asdict
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import answer_cache, quality, selectors
from chat.models import AnswerCacheEntry, Budget
from chat.quality_views import QualityFilterForm
from kb.api.conventions import IDEMPOTENCY_KEY, idempotent
from kb.api.pagination import BoundedCursorPagination
from kb.api.permissions import ADMIN_MODEL, WholeKnowledgeBaseKey
from kb.models import ApiKey, Collection


class UsernameField(serializers.SlugRelatedField):
    """A user named by username; a NUL, which PostgreSQL text cannot hold, is an unknown
    user (400) rather than a database error (500)."""

    def to_internal_value(self, data: object) -> object:
        if isinstance(data, str) and "\x00" in data:
            self.fail("does_not_exist", slug_name=self.slug_field, value=data)
        return super().to_internal_value(data)


class BudgetSerializer(serializers.ModelSerializer):
    user = UsernameField(
        slug_field="username", queryset=get_user_model().objects.all(), required=False,
        allow_null=True, help_text="For scope user: the user's username.")
    api_key = serializers.PrimaryKeyRelatedField(
        queryset=ApiKey.objects.all(), required=False, allow_null=True,
        help_text="For scope api_key: the key's id (GET /api/v1/keys/).")

    class Meta:
        model = Budget
        fields = ["id", "scope", "user", "api_key", "daily_token_limit", "daily_cost_limit_usd",
                  "created_at", "updated_at"]
        # DRF would turn the conditional unique constraints into "required" fields; the
        # model's full_clean in validate() applies them with their conditions.
        validators: list = []

    def validate(self, attrs: dict) -> dict:
        """The model's own rules (one global budget, one per user or key, a target that
        matches the scope), as the admin's form checks them."""
        budget = copy(self.instance) if self.instance is not None else Budget()
        for name, value in attrs.items():
            setattr(budget, name, value)
        try:
            budget.full_clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from None
        return attrs


class AnswerCacheEntrySerializer(serializers.ModelSerializer):
    collection: serializers.SlugRelatedField[Collection] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True)
    # A plain string: as a choice field its enum would collide with search's `mode`.
    mode = serializers.CharField(read_only=True, help_text="generated or extracted")

    class Meta:
        model = AnswerCacheEntry
        fields = ["id", "question", "answer", "collection", "mode", "citations", "cited",
                  "source_document_ids", "provider", "model", "embedding_model", "input_tokens",
                  "output_tokens", "cost_usd", "hits", "created_at", "last_hit_at"]


class BudgetList(generics.ListCreateAPIView):
    """Daily token and cost ceilings: one global, per user, per API key. An empty limit is
    unlimited; a row replaces the KB_BUDGET_* default for its target."""

    serializer_class = BudgetSerializer
    permission_classes = ADMIN_MODEL
    queryset = Budget.objects.select_related("user").order_by("pk")

    @extend_schema(parameters=[IDEMPOTENCY_KEY])
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return idempotent(request, lambda: super(BudgetList, self).post(request, *args, **kwargs))


class BudgetDetail(generics.RetrieveUpdateDestroyAPIView):
    serializer_class = BudgetSerializer
    permission_classes = ADMIN_MODEL
    queryset = Budget.objects.select_related("user")
    http_method_names = ["get", "patch", "delete", "head", "options"]


class AnswerCacheList(generics.ListAPIView):
    """The cached answers you may read, newest first. DELETE clears all of them."""

    serializer_class = AnswerCacheEntrySerializer
    permission_classes = ADMIN_MODEL
    pagination_class = BoundedCursorPagination

    def get_queryset(self) -> QuerySet[AnswerCacheEntry]:
        return selectors.answer_cache_entries_for_admin(
            user=self.request.user).select_related("collection")

    @extend_schema(operation_id="v1_answer_cache_clear", responses={204: None})
    def delete(self, request: Request) -> Response:
        ids = list(self.get_queryset().values_list("pk", flat=True))
        answer_cache.cache_clear(entry_ids=ids)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AnswerCacheDetail(generics.RetrieveDestroyAPIView):
    """One cached answer; DELETE clears it (the next such question asks the model)."""

    serializer_class = AnswerCacheEntrySerializer
    permission_classes = ADMIN_MODEL

    def get_queryset(self) -> QuerySet[AnswerCacheEntry]:
        return selectors.answer_cache_entries_for_admin(
            user=self.request.user).select_related("collection")

    def perform_destroy(self, instance: AnswerCacheEntry) -> None:
        answer_cache.cache_clear(entry_ids=[instance.pk])


class QualityReport(APIView):
    """The Quality screen as data: answers rated down and not covered (with what retrieval
    found), unanswered topics, the most and never cited documents, for a period of local
    days (default the last 30) and optionally one collection. “Can view message”, and a
    key not narrowed to collections."""

    permission_classes = [IsAuthenticated, WholeKnowledgeBaseKey]

    @extend_schema(parameters=[OpenApiParameter("start", OpenApiTypes.DATE),
                               OpenApiParameter("end", OpenApiTypes.DATE),
                               OpenApiParameter("collection", OpenApiTypes.STR)],
                   responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request) -> Response:
        if not request.user.has_perm("chat.view_message"):
            raise PermissionDenied("This needs the “Can view message” permission.")
        form = QualityFilterForm(request.query_params, user=request.user)
        if not form.is_valid():
            raise ValidationError({name: [str(e) for e in errors]
                                   for name, errors in form.errors.items()})
        period, collection = form.cleaned_data["period"], form.cleaned_data["collection"]
        report = quality.quality_report(user=request.user, period=period,
                                        collection=collection)
        return Response({
            "start": period.start, "end": period.end,
            "collection": collection.slug if collection else None,
            "rated_down": [asdict(a) for a in report.rated_down],
            "not_covered": [asdict(a) for a in report.not_covered],
            "topics": [{"size": t.size, "questions": t.questions} for t in report.topics],
            "most_cited": [asdict(row) for row in report.most_cited],
            "never_cited": [{"id": d.pk, "title": str(d), "collection": d.collection.slug}
                            for d in report.never_cited],
        })
