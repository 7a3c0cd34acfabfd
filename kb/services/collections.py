"""Writes of collections, and collection_touch(): the version cached answers are keyed by.

chat.answer_cache.kb_version reads Collection.updated_at: an answer cached before a change to
what search can see in a collection must stop matching. Every write path that changes
that (ingest, disable, enable, delete, move, reindex) calls collection_touch(); none
writes updated_at by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from kb.models import Chunk, Collection
from kb.queue import enqueue

logger = logging.getLogger(__name__)


def collection_get_or_create(*, slug: str, name: str | None = None) -> Collection:
    """The collection with this slug, created with default settings if missing."""
    collection, _ = Collection.objects.get_or_create(
        slug=slug, defaults={"name": name or slug.replace("-", " ").title()}
    )
    return collection


def collection_touch(*, collection_ids: Iterable[int], at: datetime | None = None) -> None:
    """Mark the collections changed, so answers cached against their old version miss."""
    Collection.objects.filter(pk__in=set(collection_ids)).update(updated_at=at or timezone.now())


def collection_reindex(*, collection: Collection) -> int:
    """Recompute every chunk's lexemes after the collection's text-search config changed.

    Touching `text` fires the trigger that rebuilds search_vector, and the statement
    trigger moves the BM25 statistics over in the same transaction.
    """
    with transaction.atomic():
        count = Chunk.objects.filter(collection=collection).update(text=F("text"))
        Collection.objects.filter(pk=collection.pk).update(
            reindex_status=Collection.ReindexStatus.CURRENT, reindex_error=""
        )
        collection_touch(collection_ids=[collection.pk])
    return count


def collection_reindex_queue(*, collection: Collection) -> int:
    """Queue collection_reindex once the current transaction commits; returns the number
    of chunks it will re-index. The admin's collection list shows its status meanwhile."""
    Collection.objects.filter(pk=collection.pk).update(
        reindex_status=Collection.ReindexStatus.QUEUED, reindex_error=""
    )
    transaction.on_commit(lambda: enqueue("kb.tasks.collection_reindex_task", collection.pk))
    return Chunk.objects.filter(collection=collection).count()


def collection_reindex_run(*, collection_id: int) -> str:
    """The queued re-index: its status goes running, then current (or failed, with why)."""
    collection = Collection.objects.filter(pk=collection_id).first()
    if collection is None:
        return "deleted"
    Collection.objects.filter(pk=collection_id).update(
        reindex_status=Collection.ReindexStatus.RUNNING
    )
    try:
        collection_reindex(collection=collection)
    except Exception as exc:
        logger.exception("Re-indexing collection %s failed", collection_id)
        Collection.objects.filter(pk=collection_id).update(
            reindex_status=Collection.ReindexStatus.FAILED,
            reindex_error=f"{exc.__class__.__name__}: {exc}"[:2000],
        )
        raise
    return Collection.ReindexStatus.CURRENT
