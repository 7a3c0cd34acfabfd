"""The documents API: multipart upload, listing, detail, chunks; the source page."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from kb.models import ApiKey, Document
from kb.services.api_keys import api_key_generate, api_key_hash

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "samples"

pytestmark = pytest.mark.django_db


def key_client(user) -> APIClient:
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="ci", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def api(django_user_model):
    """An editor's key: the user may add documents."""
    user = django_user_model.objects.create_user("editor", password="pw-editor-123")
    user.user_permissions.add(Permission.objects.get(codename="add_document"))
    return key_client(user)


@pytest.fixture
def reader_api(django_user_model):
    """A reader's key: the user may search and read, not upload."""
    return key_client(django_user_model.objects.create_user("reader", password="pw-reader-123"))


def test_upload_returns_202_with_an_outcome_per_file(api, collection,
                                                     django_capture_on_commit_callbacks):
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
    assert len(listed["results"]) == 2 and listed["next"] is None
    detail = api.get(f"/api/v1/documents/{guide.pk}/").json()
    assert detail["status"] == "ready" and detail["chunks_total"] > 0
    chunks = api.get("/api/v1/chunks/", {"document": guide.pk, "limit": 500}).json()
    assert len(chunks["results"]) == detail["chunks_total"]


def test_upload_without_files_is_a_400_with_field_messages(api, collection):
    response = api.post("/api/v1/documents/", {"collection": "docs"}, format="multipart")
    assert response.status_code == 400
    assert "file" in response.json()["error"]["fields"]


def test_upload_to_an_unknown_collection_is_refused(api, collection):
    files = [SimpleUploadedFile("guide.md", b"# Hello\n\nworld")]
    response = api.post("/api/v1/documents/", {"file": files, "collection": "nope"},
                        format="multipart")
    assert response.status_code == 400
    assert "collection" in response.json()["error"]["fields"]


def test_a_reader_cannot_upload(reader_api, collection):
    """Read access to a collection is not write access: uploading needs kb.add_document."""
    response = reader_api.post("/api/v1/documents/", {"file": [SimpleUploadedFile("a.md", b"# A")],
                                                       "collection": collection.slug})
    assert response.status_code == 403
    assert "permission" in response.json()["error"]["message"]
    assert not Document.objects.exists()


def test_a_json_body_that_is_not_an_object_is_a_400(api, collection):
    response = api.post("/api/v1/documents/", data="[1, 2]", content_type="application/json")
    assert response.status_code == 400
    assert "file" in response.json()["error"]["fields"]


@pytest.mark.parametrize("params", [{"status": "finished"}, {"collection": "no spaces"},
                                    {"collection": "docs\x00"}])
def test_invalid_document_list_filters_are_400s(api, params):
    response = api.get("/api/v1/documents/", params)
    assert response.status_code == 400
    assert set(response.json()["error"]["fields"]) == set(params)


@pytest.mark.parametrize("document", ["abc", "²", str(2**63), "0"])
def test_an_invalid_chunk_document_filter_is_a_400(api, document):
    response = api.get("/api/v1/chunks/", {"document": document})
    assert response.status_code == 400
    assert "document" in response.json()["error"]["fields"]


def test_page_limits_are_bounded(api, collection):
    response = api.get("/api/v1/documents/", {"limit": str(2**63), "offset": str(2**63)})
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_lists_page_by_cursor_without_repeats_or_gaps(api, ingest, collection):
    """A document written while a client pages through neither repeats a row nor hides one."""
    ingest(collection, "one.md", "# One\n\nFirst.\n")
    ingest(collection, "two.md", "# Two\n\nSecond.\n")
    ingest(collection, "three.md", "# Three\n\nThird.\n")
    page = api.get("/api/v1/documents/", {"limit": 2}).json()
    seen = [row["original_filename"] for row in page["results"]]
    assert seen == ["three.md", "two.md"] and page["previous"] is None
    ingest(collection, "four.md", "# Four\n\nFourth.\n")  # lands before the cursor
    page = api.get(page["next"]).json()
    seen += [row["original_filename"] for row in page["results"]]
    assert seen == ["three.md", "two.md", "one.md"] and page["next"] is None


def test_a_forged_cursor_is_a_clear_error(api, collection):
    response = api.get("/api/v1/documents/", {"cursor": "not-a-cursor"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid cursor"


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
