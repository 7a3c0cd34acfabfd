"""A disabled document is hidden from every reader path; only the editors' admin shows it."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from kb import selectors
from kb.models import Chunk
from kb.services.documents import document_disable

pytestmark = pytest.mark.django_db

TEXT = "# Retired policy\n\nThe old travel policy allowed business class on every flight.\n"


@pytest.fixture
def disabled(collection, ingest_one):
    document = ingest_one(collection, "retired.md", TEXT)
    document_disable(document=document)
    document.refresh_from_db()
    return document


def test_reader_paths_answer_404_for_a_disabled_document(disabled, django_user_model, client):
    """The document and chunk APIs and the source page treat a disabled document as absent."""
    reader = django_user_model.objects.create_user("reader", password="pw-reader-111")
    api = APIClient()
    api.force_authenticate(reader)
    chunk = Chunk.objects.filter(document=disabled).first()
    assert api.get(f"/api/v1/documents/{disabled.pk}/").status_code == 404
    assert api.get(f"/api/v1/chunks/{chunk.pk}/").status_code == 404
    assert disabled.pk not in {d["id"] for d in api.get("/api/v1/documents/").json()["results"]}
    listed = api.get("/api/v1/chunks/", {"document": disabled.pk})
    assert listed.status_code in {200, 404}
    if listed.status_code == 200:
        assert not listed.json()["results"]
    client.force_login(reader)
    page = client.get(f"/documents/{disabled.pk}/")
    assert page.status_code == 404 and b"business class" not in page.content


def test_the_admin_still_lists_a_disabled_document(disabled, admin_client):
    """Editors can still find a disabled document to enable it again."""
    assert admin_client.get(f"/admin/kb/document/{disabled.pk}/change/").status_code == 200
    assert selectors.documents_visible(user=selectors.SYSTEM, include_disabled=True).filter(
        pk=disabled.pk).exists()
