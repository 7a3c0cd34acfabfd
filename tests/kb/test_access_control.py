"""Who can read what: a user × collection × path matrix, enforced inside the SQL."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from kb.models import ApiKey, Chunk
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create
from search.services import SearchParams, search

pytestmark = pytest.mark.django_db

SECRET = "# Merger plans\n\nProject Nightjar: the acquisition of Harbour Tides closes in May.\n"
PUBLIC = "# Tide tables\n\nThe harbour publishes tide tables every Monday for the coming week.\n"


@pytest.fixture
def world(django_user_model, ingest_one):
    public = collection_get_or_create(slug="public")
    private = collection_get_or_create(slug="board")
    private.is_public = False
    private.save()
    board = Group.objects.create(name="board")
    users = {
        "outsider": django_user_model.objects.create_user("outsider", password="pw-outsider-1"),
        "member": django_user_model.objects.create_user("member", password="pw-member-11"),
        "listed": django_user_model.objects.create_user("listed", password="pw-listed-11"),
        "admin": django_user_model.objects.create_superuser("root", password="pw-root-1111"),
    }
    users["member"].groups.add(board)
    private.allowed_groups.add(board)
    private.allowed_users.add(users["listed"])
    secret = ingest_one(private, "merger.md", SECRET)
    ingest_one(public, "tides.md", PUBLIC)
    return {"users": users, "secret": secret, "private": private, "public": public}


CAN_SEE_SECRET = {"outsider": False, "member": True, "listed": True, "admin": True}


def _key_for(user, collections=()):
    raw, prefix = api_key_generate()
    key = ApiKey.objects.create(name=f"{user}", prefix=prefix, hashed_key=api_key_hash(raw),
                                user=user)
    key.collections.set(collections)
    return raw, key


@pytest.mark.parametrize("who", list(CAN_SEE_SECRET))
@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
def test_search_service(world, who, mode):
    """Search never returns a chunk of a collection the caller may not read."""
    result = search(params=SearchParams(query="Nightjar acquisition merger", mode=mode, k=20),
                    user=world["users"][who], record_usage=False)
    found = {hit.document_id for hit in result.hits}
    assert (world["secret"].pk in found) is CAN_SEE_SECRET[who]


@pytest.mark.parametrize("who", list(CAN_SEE_SECRET))
def test_api_paths(world, who):
    """Search API, documents, chunks and the source page all apply the same rule."""
    raw, _ = _key_for(world["users"][who])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    secret = world["secret"]
    chunk = Chunk.objects.filter(document=secret).first()
    visible = CAN_SEE_SECRET[who]

    hits = api.get("/api/v1/search", {"query": "Nightjar merger", "k": 20}).json()["results"]
    assert any(h["document_id"] == secret.pk for h in hits) is visible
    assert (api.get(f"/api/v1/documents/{secret.pk}/").status_code == 200) is visible
    assert (api.get(f"/api/v1/chunks/{chunk.pk}/").status_code == 200) is visible
    listed = {d["id"] for d in api.get("/api/v1/documents/").json()["results"]}
    assert (secret.pk in listed) is visible
    slugs = {c["slug"] for c in api.get("/api/v1/collections/").json()["results"]}
    assert ("board" in slugs) is visible


@pytest.mark.parametrize("who", list(CAN_SEE_SECRET))
def test_source_page(world, who, client):
    client.force_login(world["users"][who])
    response = client.get(f"/documents/{world['secret'].pk}/")
    assert (response.status_code == 200) is CAN_SEE_SECRET[who]
    if not CAN_SEE_SECRET[who]:
        assert response.status_code == 404 and b"Nightjar" not in response.content


def test_a_scoped_key_reads_only_its_collections(world):
    """A key narrowed to the public collection cannot read the board's, though its user can."""
    raw, _ = _key_for(world["users"]["admin"], collections=[world["public"]])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    hits = api.get("/api/v1/search", {"query": "Nightjar merger tide", "k": 20}).json()["results"]
    assert hits and all(h["document_id"] != world["secret"].pk for h in hits)
    assert api.get(f"/api/v1/documents/{world['secret'].pk}/").status_code == 404


def test_anonymous_callers_read_nothing(world, client):
    assert APIClient().get("/api/v1/search", {"query": "tide"}).status_code in {401, 403}
    assert client.get(f"/documents/{world['secret'].pk}/").status_code == 302  # to login


def test_non_superuser_editors_see_only_their_collections_in_admin(world, client):
    editor = world["users"]["outsider"]
    editor.is_staff = True
    editor.save()
    from django.contrib.auth.models import Permission

    editor.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_document", "change_document"]))
    client.force_login(editor)
    page = client.get("/admin/kb/document/").content.decode()
    assert "Tide tables" in page and "Merger plans" not in page
    assert client.get(f"/admin/kb/document/{world['secret'].pk}/change/").status_code in {302, 404}
