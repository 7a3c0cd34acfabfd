"""API keys in the admin: staff manage only their own keys, and no key reads more than its
granter."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from kb.api import key_access
from kb.models import ApiKey
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create

pytestmark = pytest.mark.django_db

ADD_URL = "/admin/kb/apikey/add/"


@pytest.fixture
def world(django_user_model):
    general = collection_get_or_create(slug="general")
    private = collection_get_or_create(slug="a-private")
    private.is_public = False
    private.save()
    root = django_user_model.objects.create_superuser("root", password="pw-root-1111")
    user_a = django_user_model.objects.create_user("user-a", password="pw-user-a-11")
    private.allowed_users.add(user_a)
    editor = django_user_model.objects.create_user("editor", password="pw-editor-11", is_staff=True)
    return {"root": root, "user_a": user_a, "editor": editor, "general": general,
            "private": private}


def _grant(user, *codenames):
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="kb",
                                                         codename__in=codenames))


def _key(user, name="k"):
    raw, prefix = api_key_generate()
    return ApiKey.objects.create(name=name, prefix=prefix, hashed_key=api_key_hash(raw), user=user)


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_add_only_editor_cannot_create_a_key_for_the_superuser(world):
    """The escalation of finding 1: picking user=root is refused and no key is made."""
    _grant(world["editor"], "add_apikey")
    response = _client(world["editor"]).post(ADD_URL, {"name": "mine", "user": world["root"].pk,
                                                       "rate_limit": ""})
    assert response.status_code == 200  # the form again, with its error
    assert not ApiKey.objects.filter(user=world["root"]).exists()
    assert "kb_" not in response.content.decode()


def test_an_editor_creates_an_unnarrowed_key_for_themselves(world):
    _grant(world["editor"], "add_apikey")
    response = _client(world["editor"]).post(ADD_URL, {"name": "mine", "user": world["editor"].pk,
                                                       "rate_limit": ""})
    assert response.status_code == 302
    assert ApiKey.objects.filter(user=world["editor"], name="mine").exists()


def test_editors_see_and_revoke_only_their_own_keys(world):
    """Another user's key is absent from the list, its page, and the revoke action."""
    _grant(world["editor"], "add_apikey", "view_apikey", "change_apikey")
    theirs, mine = _key(world["root"], "root-key"), _key(world["editor"], "editor-key")
    client = _client(world["editor"])
    page = client.get("/admin/kb/apikey/").content.decode()
    assert "editor-key" in page and "root-key" not in page
    assert client.get(f"/admin/kb/apikey/{theirs.pk}/change/").status_code == 302
    client.post("/admin/kb/apikey/", {"action": "revoke", "_selected_action": [theirs.pk, mine.pk]})
    theirs.refresh_from_db()
    mine.refresh_from_db()
    assert theirs.revoked_at is None and mine.revoked_at is not None


def test_a_manager_of_all_keys_grants_no_more_than_they_may_read(world):
    """With "manage all", keys for others must be narrowed to collections both may read."""
    _grant(world["editor"], "add_apikey", "view_apikey", "manage_all_api_keys")
    client = _client(world["editor"])
    base = {"name": "for-a", "user": world["user_a"].pk, "rate_limit": ""}
    client.post(ADD_URL, base)  # unnarrowed: would read a-private, which the editor cannot
    client.post(ADD_URL, {**base, "collections": [world["private"].pk]})
    assert not ApiKey.objects.filter(user=world["user_a"]).exists()
    assert client.post(ADD_URL, {**base, "collections": [world["general"].pk]}).status_code == 302
    key = ApiKey.objects.get(user=world["user_a"])
    assert list(key.collections.all()) == [world["general"]]
    assert set(key_access.api_keys_manageable(user=world["editor"])) == set(ApiKey.objects.all())


def test_grant_check_refuses_collections_the_keys_user_cannot_read(world):
    """The service refuses a-private for a key of a user who cannot read it, even for root."""
    with pytest.raises(key_access.ApiKeyGrantError) as error:
        key_access.api_key_grant_check(granter=world["root"], owner=world["editor"],
                                           collections=[world["private"]])
    assert error.value.field == "collections"
    key_access.api_key_grant_check(granter=world["root"], owner=world["user_a"],
                                       collections=[world["private"]])


def test_the_user_of_an_existing_key_cannot_be_changed(world, admin_client):
    key = _key(world["editor"])
    admin_client.post(f"/admin/kb/apikey/{key.pk}/change/",
                      {"name": "renamed", "user": world["root"].pk, "rate_limit": ""})
    key.refresh_from_db()
    assert key.user == world["editor"] and key.name == "renamed"
