"""Moving a document to another collection moves its chunks, postings and statistics with it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, connection, transaction
from django.urls import reverse

from kb import embeddings
from kb.models import Chunk, Document
from kb.selectors import SYSTEM
from kb.services.collections import collection_get_or_create
from kb.services.documents import DocumentMoveRefused, document_move, document_retry
from kb.services.ingest import documents_ingest_batch
from search.services import SearchParams, search
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.django_db

CAFETERIA = "# Facilities\n\nThe cafeteria opens at seven thirty on weekdays and serves porridge.\n"
OTHER = "# Parking\n\nVisitors park behind the library; the barrier opens with the intercom.\n"


@pytest.fixture
def world(django_user_model, ingest_one):
    general = collection_get_or_create(slug="general")
    private = collection_get_or_create(slug="b-private")
    private.is_public = False
    private.save()
    user_a = django_user_model.objects.create_user("user-a", password="pw-user-a-1")
    user_b = django_user_model.objects.create_user("user-b", password="pw-user-b-1")
    private.allowed_users.add(user_b)
    document = ingest_one(general, "cafeteria.md", CAFETERIA)
    ingest_one(general, "parking.md", OTHER)
    ingest_one(private, "parking-b.md", OTHER.replace("library", "gym"))
    return {"general": general, "private": private, "a": user_a, "b": user_b, "doc": document}


def _misplaced_chunks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT count(*) FROM kb_chunk AS c JOIN kb_document AS d ON d.id = c.document_id
            WHERE c.collection_id <> d.collection_id
        """)
        return cursor.fetchone()[0]


def _index_disagreements(collection_ids) -> list:
    """Differences between the trigger-maintained BM25 index and one rebuilt from the chunks."""
    problems = []
    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT count(*) FROM search_posting AS p LEFT JOIN kb_chunk AS c ON c.id = p.chunk_id
            WHERE c.id IS NULL OR NOT c.searchable OR c.collection_id <> p.collection_id
        """)
        stray = cursor.fetchone()[0]
        if stray:
            problems.append(("stray postings", stray))
        for collection_id in collection_ids:
            cursor.execute("""
                SELECT count(*), coalesce(sum(search_length), 0) FROM kb_chunk
                WHERE collection_id = %s AND searchable
            """, [collection_id])
            expected = tuple(cursor.fetchone())
            cursor.execute("""
                SELECT coalesce(max(chunk_count), 0), coalesce(max(total_length), 0)
                FROM search_collectionstatistic WHERE collection_id = %s
            """, [collection_id])
            actual = tuple(cursor.fetchone())
            if expected != actual:
                problems.append(("collection statistic", collection_id, expected, actual))
            cursor.execute("""
                SELECT u.lexeme, count(*) FROM kb_chunk AS c
                CROSS JOIN LATERAL unnest(c.search_vector) AS u
                WHERE c.collection_id = %s AND c.searchable GROUP BY u.lexeme
            """, [collection_id])
            expected_df = dict(cursor.fetchall())
            cursor.execute("""
                SELECT lexeme, document_frequency FROM search_termstatistic
                WHERE collection_id = %s AND document_frequency <> 0
            """, [collection_id])
            if dict(cursor.fetchall()) != expected_df:
                problems.append(("document frequencies", collection_id))
            cursor.execute("""
                SELECT count(*) FROM kb_chunk AS c CROSS JOIN LATERAL unnest(c.search_vector) AS u
                WHERE c.collection_id = %s AND c.searchable
            """, [collection_id])
            expected_postings = cursor.fetchone()[0]
            cursor.execute("SELECT count(*) FROM search_posting WHERE collection_id = %s",
                           [collection_id])
            if cursor.fetchone()[0] != expected_postings:
                problems.append(("posting count", collection_id))
    return problems


def _finds(user, mode: str, document) -> bool:
    result = search(params=SearchParams(query="cafeteria opens", mode=mode, k=20), user=user,
                    record_usage=False)
    return document.pk in {hit.document_id for hit in result.hits}


@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
def test_after_a_move_only_readers_of_the_new_collection_find_the_passage(world, mode):
    """user-a (general only) stops finding the moved passage; user-b (b-private) finds it."""
    assert _finds(world["a"], mode, world["doc"]) and _finds(world["b"], mode, world["doc"])

    document_move(document=world["doc"], collection=world["private"], actor=SYSTEM)

    assert not _finds(world["a"], mode, world["doc"])
    assert _finds(world["b"], mode, world["doc"])
    chunk_collections = Chunk.objects.filter(document=world["doc"]).values_list(
        "collection", flat=True)
    assert set(chunk_collections) == {world["private"].pk}


@pytest.fixture
def second_embedder(settings):
    """A second embedding model served by a real local OpenAI-style server, to re-embed into."""
    with FakeOpenAIServer(dimensions=8) as server:
        settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "embedding": {
            **settings.KB_PROVIDERS["embedding"],
            "fake": {"BACKEND": "kb.providers.openai.OpenAIEmbeddings", "MODEL": "fake-embed",
                     "base_url": server.base_url, "api_key": "test", "max_attempts": 2},
        }}
        yield server


def test_every_chunk_stays_in_its_documents_collection(world, second_embedder,
                                                       django_capture_on_commit_callbacks):
    """The database keeps chunk.collection = document.collection through moves, reprocessing
    and re-embedding, and the BM25 index always equals one rebuilt from the chunks."""
    collections = [world["general"].pk, world["private"].pk]
    document = world["doc"]
    document_move(document=document, collection=world["private"], actor=SYSTEM)
    assert _misplaced_chunks() == 0 and _index_disagreements(collections) == []

    with django_capture_on_commit_callbacks(execute=True):
        document_retry(document=Document.objects.get(pk=document.pk))
    assert Document.objects.get(pk=document.pk).status == Document.Status.READY
    assert _misplaced_chunks() == 0 and _index_disagreements(collections) == []

    model = embeddings.reembed_start(key="fake")
    embeddings.reembed_run(model_id=model.pk)
    assert _misplaced_chunks() == 0 and _index_disagreements(collections) == []

    # Any writer, not only the service: a bare update of the document moves its chunks too.
    Document.objects.filter(pk=document.pk).update(collection=world["general"])
    assert _misplaced_chunks() == 0 and _index_disagreements(collections) == []
    assert _finds(world["a"], "bm25", document)

    # And a chunk cannot be written into another collection than its document's.
    stray = Chunk.objects.filter(document=document).first()
    with pytest.raises(IntegrityError), transaction.atomic():
        Chunk.objects.filter(pk=stray.pk).update(collection=world["private"])
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS kb_chunk_document_collection_fk IMMEDIATE")
    assert _misplaced_chunks() == 0


def test_a_move_during_ingestion_writes_the_new_generation_in_the_new_collection(world):
    """Reprocessing that started before a move finishes with every chunk in the new collection."""
    document = Document.objects.get(pk=world["doc"].pk)
    stale = Document.objects.get(pk=document.pk)  # what a worker loaded before the move
    document_move(document=document, collection=world["private"], actor=SYSTEM)
    documents_ingest_batch(document_ids=[stale.pk])

    assert _misplaced_chunks() == 0
    assert not _finds(world["a"], "bm25", document) and _finds(world["b"], "bm25", document)


def test_moving_needs_change_permission_and_both_collections(world, django_user_model):
    """A user without change permission, or who cannot read the target, cannot move."""
    editor = django_user_model.objects.create_user("editor", password="pw-editor-11", is_staff=True)
    with pytest.raises(PermissionDenied):
        document_move(document=world["doc"], collection=world["private"], actor=editor)
    editor.user_permissions.add(Permission.objects.get(codename="change_document"))
    editor = django_user_model.objects.get(pk=editor.pk)
    with pytest.raises(PermissionDenied):
        document_move(document=world["doc"], collection=world["private"], actor=editor)
    assert Document.objects.get(pk=world["doc"].pk).collection_id == world["general"].pk

    world["private"].allowed_users.add(editor)
    document_move(document=world["doc"], collection=world["private"], actor=editor)
    assert Document.objects.get(pk=world["doc"].pk).collection_id == world["private"].pk


def test_admin_change_form_cannot_move_and_the_move_action_does(world, admin_client):
    """The change form shows the collection read-only; "Move to collection…" moves everything."""
    document = world["doc"]
    change_url = reverse("admin:kb_document_change", args=[document.pk])
    admin_client.post(change_url, {"title": "Cafeteria", "collection": world["private"].pk,
                                   "chunks-TOTAL_FORMS": 0, "chunks-INITIAL_FORMS": 0})
    assert Document.objects.get(pk=document.pk).collection_id == world["general"].pk

    changelist = reverse("admin:kb_document_changelist")
    page = admin_client.post(changelist, {"action": "move", "_selected_action": [document.pk]})
    assert page.status_code == 200
    assert "Move documents to another collection" in page.content.decode()
    response = admin_client.post(changelist, {
        "action": "move", "_selected_action": [document.pk], "apply": "1",
        "collection": world["private"].pk,
    }, follow=True)

    assert "Moved 1 document to" in response.content.decode()
    assert Document.objects.get(pk=document.pk).collection_id == world["private"].pk
    assert _misplaced_chunks() == 0
    assert not _finds(world["a"], "hybrid", document) and _finds(world["b"], "hybrid", document)


def test_a_move_changes_both_collections_answer_cache_versions(world):
    """Cached answers over either collection stop matching once a document moves."""
    from chat.answer_cache import kb_version

    before = {c: kb_version(collection=world[c], user=SYSTEM) for c in ("general", "private")}
    before_all = kb_version(collection=None, user=world["a"])

    document_move(document=world["doc"], collection=world["private"], actor=SYSTEM)

    for name in ("general", "private"):
        assert kb_version(collection=world[name], user=SYSTEM) != before[name]
    assert kb_version(collection=None, user=world["a"]) != before_all


def test_a_move_onto_a_document_of_the_same_name_is_refused(world, ingest_one):
    """A name identifies a document in its collection, so a move never creates two of one name."""
    namesake = ingest_one(world["private"], "cafeteria.md", CAFETERIA.replace("seven", "eight"))
    with pytest.raises(DocumentMoveRefused, match="already has a document named"):
        document_move(document=world["doc"], collection=world["private"], actor=SYSTEM)
    assert Document.objects.get(pk=world["doc"].pk).collection_id == world["general"].pk
    assert namesake.collection_id == world["private"].pk and _misplaced_chunks() == 0


def test_the_migration_repairs_chunks_left_behind_by_an_earlier_move(world):
    """Chunks a move left in the old collection before the fix are put back with their
    document when the constraint is added, and the BM25 index follows them."""
    from importlib import import_module

    migration = import_module("search.migrations.0003_chunk_collection_follows_document")
    with connection.cursor() as cursor:
        cursor.execute(migration.BACKWARD)
        # What the admin did before: the document moved, its chunks did not.
        cursor.execute("UPDATE kb_document SET collection_id = %s WHERE id = %s",
                       [world["private"].pk, world["doc"].pk])
        assert _misplaced_chunks() > 0
        cursor.execute(migration.FORWARD)

    assert _misplaced_chunks() == 0
    assert _index_disagreements([world["general"].pk, world["private"].pk]) == []
    assert not _finds(world["a"], "bm25", world["doc"]) and _finds(world["b"], "bm25", world["doc"])
