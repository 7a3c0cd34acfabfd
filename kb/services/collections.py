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
from typing import Any

from django.contrib.auth.models import Group, User
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from kb.models import Chunk, Collection, Document
from kb.queue import enqueue

logger = logging.getLogger(__name__)

# Chunks re-indexed per statement (collection_reindex).
REINDEX_BATCH = 20_000


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
        count = 0
        # In batches: the statistics trigger gathers a statement's changed rows into arrays,
        # and a million chunks in one statement pass PostgreSQL's 1 GB array limit.
        ids = Chunk.objects.filter(collection=collection).order_by("pk").values_list(
            "pk", flat=True)
        last = 0
        while True:
            batch = list(ids.filter(pk__gt=last)[:REINDEX_BATCH])
            if not batch:
                break
            count += Chunk.objects.filter(pk__in=batch).update(text=F("text"))
            last = batch[-1]
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


class CollectionNotEmpty(Exception):
    """A collection with documents is deleted only when the caller says so (force)."""


@transaction.atomic
def collection_create(
    *,
    slug: str,
    name: str,
    description: str = "",
    text_search_config: str = "english",
    is_public: bool = True,
    allowed_users: Iterable[User] = (),
    allowed_groups: Iterable[Group] = (),
) -> Collection:
    """A new collection; the caller has checked the permission and the fields."""
    collection = Collection.objects.create(
        slug=slug, name=name, description=description, text_search_config=text_search_config,
        is_public=is_public,
    )
    collection.allowed_users.set(list(allowed_users))
    collection.allowed_groups.set(list(allowed_groups))
    return collection


@transaction.atomic
def collection_update(*, collection: Collection, changes: dict[str, Any]) -> bool:
    """Apply `changes` (model fields, and allowed_users / allowed_groups as lists); True when
    the text-search configuration changed, and a re-index of the chunks is queued for it.

    A change of who may read the collection bumps its version, so answers cached for the
    old readers stop matching (chat.answer_cache keys by it)."""
    changes = dict(changes)
    users = changes.pop("allowed_users", None)
    groups = changes.pop("allowed_groups", None)
    config_changed = ("text_search_config" in changes
                      and changes["text_search_config"] != collection.text_search_config)
    for field, value in changes.items():
        setattr(collection, field, value)
    collection.save()
    if users is not None:
        collection.allowed_users.set(users)
    if groups is not None:
        collection.allowed_groups.set(groups)
    if users is not None or groups is not None or "is_public" in changes:
        collection_touch(collection_ids=[collection.pk])
    if config_changed:
        collection_reindex_queue(collection=collection)
    return config_changed


def collection_delete(*, collection: Collection, force: bool = False) -> int:
    """Delete a collection with its documents, their chunks, vectors and stored files, and its
    BM25 statistics and cached answers (they cascade from the rows); the number of documents
    deleted. Raises CollectionNotEmpty for a collection with documents unless `force`."""
    documents = Document.objects.filter(collection=collection)
    count = documents.count()
    if count and not force:
        raise CollectionNotEmpty(
            f"“{collection.slug}” holds {count} document{'s' if count != 1 else ''}; delete "
            "them first, or delete the collection with them (force)."
        )
    with transaction.atomic():
        stored = [(d.file.storage, d.file.name) for d in documents.only("pk", "file")
                  if d.file and d.file.name]
        ids = list(documents.order_by("pk").values_list("pk", flat=True))
        # By 1,000 documents: the statistics trigger gathers a statement's deleted chunks
        # into arrays, which a whole large collection at once would overflow.
        for start in range(0, len(ids), 1000):
            Document.objects.filter(pk__in=ids[start:start + 1000]).delete()
        collection.delete()

        def files_delete() -> None:
            for storage, name in stored:
                storage.delete(name)

        transaction.on_commit(files_delete)
    logger.info("Collection %s deleted with %d documents.", collection.slug, count)
    return count
