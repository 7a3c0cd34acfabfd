"""`/api/v1/search`: hybrid search over the API, GET with query parameters or POST JSON."""

from __future__ import annotations

import json

from django.utils.datastructures import MultiValueDict
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from kb.api.ratelimits import rate_limit_enforce
from kb.models import ApiKey, chunk_source_url
from search import services


class SearchFiltersSerializer(serializers.Serializer):
    document_ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=2**63 - 1),
        required=False, max_length=1000,
    )
    metadata = serializers.DictField(
        required=False, help_text="Document metadata must contain these pairs."
    )
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def validate_metadata(self, value: dict) -> dict:
        if not _storable_in_jsonb(value):
            raise serializers.ValidationError(
                "Keys and values cannot contain NUL characters or unpaired surrogates.")
        return value


def _storable_in_jsonb(value: object) -> bool:
    """False for what PostgreSQL's jsonb refuses: U+0000 and unpaired surrogates."""
    if isinstance(value, str):
        return "\x00" not in value and not any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return all(_storable_in_jsonb(k) and _storable_in_jsonb(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_storable_in_jsonb(item) for item in value)
    return True


@extend_schema_field(SearchFiltersSerializer)
class JSONObjectField(serializers.Field):
    """Accepts a JSON object, or a JSON string of one (for GET query parameters)."""

    def to_internal_value(self, data: object) -> dict:
        if isinstance(data, str):
            try:
                data = json.loads(data) if data.strip() else {}
            except ValueError:
                raise serializers.ValidationError("Must be a JSON object.") from None
        if not isinstance(data, dict):
            raise serializers.ValidationError("Must be a JSON object.")
        nested = SearchFiltersSerializer(data=data)
        nested.is_valid(raise_exception=True)
        return nested.validated_data

    def to_representation(self, value: dict) -> dict:
        return value


class SearchRequestSerializer(serializers.Serializer):
    query = serializers.CharField(allow_blank=True, trim_whitespace=False, max_length=20000)
    k = serializers.IntegerField(min_value=1, max_value=100, default=10)
    mode = serializers.ChoiceField(choices=services.MODES, default="hybrid")
    rerank = serializers.BooleanField(required=False, allow_null=True, default=None,
                                      help_text="Rerank the fused top-N. Off by default "
                                                "(see docs/RETRIEVAL.md).")
    collection = serializers.ListField(
        child=serializers.SlugField(), required=False, default=list, max_length=50,
        help_text="Collection slugs; all visible collections when empty.",
    )
    filters = JSONObjectField(required=False, default=dict)
    fusion = serializers.ChoiceField(choices=services.FUSIONS, default="rrf")
    explain = serializers.BooleanField(default=False)

    def to_internal_value(self, data: object) -> dict:
        # GET passes `collection` once or repeated, or comma-separated.
        if isinstance(data, MultiValueDict):  # a QueryDict
            plain = {key: data.get(key) for key in data}
            collections = []
            for value in data.getlist("collection"):
                collections += [part for part in value.split(",") if part]
            plain["collection"] = collections
            data = plain
        elif isinstance(data, dict) and isinstance(data.get("collection"), str):
            data = {**data, "collection": [data["collection"]]}
        return super().to_internal_value(data)


# A docstring here would be published as the schema's description: comments only.
class SearchHitSerializer(serializers.Serializer):
    # A services.SearchHit; `stages` only when the search was explained.
    chunk_id = serializers.IntegerField()
    document_id = serializers.IntegerField()
    document_title = serializers.CharField()
    text = serializers.CharField()
    snippet = serializers.CharField(help_text="HTML-escaped text with query terms in <mark>.")
    score = serializers.FloatField()
    heading_path = serializers.ListField(child=serializers.CharField())
    page_start = serializers.IntegerField(allow_null=True)
    page_end = serializers.IntegerField(allow_null=True)
    url = serializers.SerializerMethodField()
    stages = serializers.DictField(
        required=False, help_text="Per-stage scores and ranks (explain=true)."
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if not self.context.get("explain", True):
            del fields["stages"]
        return fields

    def get_url(self, hit: services.SearchHit) -> str:
        return chunk_source_url(document_id=hit.document_id, chunk_id=hit.chunk_id)


class SearchResponseSerializer(serializers.Serializer):
    # The query, a services.SearchResult's hits and notices; its timings when explained.
    query = serializers.CharField()
    mode = serializers.CharField()
    reranked = serializers.BooleanField()
    results = SearchHitSerializer(many=True)
    notices = serializers.ListField(child=serializers.CharField())
    timings_ms = serializers.DictField(child=serializers.FloatField(), required=False)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if not self.context.get("explain", True):
            del fields["timings_ms"]
        return fields


class SearchView(APIView):
    """Hybrid search: BM25 in PostgreSQL + pgvector HNSW, fused with RRF, optionally reranked."""

    @extend_schema(
        parameters=[
            OpenApiParameter("query", OpenApiTypes.STR, required=True),
            OpenApiParameter("k", OpenApiTypes.INT),
            OpenApiParameter("mode", OpenApiTypes.STR, enum=list(services.MODES)),
            OpenApiParameter("rerank", OpenApiTypes.BOOL),
            OpenApiParameter("collection", OpenApiTypes.STR, many=True),
            OpenApiParameter("filters", OpenApiTypes.STR, description="JSON object"),
            OpenApiParameter("fusion", OpenApiTypes.STR, enum=list(services.FUSIONS)),
            OpenApiParameter("explain", OpenApiTypes.BOOL),
        ],
        responses=SearchResponseSerializer,
    )
    def get(self, request: Request) -> Response:
        return self._search(request, request.query_params)

    @extend_schema(request=SearchRequestSerializer, responses=SearchResponseSerializer)
    def post(self, request: Request) -> Response:
        return self._search(request, request.data)

    def _search(self, request: Request, data: object) -> Response:
        rate_limit_enforce(request, group="search")
        serializer = SearchRequestSerializer(data=data)
        serializer.is_valid(raise_exception=True)
        values = serializer.validated_data
        filters = values["filters"]
        params = services.SearchParams(
            query=values["query"],
            k=values["k"],
            mode=values["mode"],
            rerank=values["rerank"],
            collections=tuple(values["collection"]),
            document_ids=tuple(filters.get("document_ids", ())),
            metadata=filters.get("metadata", {}),
            created_after=filters.get("created_after"),
            created_before=filters.get("created_before"),
            fusion=values["fusion"],
            explain=values["explain"],
        )
        api_key = request.auth if isinstance(request.auth, ApiKey) else None
        result = services.search(params=params, user=request.user, api_key=api_key)
        response = SearchResponseSerializer(
            {"query": values["query"], "mode": result.mode, "reranked": result.reranked,
             "results": result.hits, "notices": result.notices, "timings_ms": result.timings_ms},
            context={"explain": values["explain"]},
        )
        return Response(response.data)
