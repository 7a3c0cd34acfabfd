"""Collections, documents and chunks: reading, multipart upload, and the admin's document
actions (delete, disable, enable, reprocess)."""

from __future__ import annotations

from collections.abc import Mapping

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import generics, parsers, serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from kb.api.ratelimits import rate_limit_enforce
from kb.models import ApiKey, Chunk, Collection, Document
from kb.selectors import collections_visible, collections_with_counts, documents_visible
from kb.services import documents, uploads


class CollectionSerializer(serializers.ModelSerializer):
    document_count = serializers.IntegerField(read_only=True)
    chunk_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Collection
        fields = ["id", "slug", "name", "description", "text_search_config", "is_public",
                  "document_count", "chunk_count", "created_at", "updated_at"]


class DocumentSerializer(serializers.ModelSerializer):
    collection: serializers.SlugRelatedField[Collection] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )

    class Meta:
        model = Document
        fields = ["id", "collection", "title", "original_filename", "mime_type", "size_bytes",
                  "content_hash", "status", "stage", "error_message", "metadata", "chunks_total",
                  "chunks_embedded", "processing_started_at", "processing_finished_at",
                  "created_at", "updated_at"]


class ChunkSerializer(serializers.ModelSerializer):
    class Meta:
        model = Chunk
        fields = ["id", "document", "ordinal", "text", "token_count", "heading_path",
                  "char_start", "char_end", "page_start", "page_end"]


class DocumentListFiltersSerializer(serializers.Serializer):
    collection = serializers.SlugField(
        required=False, help_text="Only documents of this collection."
    )
    status = serializers.ChoiceField(choices=Document.Status.choices, required=False)


class ChunkListFiltersSerializer(serializers.Serializer):
    # Bounded by bigint, so an overlong id is a 400 rather than a database error.
    document = serializers.IntegerField(min_value=1, max_value=2**63 - 1, required=False,
                                        help_text="Only chunks of this document.")


class UploadSerializer(serializers.Serializer):
    file = serializers.ListField(child=serializers.FileField(allow_empty_file=True), min_length=1,
                                 max_length=settings.DATA_UPLOAD_MAX_NUMBER_FILES)
    collection = serializers.SlugField(default="default")


class UploadOutcomeSerializer(serializers.Serializer):
    filename = serializers.CharField()
    outcome = serializers.ChoiceField(choices=["created", "updated", "duplicate", "rejected"])
    message = serializers.CharField()
    document = DocumentSerializer(allow_null=True)


class UploadSummarySerializer(serializers.Serializer):
    queued = serializers.IntegerField(help_text="Accepted and waiting for (or in) processing.")
    ready = serializers.IntegerField(help_text="Already processed and searchable.")
    failed = serializers.IntegerField(help_text="Accepted, then failed while processing.")
    duplicates = serializers.IntegerField()
    rejected = serializers.IntegerField()
    new_versions = serializers.IntegerField(help_text="Accepted files that replace a document.")
    text = serializers.CharField()


class UploadResponseSerializer(serializers.Serializer):
    results = UploadOutcomeSerializer(many=True)
    summary = UploadSummarySerializer()
    failed_documents = serializers.URLField(
        help_text="The collection's failed documents: queued files that fail later appear here.")


def _api_key(request: Request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


def _query_filters(request: Request, serializer_class: type[serializers.Serializer]) -> dict:
    """The list filters in the query string, validated: a NUL, an unknown status or an
    overlong id is a 400 with field messages, never a database error. Empty ones are unset."""
    filters = serializer_class(data={k: v for k, v in request.query_params.items() if v})
    filters.is_valid(raise_exception=True)
    return filters.validated_data


def _visible_documents(request: Request):
    # Editors see disabled documents too, as in the admin: they are the ones to enable them.
    return documents_visible(user=request.user, api_key=_api_key(request),
                             include_disabled=request.user.has_perm("kb.change_document"))


class CollectionList(generics.ListAPIView):
    serializer_class = CollectionSerializer

    def get_queryset(self):
        return collections_with_counts(
            collections_visible(user=self.request.user, api_key=_api_key(self.request))
        ).order_by("name")


class DocumentListCreate(generics.ListAPIView):
    """List documents, or upload one or more files (multipart field `file`, repeatable)."""

    serializer_class = DocumentSerializer
    parser_classes = [parsers.MultiPartParser, parsers.FormParser, parsers.JSONParser]

    def get_queryset(self):
        filters = _query_filters(self.request, DocumentListFiltersSerializer)
        queryset = _visible_documents(self.request)
        if "collection" in filters:
            queryset = queryset.filter(collection__slug=filters["collection"])
        if "status" in filters:
            queryset = queryset.filter(status=filters["status"])
        return queryset.order_by("-created_at", "-pk")

    @extend_schema(parameters=[DocumentListFiltersSerializer])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(request=UploadSerializer, responses={202: UploadResponseSerializer})
    def post(self, request: Request) -> Response:
        rate_limit_enforce(request, group="upload")
        try:
            uploads.upload_permission_check(user=request.user)
        except DjangoPermissionDenied as exc:
            raise PermissionDenied(str(exc)) from None
        if not isinstance(request.data, Mapping):
            raise ValidationError(
                {"file": ["Send multipart/form-data with one or more “file” parts."]}
            )
        serializer = UploadSerializer(data={
            "file": request.FILES.getlist("file"),
            "collection": request.data.get("collection", "default"),
        })
        serializer.is_valid(raise_exception=True)
        slug = serializer.validated_data["collection"]
        collection = collections_visible(user=request.user, api_key=_api_key(request)).filter(
            slug=slug
        ).first()
        if collection is None:
            raise ValidationError(
                {"collection": [f"No collection “{slug}” that you can write to."]}
            )
        outcomes = uploads.upload_outcomes_refresh(outcomes=uploads.documents_upload_files(
            collection=collection, files=serializer.validated_data["file"],
            uploaded_by=request.user,
        ))
        summary = uploads.upload_summary(outcomes=outcomes)
        body = {
            "results": [
                {"filename": o.filename, "outcome": o.outcome, "message": o.message,
                 "document": DocumentSerializer(o.document).data if o.document else None}
                for o in outcomes
            ],
            "summary": {
                "queued": summary.queued, "ready": summary.ready, "failed": summary.failed,
                "duplicates": summary.duplicates, "rejected": summary.rejected,
                "new_versions": summary.new_versions, "text": summary.text,
            },
            # Accepted files are only queued: this list shows the ones that failed later.
            "failed_documents": request.build_absolute_uri(
                reverse("api-document-list") + f"?collection={collection.slug}&status=failed"
            ),
        }
        return Response(body, status=status.HTTP_202_ACCEPTED)


class DocumentDetail(generics.RetrieveAPIView):
    """A document: its status, stage and progress (the URL to follow after an upload or a
    reprocess). DELETE removes it with its chunks, vectors, BM25 postings and file, as the
    admin does; it needs the “Can delete document” permission."""

    serializer_class = DocumentSerializer

    def get_queryset(self):
        return _visible_documents(self.request)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, pk: int) -> Response:
        document = _document_for(request, pk, permission="delete")
        documents.document_delete(document=document)
        return Response(status=status.HTTP_204_NO_CONTENT)


class _DocumentAction(generics.GenericAPIView):
    """POST: one of the admin's document actions; needs the “Can change document” permission."""

    serializer_class = DocumentSerializer

    def get_queryset(self):
        return _visible_documents(self.request)

    def act(self, document: Document) -> bool:
        raise NotImplementedError

    @extend_schema(request=None, responses={200: DocumentSerializer, 202: DocumentSerializer})
    def post(self, request: Request, pk: int) -> Response:
        document = _document_for(request, pk, permission="change")
        queued = self.act(document)
        document.refresh_from_db()
        body = DocumentSerializer(document).data
        if not queued:
            return Response(body)
        # Processing goes on in the background: the document's own URL shows its progress.
        url = request.build_absolute_uri(reverse("api-document-detail", args=[document.pk]))
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": url})


class DocumentDisable(_DocumentAction):
    """Take the document out of search, keeping it and its chunks (enable puts it back)."""

    def act(self, document: Document) -> bool:
        documents.document_disable(document=document)
        return False


class DocumentEnable(_DocumentAction):
    """Put a disabled document back into search; one that never finished processing is
    queued again (202, with its URL in Location)."""

    def act(self, document: Document) -> bool:
        if document.status != Document.Status.DISABLED:
            raise ValidationError({"status": [
                f"Only a disabled document can be enabled; this one is {document.status}."]})
        documents.document_enable(document=document)
        document.refresh_from_db(fields=["status"])
        return document.status != Document.Status.READY


class DocumentReprocess(_DocumentAction):
    """Parse, chunk and embed the stored file again (202; follow Location). The old chunks
    keep serving search until the new ones are ready."""

    def act(self, document: Document) -> bool:
        if not documents.document_retry(document=document):
            raise ValidationError({"file": [
                "This document has no stored file to process again; upload it anew."]})
        return True


def _document_for(request: Request, pk: int, *, permission: str) -> Document:
    """The document, if the caller may read it (404 otherwise, as for one that does not
    exist) and holds kb.<permission>_document (403 otherwise), as the admin requires."""
    document = get_object_or_404(_visible_documents(request), pk=pk)
    rate_limit_enforce(request, group="manage")
    if not request.user.has_perm(f"kb.{permission}_document"):
        raise PermissionDenied(
            f"This needs the “Can {permission} document” permission; ask an administrator.")
    return document


class ChunkList(generics.ListAPIView):
    """Searchable chunks, optionally of one document (`?document=ID`)."""

    serializer_class = ChunkSerializer

    def get_queryset(self):
        queryset = Chunk.objects.filter(
            searchable=True,
            document__in=_visible_documents(self.request),
        ).order_by("document_id", "ordinal")
        filters = _query_filters(self.request, ChunkListFiltersSerializer)
        if "document" in filters:
            queryset = queryset.filter(document_id=filters["document"])
        return queryset

    @extend_schema(parameters=[ChunkListFiltersSerializer])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class ChunkDetail(generics.RetrieveAPIView):
    serializer_class = ChunkSerializer

    def get_queryset(self):
        return Chunk.objects.filter(document__in=_visible_documents(self.request))
