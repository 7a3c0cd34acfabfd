"""Golden sets over REST, as the golden set admin edits them: /api/v1/golden-queries/.

The admin's permissions (“Can view / add / change / delete golden query”) and collection
access: a query in a collection the caller cannot read is not theirs to see (404).
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from kb.api.conventions import IDEMPOTENCY_KEY, idempotent
from kb.api.permissions import AdminModelPermissions
from kb.models import ApiKey, Collection, Document
from kb.selectors import collections_visible
from search import golden
from search.models import GoldenQuery


class DocumentIdsField(serializers.ListField):
    """Document ids in, document ids out (from the query's documents)."""

    def to_representation(self, data: Any) -> list[int]:
        return sorted(document.pk for document in data.all())


class GoldenQuerySerializer(serializers.ModelSerializer):
    collection = serializers.SlugField(source="collection.slug", max_length=64)
    documents = DocumentIdsField(
        child=serializers.IntegerField(min_value=1, max_value=2**63 - 1), min_length=1,
        max_length=200, help_text="Ids of the documents that answer the question.")
    version = serializers.SerializerMethodField(
        help_text="The collection's golden set version after this query's last change.")

    class Meta:
        model = GoldenQuery
        fields = ["id", "collection", "question", "documents", "version", "source_message_id",
                  "created_at", "updated_at"]
        read_only_fields = ["source_message_id", "created_at", "updated_at"]
        validators: list = []  # the (collection, question) rule is the service's

    def get_version(self, query: GoldenQuery) -> int:
        return golden.golden_set_version(collection=query.collection)


def _caller_key(request: Request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


def _visible(request: Request) -> QuerySet[GoldenQuery]:
    return GoldenQuery.objects.filter(
        collection__in=collections_visible(user=request.user, api_key=_caller_key(request))
    ).select_related("collection").prefetch_related("documents")


def _resolved(request: Request, data: dict, collection: Collection | None = None
              ) -> tuple[Collection, list[Document]]:
    """The collection (readable by the caller) and the documents the request names."""
    if collection is None:
        slug = data["collection"]["slug"]
        collection = collections_visible(user=request.user, api_key=_caller_key(request)).filter(
            slug=slug).first()
        if collection is None:
            raise ValidationError({"collection": [f"No collection “{slug}” that you can read."]})
    ids = data.get("documents")
    documents = list(Document.objects.filter(collection=collection, pk__in=ids or []))
    missing = sorted(set(ids or []) - {d.pk for d in documents})
    if missing:
        raise ValidationError({"documents": [
            f"Not documents of {collection.slug}: {', '.join(map(str, missing))}."]})
    return collection, documents


class GoldenQueryList(generics.ListAPIView):
    """The golden queries of the collections you may read (?collection=SLUG for one);
    POST adds one."""

    serializer_class = GoldenQuerySerializer
    permission_classes = [AdminModelPermissions]

    def get_queryset(self) -> QuerySet[GoldenQuery]:
        queries = _visible(self.request).order_by("collection__slug", "pk")
        slug = self.request.query_params.get("collection")
        return queries.filter(collection__slug=slug) if slug else queries

    @extend_schema(parameters=[IDEMPOTENCY_KEY], responses={201: GoldenQuerySerializer})
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return idempotent(request, lambda: self._create(request))

    def _create(self, request: Request) -> Response:
        serializer = GoldenQuerySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        collection, documents = _resolved(request, serializer.validated_data)
        try:
            query = golden.golden_query_save(
                collection=collection, question=serializer.validated_data["question"],
                documents=documents, user=request.user)
        except golden.GoldenSetError as exc:
            raise ValidationError({"question": [str(exc)]}) from None
        return Response(GoldenQuerySerializer(query).data, status=status.HTTP_201_CREATED)


class GoldenQueryDetail(generics.RetrieveDestroyAPIView):
    """One golden query; PATCH changes its wording or documents, DELETE removes it. Each
    change moves the collection's golden set to its next version."""

    serializer_class = GoldenQuerySerializer
    permission_classes = [AdminModelPermissions]

    def get_queryset(self) -> QuerySet[GoldenQuery]:
        return _visible(self.request)

    @extend_schema(request=GoldenQuerySerializer, responses={200: GoldenQuerySerializer})
    def patch(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        query = self.get_object()
        serializer = GoldenQuerySerializer(query, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        documents = (_resolved(request, data, collection=query.collection)[1]
                     if "documents" in data else None)
        try:
            query = golden.golden_query_update(query=query, question=data.get("question"),
                                               documents=documents)
        except golden.GoldenSetError as exc:
            raise ValidationError({"question": [str(exc)]}) from None
        except IntegrityError:
            raise ValidationError({"question": ["The golden set has this question already."]}
                                  ) from None
        return Response(GoldenQuerySerializer(query).data)

    def perform_destroy(self, instance: GoldenQuery) -> None:
        golden.golden_query_delete(query=instance)
