"""The landing page lists only the collections the visitor may read, with their counts."""

from __future__ import annotations

import pytest

from kb.services.collections import collection_get_or_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def collections(django_user_model):
    collection_get_or_create(slug="general", name="General handbook")
    private = collection_get_or_create(slug="a-private", name="Board minutes")
    private.is_public = False
    private.save()
    member = django_user_model.objects.create_user("member", password="pw-member-111")
    private.allowed_users.add(member)
    return member


def test_anonymous_visitors_see_no_collection_names(collections, client):
    """Anonymous visitors read nothing, so the page names no collection and asks them to sign in."""
    page = client.get("/").content.decode()
    assert "Board minutes" not in page and "a-private" not in page
    assert "General handbook" not in page and "Sign in" in page


def test_signed_in_users_see_what_they_may_read(collections, client, django_user_model):
    outsider = django_user_model.objects.create_user("outsider", password="pw-outsider-1")
    client.force_login(outsider)
    page = client.get("/").content.decode()
    assert "General handbook" in page and "Board minutes" not in page
    client.force_login(collections)
    page = client.get("/").content.decode()
    assert "General handbook" in page and "Board minutes" in page
