"""What the admin says: counts with proper plurals, and models that cannot work marked so."""

from __future__ import annotations

import pytest
from django.urls import reverse

from kb import embeddings
from kb.admin import document_progress_text
from kb.models import Document, EmbeddingModel

pytestmark = pytest.mark.django_db

GUIDE = "# Guide\n\nOne short paragraph about the cafeteria.\n"


def test_progress_text_uses_singular_and_hides_an_empty_count(collection, ingest_one):
    """"1 chunk", never "1 chunks"; a queued document with no chunks yet says only "Queued"."""
    document = ingest_one(collection, "guide.md", GUIDE)
    assert document.chunks_total == 1
    assert document_progress_text(document).startswith("1 chunk embedded")

    document.status, document.stage = Document.Status.PENDING, Document.Stage.QUEUED
    document.chunks_total = document.chunks_embedded = 0
    document.processing_started_at = None
    assert document_progress_text(document) == "Queued"

    document.status, document.stage = Document.Status.PROCESSING, Document.Stage.EMBEDDING
    document.chunks_total, document.chunks_embedded = 1, 0
    assert document_progress_text(document) == "Embedding: 0/1 chunk"
    document.chunks_total = 1200
    assert document_progress_text(document) == "Embedding: 0/1,200 chunks"


def test_progress_endpoint_carries_the_worded_text(admin_client, collection, ingest_one):
    """The polling endpoint sends the same words as the page, so the poller need not build them."""
    document = ingest_one(collection, "guide.md", GUIDE)
    response = admin_client.get(reverse("admin:kb_document_progress"), {"ids": document.pk})
    (payload,) = response.json()["documents"]
    assert payload["text"] == document_progress_text(document)


def test_disable_and_enable_messages_count_properly(admin_client, collection, ingest_one):
    """"Disabled 1 document." and "Enabled 1 document." after acting on one document."""
    document = ingest_one(collection, "guide.md", GUIDE)
    changelist = reverse("admin:kb_document_changelist")
    page = admin_client.post(changelist, {"action": "disable", "_selected_action": [document.pk]},
                             follow=True).content.decode()
    assert "Disabled 1 document." in page
    page = admin_client.post(changelist, {"action": "enable", "_selected_action": [document.pk]},
                             follow=True).content.decode()
    assert "Enabled 1 document." in page


@pytest.fixture
def openai_without_key(settings):
    settings.KB_PROVIDERS = {
        **settings.KB_PROVIDERS,
        "embedding": {
            **settings.KB_PROVIDERS["embedding"],
            "openai": {"BACKEND": "kb.providers.openai.OpenAIEmbeddings",
                       "MODEL": "text-embedding-3-small", "base_url": None, "api_key": None},
        },
    }


def test_reembed_page_marks_a_model_without_api_key_unavailable(admin_client, openai_without_key):
    """The OpenAI model is listed, disabled, with the reason; choosing it anyway is refused."""
    url = reverse("admin:kb_embeddingmodel_reembed")
    page = admin_client.get(url).content.decode()
    assert ('<option value="openai" disabled>openai — text-embedding-3-small '
            "(unavailable: OPENAI_API_KEY is not set") in page

    response = admin_client.post(url, {"key": "openai", "activate": "on"})
    assert response.status_code == 200
    assert "openai cannot be used: OPENAI_API_KEY is not set" in response.content.decode()
    assert not EmbeddingModel.objects.filter(key="openai").exists()


def test_reembed_start_refuses_a_model_that_cannot_work(openai_without_key):
    """kb_reembed and the admin share the refusal: nothing is registered, no call is made."""
    with pytest.raises(embeddings.EmbeddingModelError, match="OPENAI_API_KEY is not set"):
        embeddings.reembed_start(key="openai")
    assert not EmbeddingModel.objects.filter(key="openai").exists()


def test_a_compatible_server_without_key_stays_available(admin_client, settings):
    """OPENAI_BASE_URL alone (Ollama, vLLM) is a working setup: the model is offered."""
    settings.KB_PROVIDERS = {
        **settings.KB_PROVIDERS,
        "embedding": {
            **settings.KB_PROVIDERS["embedding"],
            "openai": {"BACKEND": "kb.providers.openai.OpenAIEmbeddings", "MODEL": "nomic",
                       "base_url": "http://127.0.0.1:11434/v1", "api_key": None},
        },
    }
    page = admin_client.get(reverse("admin:kb_embeddingmodel_reembed")).content.decode()
    assert '<option value="openai">openai — nomic</option>' in page


def test_the_document_list_names_office_types_briefly(admin_client, ingest_one, collection):
    """The list shows "DOCX" for the long Office MIME type, with the full type as a tooltip."""
    from pathlib import Path

    from django.urls import reverse

    sample = Path(__file__).resolve().parents[2] / "fixtures" / "samples" / "policy.docx"
    ingest_one(collection, "policy.docx", sample.read_bytes())
    page = admin_client.get(reverse("admin:kb_document_changelist")).content.decode()
    assert ">DOCX</span>" in page
    assert 'title="application/vnd.openxmlformats-officedocument.wordprocessingml.document"' in page


def test_an_upload_summary_leaves_out_zero_counts(collection):
    """A queued upload's summary does not say "0 duplicates, 0 rejected"."""
    from kb.services.uploads import documents_upload, upload_summary

    outcomes = documents_upload(collection=collection, filename="a.md",
                                         data=b"# A\n\nText.", queue=False)
    text = upload_summary(outcomes=outcomes).text
    assert "1 file queued for processing" in text
    assert "0 rejected" not in text and "0 duplicates" not in text
