"""Managing the knowledge base over REST: collections (create, grant, change, delete), the
admin's document actions (delete, disable, enable, reprocess) and the caller's API keys, with
the admin's permissions and collection access."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from kb.models import ApiKey, Chunk, ChunkEmbedding, Collection, Document
from kb.services.api_keys import api_key_create
from kb.services.collections import collection_get_or_create
from search.models import CollectionStatistic, Posting, TermStatistic

pytestmark = pytest.mark.django_db

GUIDE = "# Tide tables\n\nThe harbour publishes tide tables every morning at six.\n"


def client_for(user, *, collections=()) -> tuple[APIClient, ApiKey]:
    api_key, raw = api_key_create(user=user, name="ci", collections=list(collections))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client, api_key


def user_with(django_user_model, username: str, *codenames: str):
    user = django_user_model.objects.create_user(username, password=f"pw-{username}-123")
    # Codenames are unique across the project's apps (view_budget is chat's, and so on).
    user.user_permissions.add(*Permission.objects.filter(
        content_type__app_label__in=["kb", "chat", "search"], codename__in=codenames))
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


def test_a_key_is_renamed_limited_and_narrowed(django_user_model, collection):
    api, calling_key = client_for(user_with(django_user_model, "alice"))
    key, _ = api_key_create(user=calling_key.user, name="laptop")
    path = f"/api/v1/keys/{key.pk}/"
    changed = api.patch(path, {"name": "old laptop", "rate_limit": "30/m",
                               "collections": ["docs"]}, format="json")
    assert changed.status_code == 200, changed.content
    assert (changed.json()["name"], changed.json()["rate_limit"],
            changed.json()["collections"]) == ("old laptop", "30/m", ["docs"])
    assert api.get(path).json()["collections"] == ["docs"]
    assert api.patch(path, {"rate_limit": "fast"}, format="json").status_code == 400


def test_a_narrowed_key_cannot_widen_a_key(django_user_model, collection):
    collection_get_or_create(slug="other", name="Other")
    api, calling_key = client_for(user_with(django_user_model, "alice"),
                                  collections=[collection])
    for asked in ([], ["other"]):
        response = api.patch(f"/api/v1/keys/{calling_key.pk}/", {"collections": asked},
                             format="json")
        assert response.status_code == 400, (asked, response.content)
    assert list(calling_key.collections.values_list("slug", flat=True)) == ["docs"]


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "x" * 101}, {"name": "x", "rate_limit": "fast"},
    {"name": "x", "collections": "docs"}, {"name": "x", "collections": ["no such"]},
])
def test_malformed_key_requests_are_400s_with_field_messages(django_user_model, body):
    api, _ = client_for(user_with(django_user_model, "alice"))
    response = api.post("/api/v1/keys/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"]


# --- Collections ---


def test_an_editor_creates_a_restricted_collection_and_grants_it(django_user_model):
    editor = user_with(django_user_model, "editor", "add_collection", "change_collection")
    reader = user_with(django_user_model, "reader")
    Group.objects.create(name="harbour")
    api, _ = client_for(editor)
    reader_api, _ = client_for(reader)

    created = api.post("/api/v1/collections/", {
        "slug": "harbour-ops", "name": "Harbour operations", "is_public": False,
        "text_search_config": "simple", "allowed_groups": ["harbour"],
    }, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    # Its maker stays among its readers, so they can go on managing it.
    assert body["allowed_users"] == ["editor"] and body["allowed_groups"] == ["harbour"]
    assert body["text_search_config"] == "simple" and body["document_count"] == 0
    assert reader_api.get("/api/v1/collections/harbour-ops/").status_code == 404

    granted = api.patch("/api/v1/collections/harbour-ops/",
                        {"allowed_users": ["editor", "reader"]}, format="json")
    assert granted.status_code == 200, granted.content
    assert reader_api.get("/api/v1/collections/harbour-ops/").status_code == 200
    assert "harbour-ops" in {c["slug"] for c in
                             reader_api.get("/api/v1/collections/").json()["results"]}


def test_changing_the_language_requeues_the_index(django_user_model, guide,
                                                  django_capture_on_commit_callbacks):
    api, _ = client_for(user_with(django_user_model, "editor", "change_collection"))
    with django_capture_on_commit_callbacks(execute=True):
        response = api.patch("/api/v1/collections/docs/", {"text_search_config": "simple"},
                             format="json")
    assert response.status_code == 200, response.content
    guide.collection.refresh_from_db()
    assert guide.collection.text_search_config == "simple"
    assert guide.collection.reindex_status == "current"  # the queued re-index ran inline
    found = api.post("/api/v1/search", {"query": "publishes", "mode": "bm25"}, format="json")
    assert [hit["document_id"] for hit in found.json()["results"]] == [guide.pk]


def test_deleting_a_collection_with_documents_needs_force_and_cleans_everything(
    django_user_model, guide
):
    api, _ = client_for(user_with(django_user_model, "editor", "delete_collection"))
    chunk_ids = list(Chunk.objects.filter(document=guide).values_list("pk", flat=True))

    refused = api.delete("/api/v1/collections/docs/")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "not_empty"
    assert Document.objects.filter(pk=guide.pk).exists()

    assert api.delete("/api/v1/collections/docs/?force=true").status_code == 204
    assert not Collection.objects.filter(slug="docs").exists()
    assert not Document.objects.filter(pk=guide.pk).exists()
    assert not ChunkEmbedding.objects.filter(chunk_id__in=chunk_ids).exists()
    assert not Posting.objects.filter(chunk_id__in=chunk_ids).exists()
    assert not CollectionStatistic.objects.filter(collection_id=guide.collection_id).exists()
    assert not TermStatistic.objects.filter(collection_id=guide.collection_id).exists()


@pytest.mark.parametrize(("method", "body", "codename"), [
    ("post", {"slug": "new", "name": "New"}, "add_collection"),
    ("patch", {"name": "Renamed"}, "change_collection"),
    ("delete", None, "delete_collection"),
])
def test_collection_writes_need_the_admins_permission(django_user_model, collection, method,
                                                      body, codename):
    api, _ = client_for(user_with(django_user_model, "reader"))
    path = "/api/v1/collections/" + ("" if method == "post" else "docs/")
    response = getattr(api, method)(path, body, format="json")
    assert response.status_code == 403, response.content
    collection.refresh_from_db()
    assert collection.name == "Docs"
    assert not Collection.objects.filter(slug="new").exists()


def test_a_collection_the_caller_cannot_read_is_a_404(django_user_model):
    private = collection_get_or_create(slug="private", name="Private")
    private.is_public = False
    private.save()
    api, _ = client_for(user_with(django_user_model, "editor", "change_collection",
                                  "delete_collection"))
    assert api.patch("/api/v1/collections/private/", {"name": "Mine"},
                     format="json").status_code == 404
    assert api.delete("/api/v1/collections/private/?force=true").status_code == 404
    assert Collection.objects.get(slug="private").name == "Private"


@pytest.mark.parametrize("body", [
    {"name": "No slug"}, {"slug": "docs", "name": "Taken"}, {"slug": "bad slug", "name": "x"},
    {"slug": "x", "name": "x", "text_search_config": "klingon"},
    {"slug": "x", "name": "x", "allowed_users": ["nobody"]},
    {"slug": "x", "name": "x", "allowed_groups": ["nogroup"]},
    {"slug": "x", "name": "x", "is_public": "perhaps"},
])
def test_malformed_collections_are_400s_with_field_messages(django_user_model, collection, body):
    api, _ = client_for(user_with(django_user_model, "editor", "add_collection"))
    response = api.post("/api/v1/collections/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"]


# --- Text uploads ---


def test_text_with_a_title_is_uploaded_as_json(django_user_model, collection,
                                               django_capture_on_commit_callbacks):
    api, _ = client_for(user_with(django_user_model, "editor", "add_document"))
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/documents/", {
            "collection": "docs", "title": "Ferry timetable",
            "text": "The first ferry leaves the quay at 06:40 on weekdays.",
        }, format="json")
    assert response.status_code == 202, response.content
    (result,) = response.json()["results"]
    assert result["outcome"] == "created" and result["filename"] == "ferry-timetable.md"
    document = Document.objects.get(pk=result["document"]["id"])
    assert document.title == "Ferry timetable" and document.status == Document.Status.READY
    found = api.post("/api/v1/search", {"query": "first ferry quay", "mode": "bm25"},
                     format="json")
    assert [hit["document_id"] for hit in found.json()["results"]] == [document.pk]


@pytest.mark.parametrize("body", [
    {"collection": "docs", "text": "no title"}, {"collection": "docs", "title": "no text"},
    {"collection": "docs", "title": "t", "text": "x", "format": "pdf"},
    {"collection": "nope", "title": "t", "text": "x"},
])
def test_malformed_text_uploads_are_400s(django_user_model, collection, body):
    api, _ = client_for(user_with(django_user_model, "editor", "add_document"))
    response = api.post("/api/v1/documents/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"]
    assert not Document.objects.exists()


# --- Replacing a document's file ---


def test_replacing_the_file_makes_a_new_version_of_the_same_document(
    django_user_model, guide, django_capture_on_commit_callbacks
):
    api, _ = client_for(user_with(django_user_model, "editor", "add_document",
                                  "change_document"))
    new = SimpleUploadedFile("tides-2027.md", b"# Tide tables\n\nTide tables now come at seven.\n")
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"/api/v1/documents/{guide.pk}/replace/", {"file": new},
                            format="multipart")
    assert response.status_code == 202, response.content
    assert response.json()["outcome"] == "updated"
    assert response["Location"].endswith(f"/api/v1/documents/{guide.pk}/")
    guide.refresh_from_db()
    assert guide.original_filename == "guide.md" and guide.chunk_generation == 2
    found = api.post("/api/v1/search", {"query": "seven", "mode": "bm25"}, format="json")
    assert [hit["document_id"] for hit in found.json()["results"]] == [guide.pk]
    assert not Chunk.objects.filter(document=guide, searchable=True, generation=1).exists()

    same = SimpleUploadedFile("again.md", b"# Tide tables\n\nTide tables now come at seven.\n")
    again = api.post(f"/api/v1/documents/{guide.pk}/replace/", {"file": same},
                     format="multipart")
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"


def test_replacing_needs_the_change_permission(django_user_model, guide):
    api, _ = client_for(user_with(django_user_model, "adder", "add_document"))
    new = SimpleUploadedFile("x.md", b"# Other\n\nOther text.\n")
    response = api.post(f"/api/v1/documents/{guide.pk}/replace/", {"file": new},
                        format="multipart")
    assert response.status_code == 403
    guide.refresh_from_db()
    assert guide.chunk_generation == 1


def test_replacing_with_a_zip_or_nothing_is_a_400(django_user_model, guide):
    import io
    import zipfile

    api, _ = client_for(user_with(django_user_model, "editor", "add_document",
                                  "change_document"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.md", "# A\n\ntext\n")
    zipped = SimpleUploadedFile("bundle.zip", buffer.getvalue())
    refused = api.post(f"/api/v1/documents/{guide.pk}/replace/", {"file": zipped},
                       format="multipart")
    assert refused.status_code == 400 and "one file" in refused.json()["error"]["message"]
    empty = api.post(f"/api/v1/documents/{guide.pk}/replace/", {}, format="multipart")
    assert empty.status_code == 400 and "file" in empty.json()["error"]["fields"]


def test_a_document_is_retitled_and_moved_with_its_chunks(django_user_model, guide):
    archive = collection_get_or_create(slug="archive")
    api, _ = client_for(user_with(django_user_model, "editor", "change_document"))
    path = f"/api/v1/documents/{guide.pk}/"
    etag = api.get(path)["ETag"]
    moved = api.patch(path, {"title": "Tides", "collection": "archive"}, format="json",
                      HTTP_IF_MATCH=etag)
    assert moved.status_code == 200, moved.content
    assert moved.json()["title"] == "Tides" and moved.json()["collection"] == "archive"
    hits = api.post("/api/v1/search", {"query": "tide tables", "mode": "bm25",
                                       "collections": ["archive"]}, format="json").json()
    assert [hit["document_title"] for hit in hits["results"]] == ["Tides"]
    assert Posting.objects.filter(collection_id=archive.pk).exists()
    assert not Posting.objects.filter(collection_id=guide.collection_id).exists()
    stale = api.patch(path, {"title": "Again"}, format="json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412


def test_a_move_needs_a_readable_target_and_the_change_permission(django_user_model, guide):
    hidden = collection_get_or_create(slug="hidden")
    hidden.is_public = False
    hidden.save()
    api, _ = client_for(user_with(django_user_model, "editor", "change_document"))
    refused = api.patch(f"/api/v1/documents/{guide.pk}/", {"collection": "hidden"},
                        format="json")
    assert refused.status_code == 400 and "collection" in refused.json()["error"]["fields"]
    reader, _ = client_for(user_with(django_user_model, "reader"))
    assert reader.patch(f"/api/v1/documents/{guide.pk}/", {"title": "X"},
                        format="json").status_code == 403
    assert Document.objects.get(pk=guide.pk).collection.slug == "docs"
