"""Managing the knowledge base over REST: the admin's document actions (delete, disable,
enable, reprocess) and the caller's API keys, with the admin's permissions."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from kb.models import ApiKey, Chunk, ChunkEmbedding, Document
from kb.services.api_keys import api_key_create
from kb.services.collections import collection_get_or_create
from search.models import Posting

pytestmark = pytest.mark.django_db

GUIDE = "# Tide tables\n\nThe harbour publishes tide tables every morning at six.\n"


def client_for(user, *, collections=()) -> tuple[APIClient, ApiKey]:
    api_key, raw = api_key_create(user=user, name="ci", collections=list(collections))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client, api_key


def user_with(django_user_model, username: str, *codenames: str):
    user = django_user_model.objects.create_user(username, password=f"pw-{username}-123")
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="kb",
                                                         codename__in=codenames))
    return user


@pytest.fixture
def guide(collection, ingest_one):
    return ingest_one(collection, "guide.md", GUIDE)


def test_an_editor_disables_and_enables_a_document(django_user_model, guide):
    api, _ = client_for(user_with(django_user_model, "editor", "change_document"))

    disabled = api.post(f"/api/v1/documents/{guide.pk}/disable/")
    assert disabled.status_code == 200, disabled.content
    assert disabled.json()["status"] == "disabled"
    assert not Chunk.objects.filter(document=guide, searchable=True).exists()
    found = api.post("/api/v1/search", {"query": "tide tables", "mode": "bm25"}, format="json")
    assert found.json()["results"] == []

    enabled = api.post(f"/api/v1/documents/{guide.pk}/enable/")
    assert enabled.status_code == 200 and enabled.json()["status"] == "ready"
    found = api.post("/api/v1/search", {"query": "tide tables", "mode": "bm25"}, format="json")
    assert [hit["document_id"] for hit in found.json()["results"]] == [guide.pk]


def test_enabling_a_document_that_is_not_disabled_is_a_400(django_user_model, guide):
    api, _ = client_for(user_with(django_user_model, "editor", "change_document"))
    response = api.post(f"/api/v1/documents/{guide.pk}/enable/")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["status"]


def test_reprocess_answers_202_with_the_document_url_to_follow(
    django_user_model, guide, django_capture_on_commit_callbacks
):
    api, _ = client_for(user_with(django_user_model, "editor", "change_document"))
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"/api/v1/documents/{guide.pk}/reprocess/")
    assert response.status_code == 202, response.content
    assert response["Location"].endswith(f"/api/v1/documents/{guide.pk}/")
    followed = api.get(response["Location"]).json()
    assert followed["status"] == "ready" and followed["chunks_total"] >= 1
    guide.refresh_from_db()
    assert guide.chunk_generation == 2


def test_delete_removes_the_chunks_vectors_and_postings(django_user_model, guide):
    api, _ = client_for(user_with(django_user_model, "editor", "delete_document"))
    chunk_ids = list(Chunk.objects.filter(document=guide).values_list("pk", flat=True))
    assert chunk_ids and Posting.objects.filter(chunk_id__in=chunk_ids).exists()

    response = api.delete(f"/api/v1/documents/{guide.pk}/")

    assert response.status_code == 204
    assert not Document.objects.filter(pk=guide.pk).exists()
    assert not Chunk.objects.filter(pk__in=chunk_ids).exists()
    assert not ChunkEmbedding.objects.filter(chunk_id__in=chunk_ids).exists()
    assert not Posting.objects.filter(chunk_id__in=chunk_ids).exists()
    assert api.get(f"/api/v1/documents/{guide.pk}/").status_code == 404


@pytest.mark.parametrize(("method", "path", "codename"), [
    ("delete", "/api/v1/documents/{pk}/", "delete_document"),
    ("post", "/api/v1/documents/{pk}/disable/", "change_document"),
    ("post", "/api/v1/documents/{pk}/enable/", "change_document"),
    ("post", "/api/v1/documents/{pk}/reprocess/", "change_document"),
])
def test_each_action_needs_the_admins_permission(django_user_model, guide, method, path,
                                                 codename):
    # A reader of the collection, and an editor with the other permissions only.
    others = {"delete_document", "change_document", "add_document"} - {codename}
    for user in (user_with(django_user_model, "reader"),
                 user_with(django_user_model, "other", *others)):
        api, _ = client_for(user)
        response = getattr(api, method)(path.format(pk=guide.pk))
        assert response.status_code == 403, (user, response.content)
        assert "permission" in response.json()["error"]["message"]
    guide.refresh_from_db()
    assert guide.status == Document.Status.READY


def test_a_document_the_caller_cannot_read_is_a_404_whatever_their_permissions(
    django_user_model, ingest_one
):
    restricted = collection_get_or_create(slug="private", name="Private")
    restricted.is_public = False
    restricted.save()
    hidden = ingest_one(restricted, "secret.md", "# Secret\n\nThe vault code.\n")
    api, _ = client_for(user_with(django_user_model, "editor", "change_document",
                                  "delete_document"))
    assert api.post(f"/api/v1/documents/{hidden.pk}/disable/").status_code == 404
    assert api.delete(f"/api/v1/documents/{hidden.pk}/").status_code == 404
    hidden.refresh_from_db()
    assert hidden.status == Document.Status.READY


def test_a_key_narrowed_to_another_collection_cannot_act_on_the_document(
    django_user_model, guide
):
    other = collection_get_or_create(slug="other", name="Other")
    editor = user_with(django_user_model, "editor", "delete_document")
    api, _ = client_for(editor, collections=[other])
    assert api.delete(f"/api/v1/documents/{guide.pk}/").status_code == 404
    assert Document.objects.filter(pk=guide.pk).exists()


def test_a_user_lists_creates_and_revokes_their_own_keys(django_user_model):
    user = user_with(django_user_model, "alice")
    api, own = client_for(user)

    created = api.post("/api/v1/keys/", {"name": "laptop", "rate_limit": "60/m"}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["prefix"] in body["key"] and body["user"] == "alice"
    listed = api.get("/api/v1/keys/").json()
    assert {k["name"] for k in listed["results"]} == {"ci", "laptop"}
    assert all("key" not in k for k in listed["results"])

    new = APIClient()
    new.credentials(HTTP_AUTHORIZATION=f"Bearer {body['key']}")
    assert new.get("/api/v1/collections/").status_code == 200
    assert api.delete(f"/api/v1/keys/{body['id']}/").status_code == 204
    assert new.get("/api/v1/collections/").status_code == 401
    assert ApiKey.objects.get(pk=body["id"]).revoked_at is not None
    assert ApiKey.objects.get(pk=own.pk).revoked_at is None


def test_other_users_keys_need_the_manage_all_permission(django_user_model):
    alice = user_with(django_user_model, "alice")
    bob = user_with(django_user_model, "bob")
    _, bobs_key = client_for(bob)
    api, _ = client_for(alice)

    assert bobs_key.pk not in {k["id"] for k in api.get("/api/v1/keys/").json()["results"]}
    assert api.delete(f"/api/v1/keys/{bobs_key.pk}/").status_code == 404
    refused = api.post("/api/v1/keys/", {"name": "for bob", "user": "bob"}, format="json")
    assert refused.status_code == 400 and "user" in refused.json()["error"]["fields"]

    admin = user_with(django_user_model, "keymaster", "manage_all_api_keys")
    admin_api, _ = client_for(admin)
    assert bobs_key.pk in {k["id"] for k in admin_api.get("/api/v1/keys/").json()["results"]}
    assert admin_api.delete(f"/api/v1/keys/{bobs_key.pk}/").status_code == 204
    bobs_key.refresh_from_db()
    assert bobs_key.revoked_at is not None


def test_a_key_cannot_read_a_collection_its_granter_cannot(django_user_model):
    restricted = collection_get_or_create(slug="private", name="Private")
    restricted.is_public = False
    restricted.save()
    api, _ = client_for(user_with(django_user_model, "alice"))
    response = api.post("/api/v1/keys/", {"name": "x", "collections": ["private"]},
                        format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["collections"] == [
        "No collection you can read: private."]


def test_a_narrowed_key_mints_only_keys_narrowed_within_it(django_user_model, collection):
    other = collection_get_or_create(slug="other", name="Other")
    api, _ = client_for(user_with(django_user_model, "alice"), collections=[collection])
    for asked in ([], ["other"], ["docs", "other"]):
        response = api.post("/api/v1/keys/", {"name": "wider", "collections": asked},
                            format="json")
        assert response.status_code == 400, (asked, response.content)
    narrowed = api.post("/api/v1/keys/", {"name": "same", "collections": ["docs"]},
                        format="json")
    assert narrowed.status_code == 201 and narrowed.json()["collections"] == ["docs"]
    assert other.pk  # a collection the new key does not get


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "x" * 101}, {"name": "x", "rate_limit": "fast"},
    {"name": "x", "collections": "docs"}, {"name": "x", "collections": ["no such"]},
])
def test_malformed_key_requests_are_400s_with_field_messages(django_user_model, body):
    api, _ = client_for(user_with(django_user_model, "alice"))
    response = api.post("/api/v1/keys/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"]
