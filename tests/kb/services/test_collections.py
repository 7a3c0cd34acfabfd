"""collection_touch(): every write that changes what search can see in a collection changes
its version (Collection.updated_at), which cached answers are keyed by; and the queued
re-index that follows a text-search configuration change."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import connection
from django.urls import reverse

import kb.services
from chat.answer_cache import kb_version
from kb.models import Chunk, Collection, Document
from kb.selectors import SYSTEM
from kb.services.collections import collection_get_or_create, collection_reindex
from kb.services.documents import (
    document_delete,
    document_disable,
    document_enable,
    document_move,
    document_retry,
)
from kb.services.ingest import document_ingest

pytestmark = pytest.mark.django_db

TIDES = "# Tides\n\nRunning tides rise twice a day; the harbour master posts the times.\n"


def searchable(collection: Collection) -> set[int]:
    chunks = Chunk.objects.filter(collection=collection, searchable=True)
    return set(chunks.values_list("pk", flat=True))


def version(collection: Collection) -> str:
    return kb_version(collection=collection, user=SYSTEM)


@pytest.fixture
def world(collection, ingest_one):
    other = collection_get_or_create(slug="other", name="Other")
    return {"docs": collection, "other": other,
            "document": ingest_one(collection, "tides.md", TIDES)}


def _enable(world) -> None:
    document_disable(document=world["document"])
    world["before"] = version(world["docs"]), searchable(world["docs"])
    document_enable(document=world["document"])


def _reingest(world) -> None:
    document_retry(document=world["document"])
    document_ingest(document_id=world["document"].pk)


# Each service that changes what search can see, run on a collection with one ready document.
WRITES: dict[str, Callable[[dict], object]] = {
    "ingest": lambda w: w["ingest_one"](w["docs"], "moon.md", "# Moon\n\nThe moon pulls tides.\n"),
    "reingest": _reingest,
    "disable": lambda w: document_disable(document=w["document"]),
    "enable": _enable,
    "delete": lambda w: document_delete(document=w["document"]),
    "move": lambda w: document_move(document=w["document"], collection=w["other"], actor=SYSTEM),
    "reindex": lambda w: collection_reindex(collection=w["docs"]),
}


@pytest.mark.parametrize("write", WRITES)
def test_every_write_search_can_see_changes_the_collection_version(write, world, ingest_one):
    """A write path that forgets collection_touch() would serve answers cached before it."""
    world["ingest_one"] = ingest_one
    world["before"] = version(world["docs"]), searchable(world["docs"])
    other_before = version(world["other"])

    WRITES[write](world)

    version_before, searchable_before = world["before"]
    assert version(world["docs"]) != version_before
    if write == "move":
        assert version(world["other"]) != other_before
        assert searchable(world["docs"]) != searchable_before
    elif write != "reindex":  # a re-index changes lexemes, not which chunks are searchable
        assert searchable(world["docs"]) != searchable_before


def test_no_service_writes_the_version_by_hand():
    """Only collection_touch() sets Collection.updated_at (so there is one place to keep)."""
    package = Path(kb.services.__file__).parent
    offenders = [path.name for path in package.glob("*.py")
                 if "updated_at=" in path.read_text() and path.name != "collections.py"]
    assert offenders == []


def lexemes(collection: Collection) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT string_agg(search_vector::text, ' ') FROM kb_chunk "
                       "WHERE collection_id = %s", [collection.pk])
        return cursor.fetchone()[0]


def change_config(client, collection: Collection, config: str):
    return client.post(reverse("admin:kb_collection_change", args=[collection.pk]), {
        "name": collection.name, "slug": collection.slug, "description": "",
        "text_search_config": config, "is_public": "on",
    }, follow=True)


def test_a_config_change_reindexes_in_a_queued_task(admin_client, world,
                                                    django_capture_on_commit_callbacks):
    """The admin's save queues the re-index (run inline here, as ingestion is), says so, and
    the collection list shows it done; the lexemes follow the new configuration."""
    collection = world["docs"]
    assert "'run'" in lexemes(collection)  # english stems "Running"
    before = version(collection)

    with django_capture_on_commit_callbacks(execute=True):
        response = change_config(admin_client, collection, "simple")

    page = response.content.decode()
    assert "in the background; the Index column shows when it is done" in page
    collection.refresh_from_db()
    assert collection.reindex_status == Collection.ReindexStatus.CURRENT
    assert "'running'" in lexemes(collection)
    assert version(collection) != before
    assert "Up to date" in page


def test_the_collection_list_shows_a_queued_reindex(admin_client, world,
                                                    django_capture_on_commit_callbacks):
    """Until the worker has run it, the re-index shows as queued, and nothing has moved."""
    collection = world["docs"]
    with django_capture_on_commit_callbacks(execute=False):
        response = change_config(admin_client, collection, "simple")

    collection.refresh_from_db()
    assert collection.reindex_status == Collection.ReindexStatus.QUEUED
    assert "Re-index queued" in response.content.decode()
    assert "'run'" in lexemes(collection)
    assert Document.objects.get(pk=world["document"].pk).status == Document.Status.READY


def test_reindex_in_batches_moves_every_chunk_to_the_new_language(collection, ingest_one,
                                                                   monkeypatch):
    """Batches of one chunk: each statement re-tokenises its chunks, and the collection's
    statistics end up as one statement over all of them would leave them."""
    import kb.services.collections as collections_service
    from search.models import CollectionStatistic

    monkeypatch.setattr(collections_service, "REINDEX_BATCH", 1)
    for name in ("a.md", "b.md", "c.md"):
        ingest_one(collection, name, TIDES.replace("Tides", name))
    before = CollectionStatistic.objects.get(collection=collection).chunk_count
    Collection.objects.filter(pk=collection.pk).update(text_search_config="simple")
    assert collection_reindex(collection=collection) == before
    with connection.cursor() as cursor:
        cursor.execute("SELECT bool_and(search_vector @@ to_tsquery('simple', 'running')) "
                       "FROM kb_chunk WHERE collection_id = %s", [collection.pk])
        assert cursor.fetchone()[0]  # "running" unstemmed: the simple configuration
    assert CollectionStatistic.objects.get(collection=collection).chunk_count == before
