"""Zero-downtime re-embedding: a second model of another dimension fills in beside the first."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import connection
from django.urls import reverse

from kb import embeddings
from kb.models import Chunk, ChunkEmbedding, EmbeddingModel
from kb.selectors import SYSTEM
from search.services import SearchParams, search
from tests.fakes.openai_server import FakeOpenAIServer, Fault

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "samples"

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake_embedder(settings):
    """A second embedding model (8 dimensions) served by a real local OpenAI-style server.

    Its vectors are no real model's, so the quality gate would rightly refuse to switch
    search to it; these tests are about the mechanics of re-embedding and cut-over, so the
    gate's tolerance lets everything through (the gate has its own tests,
    tests/search/test_quality_gate.py)."""
    settings.KB_QUALITY_GATE_TOLERANCE = 1.0
    with FakeOpenAIServer(dimensions=8) as server:
        settings.KB_PROVIDERS = {
            **settings.KB_PROVIDERS,
            "embedding": {
                **settings.KB_PROVIDERS["embedding"],
                "fake": {"BACKEND": "kb.providers.openai.OpenAIEmbeddings", "MODEL": "fake-embed",
                         "base_url": server.base_url, "api_key": "test", "max_attempts": 2,
                         "batch_size": 4},
            },
        }
        yield server


@pytest.fixture
def corpus(collection, ingest_one):
    for name in ["guide.md", "policy.docx", "article.html"]:
        ingest_one(collection, name, (SAMPLES / name).read_bytes())
    return collection


def _index_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'kb_chunkembedding'")
        return {row[0] for row in cursor.fetchall()}


def test_reembed_fills_new_model_and_cuts_over_atomically(corpus, fake_embedder):
    """Search serves the old model until the new one is complete, then switches in one step."""
    old = EmbeddingModel.objects.get(is_active=True)
    new = embeddings.reembed_start(key="fake")
    assert new.dimensions == 8 and new.status == EmbeddingModel.Status.BUILDING
    before = search(params=SearchParams(query="visitor wifi", collections=("docs",)), user=SYSTEM,
                    record_usage=False)

    finished = embeddings.reembed_run(model_id=new.pk, activate=True)

    assert finished.is_active and finished.status == EmbeddingModel.Status.ACTIVE
    old.refresh_from_db()
    assert not old.is_active and old.status == EmbeddingModel.Status.READY
    chunk_count = Chunk.objects.count()
    assert ChunkEmbedding.objects.filter(embedding_model=finished).count() == chunk_count
    assert ChunkEmbedding.objects.filter(embedding_model=old).count() == chunk_count  # kept
    assert {old.hnsw_index_name, finished.hnsw_index_name} <= _index_names()
    after = search(params=SearchParams(query="visitor wifi", collections=("docs",)), user=SYSTEM,
                    record_usage=False)
    assert before.hits and after.hits


def test_activation_is_refused_until_complete(corpus, fake_embedder):
    """A model missing vectors cannot serve search."""
    new = embeddings.reembed_start(key="fake")
    with pytest.raises(embeddings.EmbeddingModelError):
        embeddings.embedding_model_activate(model=new)
    assert EmbeddingModel.objects.get(is_active=True).key == "minilm-int8"


def test_cancel_stops_and_leaves_search_on_the_old_model(corpus, fake_embedder):
    """A cancelled re-embedding stops at its next page; the active model is untouched."""
    new = embeddings.reembed_start(key="fake")
    embeddings.reembed_cancel(model=new)

    result = embeddings.reembed_run(model_id=new.pk, activate=True)

    assert result.status == EmbeddingModel.Status.CANCELLED and not result.is_active
    assert EmbeddingModel.objects.get(is_active=True).key == "minilm-int8"


def test_failed_page_keeps_progress_and_a_rerun_resumes(corpus, fake_embedder):
    """A provider failure mid-way leaves committed vectors; running again completes the model."""
    new = embeddings.reembed_start(key="fake")
    fake_embedder.enqueue(Fault(), Fault(status=500), Fault(status=500))
    with pytest.raises(Exception):  # noqa: B017 - the provider error propagates to the task
        embeddings.reembed_run(model_id=new.pk)
    partial = ChunkEmbedding.objects.filter(embedding_model=new).count()
    assert 0 < partial < Chunk.objects.count()
    assert EmbeddingModel.objects.get(is_active=True).key == "minilm-int8"

    done = embeddings.reembed_run(model_id=new.pk, activate=True)

    assert done.is_active
    assert ChunkEmbedding.objects.filter(embedding_model=new).count() == Chunk.objects.count()


def test_old_vectors_can_be_dropped_after_cutover(corpus, fake_embedder):
    """Dropping an inactive model removes its vectors and index; the active one refuses."""
    new = embeddings.reembed_run(model_id=embeddings.reembed_start(key="fake").pk, activate=True)
    old = EmbeddingModel.objects.get(key="minilm-int8")
    with pytest.raises(embeddings.EmbeddingModelError):
        embeddings.embedding_model_drop_vectors(model=new)

    dropped = embeddings.embedding_model_drop_vectors(model=old)

    assert dropped == Chunk.objects.count()
    assert old.hnsw_index_name not in _index_names()
    assert EmbeddingModel.objects.get(pk=old.pk).status == EmbeddingModel.Status.RETIRED


def test_documents_ingested_during_a_reembed_get_both_vectors(collection, ingest_one,
                                                              fake_embedder):
    """New uploads while a model is building are embedded with it too, so it stays complete."""
    ingest_one(collection, "guide.md", (SAMPLES / "guide.md").read_bytes())
    new = embeddings.reembed_start(key="fake")
    document = ingest_one(collection, "policy.docx", (SAMPLES / "policy.docx").read_bytes())

    chunks = Chunk.objects.filter(document=document).count()
    assert ChunkEmbedding.objects.filter(embedding_model=new,
                                         chunk__document=document).count() == chunks


def test_admin_reembeds_and_drops_vectors_in_queued_tasks(admin_client, corpus, fake_embedder,
                                                          django_capture_on_commit_callbacks):
    """The admin's re-embed page and its "Drop vectors" action queue the work (run inline
    here, as ingestion is); the model's status shows the drop until it is retired."""
    response = admin_client.post(reverse("admin:kb_embeddingmodel_reembed"),
                                 {"key": "fake", "activate": "on"}, follow=True)
    assert "started in the background" in response.content.decode()
    assert EmbeddingModel.objects.get(key="fake").is_active
    old = EmbeddingModel.objects.get(key="minilm-int8")
    changelist = reverse("admin:kb_embeddingmodel_changelist")

    with django_capture_on_commit_callbacks(execute=False):
        admin_client.post(changelist, {"action": "drop_vectors", "_selected_action": [old.pk]})
    assert EmbeddingModel.objects.get(pk=old.pk).status == EmbeddingModel.Status.DROPPING
    assert "Dropping vectors" in admin_client.get(changelist).content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(changelist, {"action": "drop_vectors",
                                                  "_selected_action": [old.pk]}, follow=True)
    assert "in the background" in response.content.decode()
    assert EmbeddingModel.objects.get(pk=old.pk).status == EmbeddingModel.Status.RETIRED
    assert not ChunkEmbedding.objects.filter(embedding_model=old).exists()
    assert old.hnsw_index_name not in _index_names()


def test_admin_drop_vectors_refuses_the_active_model(admin_client, corpus):
    active = EmbeddingModel.objects.get(is_active=True)
    response = admin_client.post(reverse("admin:kb_embeddingmodel_changelist"),
                                 {"action": "drop_vectors", "_selected_action": [active.pk]},
                                 follow=True)
    assert "serve search; activate another first" in response.content.decode()
    assert EmbeddingModel.objects.get(pk=active.pk).status == EmbeddingModel.Status.ACTIVE

