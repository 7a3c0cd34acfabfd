"""An editor restricts a collection and chooses its readers on the collection's admin page."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import reverse

from kb.models import Collection

pytestmark = pytest.mark.django_db


@pytest.fixture
def editor(client, django_user_model):
    """A staff editor (not a superuser) who may add and change collections."""
    user = django_user_model.objects.create_user("editor", password="pw-editor-123", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        content_type__app_label="kb", codename__in=["add_collection", "change_collection",
                                                    "view_collection"]))
    client.force_login(user)
    return client


@pytest.fixture
def people(django_user_model):
    team = Group.objects.create(name="team")
    member = django_user_model.objects.create_user("member", password="pw-member-123")
    member.groups.add(team)
    return {
        "reader": django_user_model.objects.create_user("reader", password="pw-reader-123"),
        "member": member,
        "outsider": django_user_model.objects.create_user("outsider", password="pw-out-1234"),
        "team": team,
    }


def search_titles(user, slug: str) -> list[str]:
    client = Client()
    client.force_login(user)
    response = client.get("/api/v1/search", {"query": "cafeteria opening hours", "collection": slug,
                                             "mode": "bm25"})
    assert response.status_code == 200, response.content
    return [hit["document_title"] for hit in response.json()["results"]]


def test_collection_page_offers_users_and_groups(editor, people):
    """The add page has the access fields, as filter_horizontal widgets listing the choices."""
    page = editor.get(reverse("admin:kb_collection_add")).content.decode()
    for field in ("is_public", "allowed_users", "allowed_groups"):
        assert f'name="{field}"' in page
    assert "selectfilter" in page and ">reader<" in page and ">team<" in page


def test_editor_makes_a_restricted_collection_and_grants_readers(editor, people, ingest):
    """A collection saved unticked-public with a user and a group is readable by exactly them."""
    response = editor.post(reverse("admin:kb_collection_add"), {
        "name": "Private", "slug": "private", "description": "", "text_search_config": "english",
        "allowed_users": [people["reader"].pk], "allowed_groups": [people["team"].pk],
    })
    assert response.status_code == 302, response.context["adminform"].form.errors
    collection = Collection.objects.get(slug="private")
    assert not collection.is_public
    assert list(collection.allowed_users.all()) == [people["reader"]]
    assert list(collection.allowed_groups.all()) == [people["team"]]

    ingest(collection, "canteen.md", "# Canteen\n\nThe cafeteria opens at 8 and closes at 3.\n")
    assert search_titles(people["reader"], "private")
    assert search_titles(people["member"], "private")
    assert search_titles(people["outsider"], "private") == []


def test_editor_restricts_an_existing_public_collection(editor, people, ingest):
    """Unticking "Public" on the change page takes the collection away from everyone else."""
    collection = Collection.objects.create(slug="general", name="General")
    ingest(collection, "canteen.md", "# Canteen\n\nThe cafeteria opens at 8 and closes at 3.\n")
    assert search_titles(people["outsider"], "general")

    response = editor.post(reverse("admin:kb_collection_change", args=[collection.pk]), {
        "name": "General", "slug": "general", "description": "", "text_search_config": "english",
        "allowed_users": [people["reader"].pk],
    })
    assert response.status_code == 302 and response["Location"].endswith("/kb/collection/")
    assert search_titles(people["outsider"], "general") == []
    assert search_titles(people["reader"], "general")
