"""manage.py kb_apikey create, and the admin's "Add API key", both via api_key_create."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.urls import reverse
from rest_framework.test import APIClient

from kb.models import ApiKey
from kb.services.api_keys import api_key_hash
from kb.services.collections import collection_get_or_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


def create(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("kb_apikey", "create", *args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def search_status(raw_key: str, slug: str) -> tuple[int, int]:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    response = client.get("/api/v1/search",
                          {"query": "cafeteria", "collection": slug, "mode": "bm25"})
    return response.status_code, len(response.json().get("results", []))


def test_create_prints_the_key_once_and_it_works(alice, collection, ingest):
    """stdout holds the key alone; only its hash is stored; the key searches as alice."""
    ingest(collection, "canteen.md", "# Canteen\n\nThe cafeteria opens at 8.\n")
    raw_key, note = create("--user", "alice")
    assert re.fullmatch(r"[A-Za-z0-9_\-]+", raw_key) and "not shown again" in note
    key = ApiKey.objects.get(user=alice)
    assert key.hashed_key == api_key_hash(raw_key) and raw_key not in key.hashed_key
    assert list(key.collections.all()) == []
    assert search_status(raw_key, collection.slug) == (200, 1)


def test_collections_narrow_the_key(alice, collection, ingest):
    """--collections SLUG narrows the key: other collections find nothing with it."""
    other = collection_get_or_create(slug="other", name="Other")
    ingest(other, "canteen.md", "# Canteen\n\nThe cafeteria opens at 8.\n")
    raw_key, _ = create("--user", "alice", "--collections", collection.slug,
                        "--rate-limit", "600/m")
    key = ApiKey.objects.get(user=alice)
    assert [c.slug for c in key.collections.all()] == [collection.slug]
    assert key.rate_limit == "600/m"
    assert search_status(raw_key, "other")[1] == 0


@pytest.mark.parametrize("args, message", [
    (["--user", "nobody"], "No user named 'nobody'"),
    (["--user", "alice", "--collections", "nope"], "No collection with the slug: nope"),
    (["--user", "alice", "--collections", "secret"], "alice may not read: secret"),
    (["--user", "alice", "--rate-limit", "lots"], "--rate-limit takes"),
    (["--user", "gone"], "gone is deactivated"),
])
def test_bad_input_is_refused_and_creates_nothing(alice, django_user_model, args, message):
    """Unknown users and slugs, a collection the user may not read, a bad rate: clear errors."""
    django_user_model.objects.create_user("gone", password="pw-gone-1234", is_active=False)
    secret = collection_get_or_create(slug="secret", name="Secret")
    secret.is_public = False
    secret.save()
    with pytest.raises(CommandError, match=re.escape(message)):
        create(*args)
    assert not ApiKey.objects.exists()


def test_admin_add_shows_the_key_once_and_saves_its_collections(admin_client, alice, collection):
    """The admin's add form creates the key through the same service and shows it once."""
    response = admin_client.post(reverse("admin:kb_apikey_add"), {
        "name": "ci", "user": alice.pk, "collections": [collection.pk], "rate_limit": "",
    })
    assert response.status_code == 302
    shown = [str(m) for m in get_messages(response.wsgi_request) if "not shown again" in str(m)]
    raw_key = shown[0].rsplit(" ", 1)[-1]
    key = ApiKey.objects.get(name="ci")
    assert key.user == alice and key.hashed_key == api_key_hash(raw_key)
    assert list(key.collections.all()) == [collection]


def test_admin_refuses_a_rate_limit_that_is_not_a_rate(admin_client, alice):
    """A rate limit with no N/unit at all is a form error, not a server error."""
    response = admin_client.post(reverse("admin:kb_apikey_add"), {
        "name": "ci", "user": alice.pk, "rate_limit": "lots"})
    assert response.status_code == 200 and "Use the form N/s" in response.content.decode()
    assert not ApiKey.objects.exists()
