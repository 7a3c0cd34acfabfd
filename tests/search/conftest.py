"""Fixtures for search tests: a reader account, and a corpus ingested once per module.

Ingesting through the real pipeline (parse, chunk, embed with the local model, index)
costs seconds per test; most search tests only read, so each module ingests its corpus
once, committed, and removes it afterwards. Tests still run in their own transaction,
so a test that disables or deletes a shared document is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SHARED_SLUG = "shared"
SHARED_FILES = [
    ("demo", "how-search-works.md", {"audience": "everyone"}),
    ("demo", "uploading-documents.md", {"audience": "editors"}),
    ("demo", "chat-and-citations.md", {"audience": "everyone"}),
    ("demo", "getting-started.md", {"audience": "everyone"}),
    ("samples", "guide.md", {"audience": "everyone", "team": "alpha"}),
]


@dataclass
class SharedCorpus:
    collection: object
    documents: dict  # original filename -> Document


@pytest.fixture
def reader(db):
    """A signed-in user without special rights: searches public collections, as API callers do."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(username="reader", password=None)


@pytest.fixture(scope="module")
def shared_corpus(django_db_setup, django_db_blocker, tmp_path_factory):
    """Five real documents in collection `shared`, ingested once for the module."""
    from django.test.utils import override_settings

    from kb import embeddings
    from kb.models import Collection, Document, EmbeddingModel, UsageRecord
    from kb.services.collections import collection_get_or_create
    from kb.services.documents import document_delete
    from kb.services.ingest import documents_ingest_batch
    from kb.services.uploads import documents_upload

    media = tmp_path_factory.mktemp("shared-media")
    with django_db_blocker.unblock(), override_settings(MEDIA_ROOT=media):
        models_before = set(EmbeddingModel.objects.values_list("pk", flat=True))
        usage_before = set(UsageRecord.objects.values_list("pk", flat=True))
        collection = collection_get_or_create(slug=SHARED_SLUG, name="Shared")
        ids = []
        for folder, name, metadata in SHARED_FILES:
            (outcome,) = documents_upload(
                collection=collection, filename=name, data=(FIXTURES / folder / name).read_bytes(),
                metadata=metadata, queue=False,
            )
            ids.append(outcome.document.pk)
        documents_ingest_batch(document_ids=ids)
        documents = {d.original_filename: d for d in Document.objects.filter(pk__in=ids)}
        assert all(d.status == Document.Status.READY for d in documents.values()), documents
    yield SharedCorpus(collection=collection, documents=documents)
    with django_db_blocker.unblock(), override_settings(MEDIA_ROOT=media):
        for document in Document.objects.filter(collection=collection):
            document_delete(document=document)
        Collection.objects.filter(pk=collection.pk).delete()
        UsageRecord.objects.exclude(pk__in=usage_before).delete()
        for model in EmbeddingModel.objects.exclude(pk__in=models_before):
            embeddings.embedding_model_index_drop(model=model)
            model.delete()


@pytest.fixture
def kb_bm25_installed(db, settings):
    """The kb_bm25 extension is in the test database: required of the embedded server, which
    builds it; on a server of your own without it, the test is skipped."""
    from django.db import connection

    from search.postgres_extension import extension_installed

    if not extension_installed(connection):
        if settings.DATABASES["default"]["ENGINE"] == "kb.ops.embedded_postgres":
            pytest.fail("The embedded server should have kb_bm25 built and created (see the log).")
        pytest.skip("This PostgreSQL server has no kb_bm25 extension "
                    "(make -C search/postgres install).")
