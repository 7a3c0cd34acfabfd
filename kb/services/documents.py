"""Writes of documents after upload: queueing, retrying, disabling, moving, deleting.

Each one that changes what search can see calls collection_touch(), so cached answers
drawn from the old state stop matching.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from kb import selectors
from kb.models import Chunk, Collection, Document
from kb.queue import enqueue
from kb.selectors import Caller, SystemCaller
from kb.services.collections import collection_touch

logger = logging.getLogger(__name__)


def document_queue_ingest(*, document: Document) -> None:
    """Queue the document's ingestion once the current transaction commits."""
    Document.objects.filter(pk=document.pk).update(
        status=_status_while_processing(document), stage=Document.Stage.QUEUED, error_message=""
    )
    transaction.on_commit(lambda: enqueue("kb.tasks.document_ingest_task", document.pk))


def _status_while_processing(document: Document) -> str:
    if document.status == Document.Status.DISABLED:
        return Document.Status.DISABLED
    return Document.Status.PENDING


def document_retry(*, document: Document) -> bool:
    """Queue a failed (or stalled) document again; False if it has no file to retry."""
    if not document.file or not document.content_hash:
        return False
    document.status = Document.Status.PENDING
    document_queue_ingest(document=document)
    return True


def document_disable(*, document: Document) -> None:
    """Take a document out of search without deleting anything."""
    with transaction.atomic():
        Document.objects.filter(pk=document.pk).update(status=Document.Status.DISABLED)
        Chunk.objects.filter(document=document, searchable=True).update(searchable=False)
        collection_touch(collection_ids=[document.collection_id])


def document_enable(*, document: Document) -> None:
    """Put a disabled document back into search (or back in the queue if it never finished)."""
    with transaction.atomic():
        current = Document.objects.select_for_update().get(pk=document.pk)
        if current.chunk_generation == 0:
            current.status = Document.Status.PENDING
            current.save(update_fields=["status"])
            document_queue_ingest(document=current)
            return
        Document.objects.filter(pk=document.pk).update(status=Document.Status.READY)
        Chunk.objects.filter(
            document=document, generation=current.chunk_generation, searchable=False
        ).update(searchable=True)
        collection_touch(collection_ids=[current.collection_id])


class DocumentMoveRefused(Exception):
    """A move that would break an invariant; the message says why, for the editor."""


def document_move(*, document: Document, collection: Collection, actor: Caller) -> Document:
    """Move a document to another collection with its chunks, in one transaction.

    Updating the document's collection cascades to its chunks (the composite foreign key
    of search migration 0003), whose triggers re-tokenise them with the new collection's
    text-search configuration and move their postings and both collections' BM25
    statistics. Both collections' updated_at are bumped, so answer-cache entries keyed by
    either version stop matching, and the entries citing the document are dropped (the
    post_save receiver in chat.models). SYSTEM may move anything; a user needs the change
    permission and read access to both collections.
    """
    if not isinstance(actor, SystemCaller):
        if not actor.has_perm("kb.change_document"):
            raise PermissionDenied("Moving a document needs the “Can change document” permission.")
        wanted = {document.collection_id, collection.pk}
        visible = set(selectors.collections_visible(user=actor).filter(pk__in=wanted)
                      .values_list("pk", flat=True))
        if visible != wanted:
            raise PermissionDenied("You can move documents only between collections you can read.")
    with transaction.atomic():
        current = Document.objects.select_for_update().get(pk=document.pk)
        source_id = current.collection_id
        if source_id == collection.pk:
            return current
        namesake = Document.objects.filter(
            collection=collection, original_filename=current.original_filename
        ).first()
        if namesake is not None:
            # A name identifies a document in its collection (the next upload of that name
            # replaces it): two of one name would make that ambiguous.
            raise DocumentMoveRefused(
                f"“{collection}” already has a document named “{current.original_filename}” "
                f"(document {namesake.pk}); delete or move that one first."
            )
        current.collection = collection
        current.save(update_fields=["collection", "updated_at"])
        collection_touch(collection_ids=[source_id, collection.pk])
    logger.info("Document %s moved from collection %s to %s by %s.", current.pk, source_id,
                collection.pk, actor.pk or "the system")
    return current


def document_retitle(*, document: Document, title: str) -> Document:
    """Give the document the title shown in search hits and citations (blank: its file
    name). Cached answers name the old title, so the collection's version moves on."""
    document.title = title.strip()[:500]
    document.save(update_fields=["title", "updated_at"])
    collection_touch(collection_ids=[document.collection_id])
    return document


def document_delete(*, document: Document) -> None:
    """Delete a document, its chunks, vectors and stored file."""
    file_name = document.file.name if document.file else None
    storage = document.file.storage if document.file else None
    with transaction.atomic():
        collection_id = document.collection_id
        document.delete()
        collection_touch(collection_ids=[collection_id])
        if file_name and storage is not None:
            transaction.on_commit(lambda: storage.delete(file_name))


# A document whose worker has not reported progress for this long is presumed dead: the
# stall sweep fails it, and uploading the same file again restarts it.
DOCUMENT_STALLED_AFTER_SECONDS = 600


def stalled_filter(*, older_than_seconds: int) -> Q:
    """Documents in processing whose worker has not beaten for older_than_seconds."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    return Q(status=Document.Status.PROCESSING, heartbeat_at__lt=cutoff)


def documents_mark_stalled(*, older_than_seconds: int = DOCUMENT_STALLED_AFTER_SECONDS) -> int:
    """Fail documents whose worker stopped beating (killed mid-document); they can be retried."""
    return Document.objects.filter(stalled_filter(older_than_seconds=older_than_seconds)).update(
        status=Document.Status.FAILED,
        error_message="The worker stopped while processing this document (it may have been "
        "restarted or killed). Retry to finish it; work already done is reused.",
        processing_finished_at=timezone.now(),
    )
