"""Collections, documents and chunks: reading, multipart upload, and the admin's document
actions (delete, disable, enable, reprocess)."""

from __future__ import annotations

from collections.abc import Mapping

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.files.uploadedfile import SimpleUploadedFile
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils.text import slugify
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, parsers, serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from kb.api.conventions import (
    IDEMPOTENCY_KEY,
    IF_MATCH,
    etag_of,
    idempotent,
    if_match_check,
)
from kb.api.pagination import BoundedCursorPagination, WrittenOrderCursorPagination
from kb.api.ratelimits import rate_limit_enforce
from kb.models import ApiKey, Chunk, Collection, Document
from kb.selectors import (
    collections_visible,
    collections_with_counts,
    documents_visible,
    text_search_configs,
)
from kb.services import collections, documents, uploads


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
    url = serializers.SerializerMethodField(
        help_text="The document's API URL: its processing state (status, stage, progress, "
                  "error) after an upload, a reprocess or a replacement.")

    class Meta:
        model = Document
        fields = ["id", "url", "collection", "title", "original_filename", "mime_type",
                  "size_bytes", "content_hash", "status", "stage", "error_message", "metadata",
                  "chunks_total", "chunks_embedded", "processing_started_at",
                  "processing_finished_at", "created_at", "updated_at"]

    def get_url(self, document: Document) -> str:
        return reverse("api-document-detail", args=[document.pk])


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


class TextUploadSerializer(serializers.Serializer):
    """Content that is not a file: text (Markdown or plain) with a title, sent as JSON."""

    title = serializers.CharField(max_length=500)
    text = serializers.CharField(trim_whitespace=False,
                                 max_length=settings.KB_MAX_UPLOAD_BYTES)
    format = serializers.ChoiceField(choices=["markdown", "text"], default="markdown")
    filename = serializers.CharField(
        required=False, max_length=255,
        help_text="The document's name in its collection (default: from the title). Sending "
                  "the same name again makes a new version of that document.")
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


class CollectionWriteSerializer(serializers.Serializer):
    """A collection's editable fields; who may read it is given by usernames and group names."""

    slug = serializers.SlugField(max_length=64)
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, max_length=20_000)
    text_search_config = serializers.CharField(
        required=False, max_length=63,
        help_text="A PostgreSQL text-search configuration (english, simple, german, …); a "
                  "change re-indexes the collection's chunks in the background.")
    is_public = serializers.BooleanField(
        required=False, help_text="Readable by every signed-in user and API key; false: only "
                                  "by allowed_users and allowed_groups (and superusers).")
    allowed_users = serializers.ListField(child=serializers.CharField(max_length=150),
                                          required=False, max_length=10_000)
    allowed_groups = serializers.ListField(child=serializers.CharField(max_length=150),
                                           required=False, max_length=10_000)

    def validate_slug(self, value: str) -> str:
        taken = Collection.objects.filter(slug=value)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise serializers.ValidationError("A collection with this slug exists.")
        return value

    def validate_text_search_config(self, value: str) -> str:
        available = text_search_configs()
        if value not in available:
            raise serializers.ValidationError(
                f"Unknown text-search configuration. Available: {', '.join(sorted(available))}.")
        return value

    def validate_allowed_users(self, value: list[str]) -> list:
        users = {u.username: u for u in
                 get_user_model().objects.filter(username__in=value, is_active=True)}
        unknown = sorted(set(value) - set(users))
        if unknown:
            raise serializers.ValidationError(f"No active user: {', '.join(unknown)}.")
        return list(users.values())

    def validate_allowed_groups(self, value: list[str]) -> list:
        groups = {g.name: g for g in Group.objects.filter(name__in=value)}
        unknown = sorted(set(value) - set(groups))
        if unknown:
            raise serializers.ValidationError(f"No group: {', '.join(unknown)}.")
        return list(groups.values())


class CollectionDetailSerializer(CollectionSerializer):
    allowed_users: serializers.SlugRelatedField[User] = serializers.SlugRelatedField(
        slug_field="username", many=True, read_only=True)
    allowed_groups: serializers.SlugRelatedField[Group] = serializers.SlugRelatedField(
        slug_field="name", many=True, read_only=True)

    class Meta(CollectionSerializer.Meta):
        fields = [*CollectionSerializer.Meta.fields, "allowed_users", "allowed_groups",
                  "reindex_status"]


def _collections(request: Request):
    return collections_with_counts(
        collections_visible(user=request.user, api_key=_api_key(request))
    ).prefetch_related("allowed_users", "allowed_groups")


def _permission_check(request: Request, codename: str, label: str) -> None:
    rate_limit_enforce(request, group="manage")
    if not request.user.has_perm(f"kb.{codename}"):
        raise PermissionDenied(f"This needs the “{label}” permission; ask an administrator.")


class CollectionList(generics.ListAPIView):
    """The collections you may read; POST creates one (“Can add collection”). A restricted
    collection made by someone who is not a superuser lists its maker among its readers, so
    that they can go on managing it."""

    serializer_class = CollectionSerializer

    def get_queryset(self):
        return collections_with_counts(
            collections_visible(user=self.request.user, api_key=_api_key(self.request))
        ).order_by("name")

    @extend_schema(request=CollectionWriteSerializer, responses={201: CollectionDetailSerializer},
                   parameters=[IDEMPOTENCY_KEY])
    def post(self, request: Request) -> Response:
        return idempotent(request, lambda: self._create(request))

    def _create(self, request: Request) -> Response:
        _permission_check(request, "add_collection", "Can add collection")
        serializer = CollectionWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        users = list(data.get("allowed_users", []))
        if not data.get("is_public", True) and not request.user.is_superuser \
                and request.user not in users:
            users.append(request.user)
        collection = collections.collection_create(
            slug=data["slug"], name=data["name"], description=data.get("description", ""),
            text_search_config=data.get("text_search_config", "english"),
            is_public=data.get("is_public", True), allowed_users=users,
            allowed_groups=data.get("allowed_groups", []),
        )
        return Response(_collection_described(collection.pk), status=status.HTTP_201_CREATED)


class CollectionDetail(generics.RetrieveAPIView):
    """A collection you may read, with who may read it. PATCH changes it (“Can change
    collection”); DELETE removes it (“Can delete collection”), and one that holds documents
    only with ?force=true: its documents, chunks, vectors, BM25 statistics, files and cached
    answers go with it."""

    serializer_class = CollectionDetailSerializer
    lookup_field = "slug"

    def get_queryset(self):
        return _collections(self.request)

    def retrieve(self, request: Request, *args, **kwargs) -> Response:
        response = super().retrieve(request, *args, **kwargs)
        response["ETag"] = _collection_etag(response.data)
        return response

    @extend_schema(request=CollectionWriteSerializer, responses={200: CollectionDetailSerializer},
                   parameters=[IF_MATCH])
    def patch(self, request: Request, slug: str) -> Response:
        collection = get_object_or_404(self.get_queryset(), slug=slug)
        _permission_check(request, "change_collection", "Can change collection")
        if_match_check(request, lambda: _collection_etag(_collection_described(collection.pk)))
        serializer = CollectionWriteSerializer(collection, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        collections.collection_update(collection=collection,
                                      changes=dict(serializer.validated_data))
        body = _collection_described(collection.pk)
        return Response(body, headers={"ETag": _collection_etag(body)})

    @extend_schema(parameters=[OpenApiParameter(
        "force", bool, description="Delete the collection's documents with it.")],
        responses={204: None})
    def delete(self, request: Request, slug: str) -> Response:
        collection = get_object_or_404(self.get_queryset(), slug=slug)
        _permission_check(request, "delete_collection", "Can delete collection")
        force = request.query_params.get("force", "").lower() in {"true", "1", "yes"}
        try:
            collections.collection_delete(collection=collection, force=force)
        except collections.CollectionNotEmpty as exc:
            return Response({"error": {"code": "not_empty", "message": str(exc)}},
                            status=status.HTTP_409_CONFLICT)
        return Response(status=status.HTTP_204_NO_CONTENT)


# What a PATCH can change: the ETag two editors compare (counts move with every ingestion).
_COLLECTION_EDITABLE = ("slug", "name", "description", "text_search_config", "is_public",
                        "allowed_users", "allowed_groups")


def _collection_etag(body: Mapping) -> str:
    return etag_of({field: body.get(field) for field in _COLLECTION_EDITABLE})


def _collection_described(pk: int) -> dict:
    """The collection as just written, for the caller who wrote it (a key narrowed to other
    collections does not read the one it made, but is told what it made)."""
    return CollectionDetailSerializer(
        collections_with_counts(Collection.objects.filter(pk=pk))
        .prefetch_related("allowed_users", "allowed_groups").get()).data


class DocumentListCreate(generics.ListAPIView):
    """List documents, or upload one or more files (multipart field `file`, repeatable)."""

    serializer_class = DocumentSerializer
    parser_classes = [parsers.MultiPartParser, parsers.FormParser, parsers.JSONParser]
    pagination_class = BoundedCursorPagination  # newest first: ordered by "-pk"

    def get_queryset(self):
        filters = _query_filters(self.request, DocumentListFiltersSerializer)
        queryset = _visible_documents(self.request)
        if "collection" in filters:
            queryset = queryset.filter(collection__slug=filters["collection"])
        if "status" in filters:
            queryset = queryset.filter(status=filters["status"])
        return queryset

    @extend_schema(parameters=[DocumentListFiltersSerializer])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request={"multipart/form-data": UploadSerializer, "application/json": TextUploadSerializer},
        responses={202: UploadResponseSerializer}, parameters=[IDEMPOTENCY_KEY],
    )
    def post(self, request: Request) -> Response:
        rate_limit_enforce(request, group="upload")
        return idempotent(request, lambda: self._upload(request))

    def _upload(self, request: Request) -> Response:
        try:
            uploads.upload_permission_check(user=request.user)
        except DjangoPermissionDenied as exc:
            raise PermissionDenied(str(exc)) from None
        if not isinstance(request.data, Mapping):
            raise ValidationError(
                {"file": ["Send multipart/form-data with one or more “file” parts, or JSON "
                          "with “title” and “text”."]}
            )
        if (request.content_type or "").startswith("application/json"):
            serializer: serializers.Serializer = TextUploadSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            files = [_text_as_file(serializer.validated_data)]
            metadata = {"title": serializer.validated_data["title"]}
        else:
            serializer = UploadSerializer(data={
                "file": request.FILES.getlist("file"),
                "collection": request.data.get("collection", "default"),
            })
            serializer.is_valid(raise_exception=True)
            files, metadata = serializer.validated_data["file"], None
        slug = serializer.validated_data["collection"]
        collection = collections_visible(user=request.user, api_key=_api_key(request)).filter(
            slug=slug
        ).first()
        if collection is None:
            raise ValidationError(
                {"collection": [f"No collection “{slug}” that you can write to."]}
            )
        outcomes = uploads.upload_outcomes_refresh(outcomes=uploads.documents_upload_files(
            collection=collection, files=files, uploaded_by=request.user, metadata=metadata,
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


def _text_as_file(data: dict) -> SimpleUploadedFile:
    extension = ".md" if data["format"] == "markdown" else ".txt"
    name = data.get("filename") or f"{slugify(data['title'])[:200] or 'untitled'}{extension}"
    return SimpleUploadedFile(name, data["text"].encode(), content_type="text/plain")


class DocumentUpdateSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=500, required=False, allow_blank=True)
    collection = serializers.SlugField(
        max_length=64, required=False,
        help_text="Move the document, with its chunks, to this collection (one you can read).")


def _document_etag(document: Document) -> str:
    return etag_of({"title": document.title, "collection": document.collection_id})


class DocumentDetail(generics.RetrieveAPIView):
    """A document: its status, stage and progress (the URL to follow after an upload or a
    reprocess). PATCH changes its title or moves it to another collection (“Can change
    document”, and read access to both collections), as the admin's form and its Move
    action do. DELETE removes it with its chunks, vectors, BM25 postings and file, as the
    admin does; it needs the “Can delete document” permission."""

    serializer_class = DocumentSerializer

    def get_queryset(self):
        return _visible_documents(self.request)

    def retrieve(self, request: Request, *args, **kwargs) -> Response:
        document = self.get_object()
        return Response(DocumentSerializer(document).data,
                        headers={"ETag": _document_etag(document)})

    @extend_schema(request=DocumentUpdateSerializer, parameters=[IF_MATCH],
                   responses={200: DocumentSerializer})
    def patch(self, request: Request, pk: int) -> Response:
        document = _document_for(request, pk, permission="change")
        if_match_check(request, lambda: _document_etag(document))
        serializer = DocumentUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        changes = serializer.validated_data
        if "collection" in changes:
            target = collections_visible(user=request.user, api_key=_api_key(request)).filter(
                slug=changes["collection"]).first()
            if target is None:
                raise ValidationError({"collection": [
                    f"No collection “{changes['collection']}” that you can write to."]})
            try:
                document = documents.document_move(document=document, collection=target,
                                                   actor=request.user)
            except documents.DocumentMoveRefused as exc:
                raise ValidationError({"collection": [str(exc)]}) from None
            except DjangoPermissionDenied as exc:
                raise PermissionDenied(str(exc)) from None
        if "title" in changes:
            document = documents.document_retitle(document=document, title=changes["title"])
        return Response(DocumentSerializer(document).data,
                        headers={"ETag": _document_etag(document)})

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


class ReplaceSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)


class DocumentReplace(generics.GenericAPIView):
    """POST multipart `file`: a new version of the document, whatever the file's own name
    (“Can change document”). 202 with the outcome and Location, the document's URL: search
    keeps the old version until the new one is ready, then switches in one transaction."""

    serializer_class = DocumentSerializer
    parser_classes = [parsers.MultiPartParser, parsers.FormParser]

    def get_queryset(self):
        return _visible_documents(self.request)

    @extend_schema(request={"multipart/form-data": ReplaceSerializer},
                   responses={200: UploadOutcomeSerializer, 202: UploadOutcomeSerializer})
    def post(self, request: Request, pk: int) -> Response:
        document = _document_for(request, pk, permission="change")
        serializer = ReplaceSerializer(data={"file": request.FILES.get("file")})
        serializer.is_valid(raise_exception=True)
        try:
            (outcome,) = uploads.upload_outcomes_refresh(outcomes=[uploads.document_replace(
                document=document, upload=serializer.validated_data["file"],
                uploaded_by=request.user)])
        except DjangoPermissionDenied as exc:
            raise PermissionDenied(str(exc)) from None
        body = {"filename": outcome.filename, "outcome": outcome.outcome,
                "message": outcome.message,
                "document": DocumentSerializer(outcome.document).data if outcome.document
                else None}
        if outcome.outcome == "rejected":
            return Response({"error": {"code": "rejected", "message": outcome.message}},
                            status=status.HTTP_400_BAD_REQUEST)
        if outcome.outcome == "duplicate":  # the same bytes: nothing to do
            return Response(body)
        url = request.build_absolute_uri(reverse("api-document-detail", args=[document.pk]))
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": url})


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
    """Searchable chunks, optionally of one document (`?document=ID`), in the order they
    were written: a document's chunks are written in reading order, once per version."""

    serializer_class = ChunkSerializer
    pagination_class = WrittenOrderCursorPagination

    def get_queryset(self):
        queryset = Chunk.objects.filter(
            searchable=True,
            document__in=_visible_documents(self.request),
        )
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
