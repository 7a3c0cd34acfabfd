"""The documents API: multipart upload, listing, detail, chunks; the source page."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from kb.authentication import api_key_generate, api_key_hash
from kb.models import ApiKey, Document

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "samples"

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(django_user_model):
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="ci", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_upload_returns_202_with_an_outcome_per_file(api, collection, django_capture_on_commit_callbacks):
    """Several files in one request: each gets its outcome, and ingestion runs in the background."""
    files = [SimpleUploadedFile("guide.md", (SAMPLES / "guide.md").read_bytes()),
             SimpleUploadedFile("empty.txt", b"")]
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/documents/", {"file": files, "collection": "docs"},
                            format="multipart")

    assert response.status_code == 202
    outcomes = {r["filename"]: r["outcome"] for r in response.json()["results"]}
    assert outcomes == {"guide.md": "created", "empty.txt": "rejected"}
    guide = Document.objects.get(original_filename="guide.md")
    assert guide.status == Document.Status.READY

    listed = api.get("/api/v1/documents/", {"collection": "docs"}).json()
    assert listed["count"] == 2
    detail = api.get(f"/api/v1/documents/{guide.pk}/").json()
    assert detail["status"] == "ready" and detail["chunks_total"] > 0
    chunks = api.get("/api/v1/chunks/", {"document": guide.pk}).json()
    assert chunks["count"] == detail["chunks_total"]


def test_upload_without_files_is_a_400_with_field_messages(api, collection):
    response = api.post("/api/v1/documents/", {"collection": "docs"}, format="multipart")
    assert response.status_code == 400
    assert "file" in response.json()["error"]["fields"]


def test_upload_to_an_unknown_collection_is_refused(api, collection):
    files = [SimpleUploadedFile("guide.md", b"# Hello\n\nworld")]
    response = api.post("/api/v1/documents/", {"file": files, "collection": "nope"}, format="multipart")
    assert response.status_code == 400
    assert "collection" in response.json()["error"]["fields"]


def test_the_api_needs_credentials():
    assert APIClient().get("/api/v1/documents/").status_code in {401, 403}
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer kb_nothing_here")
    assert bad.get("/api/v1/documents/").status_code == 401


def test_source_page_anchors_every_chunk(client, admin_user, collection, ingest_one):
    """Citation links land on the passage in the document's source view."""
    document = ingest_one(collection, "manual.pdf", (SAMPLES / "manual.pdf").read_bytes())
    client.force_login(admin_user)

    page = client.get(f"/documents/{document.pk}/").content.decode()

    for chunk in document.chunks.all():
        assert f'id="chunk-{chunk.pk}"' in page
