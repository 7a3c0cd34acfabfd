"""Idempotency-Key on creates and uploads, ETag / If-Match on updates (kb.api.conventions)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from kb.models import ApiKey, Collection, Document
from kb.services.api_keys import api_key_create

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def editor(django_user_model):
    user = django_user_model.objects.create_user("editor", password="pw-editor-123")
    user.user_permissions.add(*Permission.objects.filter(
        content_type__app_label="kb",
        codename__in=["add_collection", "change_collection", "add_document"]))
    return user


def client_of(user) -> APIClient:
    _, raw = api_key_create(user=user, name="ci")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_a_retried_create_returns_the_first_answer_and_creates_once(editor):
    api = client_of(editor)
    body = {"slug": "ops", "name": "Operations"}
    first = api.post("/api/v1/collections/", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    again = api.post("/api/v1/collections/", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert Collection.objects.filter(slug="ops").count() == 1
    # Without the header a repeat is a new request (here: the slug is taken).
    assert api.post("/api/v1/collections/", body, format="json").status_code == 400


def test_the_same_key_with_another_request_is_a_422(editor):
    api = client_of(editor)
    api.post("/api/v1/collections/", {"slug": "ops", "name": "Ops"}, format="json",
             HTTP_IDEMPOTENCY_KEY="k-2")
    other = api.post("/api/v1/collections/", {"slug": "dev", "name": "Dev"}, format="json",
                     HTTP_IDEMPOTENCY_KEY="k-2")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert not Collection.objects.filter(slug="dev").exists()


def test_keys_are_per_caller(editor, django_user_model):
    other = django_user_model.objects.create_user("other", password="pw-other-1234")
    other.user_permissions.add(Permission.objects.get(codename="add_collection"))
    client_of(editor).post("/api/v1/collections/", {"slug": "a", "name": "A"}, format="json",
                           HTTP_IDEMPOTENCY_KEY="shared")
    theirs = client_of(other).post("/api/v1/collections/", {"slug": "b", "name": "B"},
                                   format="json", HTTP_IDEMPOTENCY_KEY="shared")
    assert theirs.status_code == 201 and "Idempotent-Replayed" not in theirs


def test_a_retried_upload_is_not_stored_twice(editor, collection):
    api = client_of(editor)

    def upload():
        return api.post("/api/v1/documents/", {
            "collection": "docs",
            "file": [SimpleUploadedFile("notes.md", b"# Notes\n\nThe pier closes at nine.\n")],
        }, format="multipart", HTTP_IDEMPOTENCY_KEY="upload-1")

    first, again = upload(), upload()
    assert first.status_code == again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["results"][0]["outcome"] == "created"
    assert Document.objects.filter(original_filename="notes.md").count() == 1


def test_a_retried_key_creation_returns_the_same_key(editor):
    api = client_of(editor)
    first = api.post("/api/v1/keys/", {"name": "laptop"}, format="json",
                     HTTP_IDEMPOTENCY_KEY="key-1")
    again = api.post("/api/v1/keys/", {"name": "laptop"}, format="json",
                     HTTP_IDEMPOTENCY_KEY="key-1")
    assert first.json()["key"] == again.json()["key"]
    assert ApiKey.objects.filter(name="laptop").count() == 1


def test_an_overlong_key_is_a_400(editor):
    response = client_of(editor).post("/api/v1/collections/", {"slug": "x", "name": "X"},
                                      format="json", HTTP_IDEMPOTENCY_KEY="k" * 256)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["fields"]


def test_if_match_stops_a_second_editor_from_overwriting_the_first(editor, collection):
    first, second = client_of(editor), client_of(editor)
    etag = first.get("/api/v1/collections/docs/")["ETag"]
    assert second.get("/api/v1/collections/docs/")["ETag"] == etag

    saved = first.patch("/api/v1/collections/docs/", {"name": "Handbook"}, format="json",
                        HTTP_IF_MATCH=etag)
    assert saved.status_code == 200 and saved["ETag"] != etag
    stale = second.patch("/api/v1/collections/docs/", {"name": "Manual"}, format="json",
                         HTTP_IF_MATCH=etag)
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "precondition_failed"
    collection.refresh_from_db()
    assert collection.name == "Handbook"
    assert second.patch("/api/v1/collections/docs/", {"name": "Manual"}, format="json",
                        HTTP_IF_MATCH=saved["ETag"]).status_code == 200


def test_the_collection_etag_ignores_counts_that_ingestion_moves(editor, collection,
                                                                 ingest_one):
    api = client_of(editor)
    before = api.get("/api/v1/collections/docs/")["ETag"]
    ingest_one(collection, "a.md", "# A\n\nSome text.\n")
    assert api.get("/api/v1/collections/docs/")["ETag"] == before
