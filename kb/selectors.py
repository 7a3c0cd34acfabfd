"""Reads of the core domain. Views, APIs and admin call these; they never write."""

from __future__ import annotations

from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.http import Http404

from kb.models import Chunk, Collection, Document, EmbeddingModel


def collection_list_with_counts() -> QuerySet[Collection]:
    """Collections annotated with document and chunk counts, in one query."""
    return Collection.objects.annotate(
        document_count=Count("documents", distinct=True),
        ready_count=Count("documents", filter=Q(documents__status=Document.Status.READY), distinct=True),
        chunk_count=Count("documents__chunks", distinct=True),
    ).order_by("name")


def collections_visible_to(*, user) -> Q:
    """The filter for collections a user may read: public ones, or all for superusers."""
    if user is not None and getattr(user, "is_superuser", False):
        return Q()
    return Q(is_public=True)


def document_get_visible(*, pk: int, user) -> Document:
    """A document the user may read, or 404 (never 403, which would confirm it exists)."""
    document = (
        Document.objects.select_related("collection")
        .filter(pk=pk, collection__in=Collection.objects.filter(collections_visible_to(user=user)))
        .first()
    )
    if document is None:
        raise Http404("No such document.")
    return document


def chunk_list_for_document(*, document: Document) -> QuerySet[Chunk]:
    """A document's chunks in reading order."""
    return Chunk.objects.filter(document=document).order_by("ordinal")


def embedding_model_active() -> EmbeddingModel | None:
    """The embedding model that serves search, if one has been set up."""
    return EmbeddingModel.objects.filter(is_active=True).first()


def text_search_configs() -> set[str]:
    """Names of the text-search configurations the database offers (english, simple, ...)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT cfgname FROM pg_ts_config")
        return {row[0] for row in cursor.fetchall()}
