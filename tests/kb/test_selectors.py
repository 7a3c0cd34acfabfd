"""Reads of the core domain: what the collection counts count."""

from __future__ import annotations

import pytest

from kb.models import Chunk, Collection, Document
from kb.selectors import (
    SYSTEM,
    collections_visible,
    collections_visible_to,
    collections_with_counts,
)
from kb.services.collections import collection_get_or_create
from kb.services.documents import document_disable


def counts(slug: str) -> tuple[int, int, int]:
    row = collections_with_counts(Collection.objects.filter(slug=slug)).get()
    return row.document_count, row.ready_count, row.chunk_count


def test_collection_counts_are_documents_ready_documents_and_searchable_chunks(collection,
                                                                               ingest_one):
    """A new version's old chunks and a disabled document's chunks are not searchable, so
    they are not counted; a failed document counts as a document, not as ready."""
    empty = collection_get_or_create(slug="empty")
    kept = ingest_one(collection, "kept.md",
                      "# Kept\n\nTides follow the moon.\n\n## More\n\nHarbours open at dawn.")
    # a new version
    ingest_one(collection, "kept.md", "# Kept\n\nTides follow the moon, twice a day.")
    disabled = ingest_one(collection, "disabled.md", "# Off\n\nThis one is switched off.")
    document_disable(document=disabled)
    ingest_one(collection, "broken.pdf", b"%PDF-1.4 not really a pdf")

    searchable = Chunk.objects.filter(collection=collection, searchable=True).count()
    current = Document.objects.get(pk=kept.pk).chunk_generation
    assert searchable == Chunk.objects.filter(document=kept, generation=current).count()
    ready = Document.objects.filter(collection=collection, status=Document.Status.READY).count()
    assert counts(collection.slug) == (3, ready, searchable)
    assert Document.objects.filter(collection=collection,
                                   status=Document.Status.FAILED).count() == 1
    assert counts(empty.slug) == (0, 0, 0)


def test_the_system_reads_every_collection_and_a_missing_caller_is_refused(db):
    """SYSTEM is passed by name; None (a caller lost on the way) is an error, never "everything"."""
    collection_get_or_create(slug="open")
    restricted = collection_get_or_create(slug="closed")
    Collection.objects.filter(pk=restricted.pk).update(is_public=False)

    assert set(collections_visible(user=SYSTEM).values_list("slug", flat=True)) >= {
        "open", "closed"}
    with pytest.raises(TypeError, match="SYSTEM"):
        collections_visible_to(user=None)
