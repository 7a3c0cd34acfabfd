"""Upgrading a data directory filled by the torch MiniLM (the default before the light
install) to the ONNX default: it keeps serving throughout, then cuts over."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command

from kb.models import Chunk, ChunkEmbedding, Document, EmbeddingModel
from kb.providers import local
from kb.selectors import SYSTEM
from search.services import SearchParams, search

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "samples"

pytestmark = pytest.mark.django_db


@pytest.fixture
def filled_by_the_torch_model(settings, collection, ingest_one):
    """A knowledge base whose vectors came from the torch model, as older installs have."""
    pytest.importorskip("sentence_transformers", reason="filling it needs the torch extra")
    settings.KB_DEFAULT_EMBEDDING_MODEL = "minilm"
    for name in ["guide.md", "policy.docx"]:
        ingest_one(collection, name, (SAMPLES / name).read_bytes())
    assert EmbeddingModel.objects.get(is_active=True).key == "minilm"
    # The upgrade: the new release's default, installed without torch.
    settings.KB_DEFAULT_EMBEDDING_MODEL = "minilm-int8"
    return collection


def _top_document(query: str) -> str:
    result = search(params=SearchParams(query=query, collections=("docs",), mode="vector"),
                    user=SYSTEM, record_usage=False)
    return result.hits[0].document_title


def test_an_old_data_directory_keeps_serving_without_torch_then_reembeds(
        filled_by_the_torch_model, collection, ingest_one, monkeypatch):
    monkeypatch.setattr(local, "torch_installed", lambda: False)
    before = _top_document("visitor wifi password")

    # Still the old model, still searchable and still ingesting, torch or not.
    late = ingest_one(collection, "article.html", (SAMPLES / "article.html").read_bytes())
    assert late.status == Document.Status.READY
    assert EmbeddingModel.objects.get(is_active=True).key == "minilm"

    call_command("kb_reembed", "--model", "minilm-int8", "--activate", "--sync")

    active = EmbeddingModel.objects.get(is_active=True)
    assert active.key == "minilm-int8"
    assert ChunkEmbedding.objects.filter(embedding_model=active).count() == Chunk.objects.count()
    assert _top_document("visitor wifi password") == before


def test_the_reembed_page_says_why_no_other_model_can_be_used(admin_client, settings,
                                                              monkeypatch):
    """On a torch-free install without an API key nothing else can fill a new space: the
    page names each model's reason instead of offering an empty choice."""
    from django.urls import reverse

    from kb.embeddings import embedding_model_active_or_bootstrap

    monkeypatch.setattr(local, "torch_installed", lambda: False)
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "embedding": {
        key: entry for key, entry in settings.KB_PROVIDERS["embedding"].items()
        if key in {"minilm-int8", "minilm"}}}
    embedding_model_active_or_bootstrap()

    page = admin_client.get(reverse("admin:kb_embeddingmodel_reembed")).content.decode()

    assert "No other embedding model can be used here yet" in page
    assert "pip install -e &#x27;.[torch]&#x27;" in page
    assert "Start re-embedding" not in page
