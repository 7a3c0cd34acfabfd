"""A key narrowed to some collections reads only conversations, messages and models inside them."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat.models import Message
from kb.models import ApiKey
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.documents import document_disable

pytestmark = pytest.mark.django_db

PRIVATE = "# Salary bands\n\nThe B4 salary band starts at 71,500 euros for senior engineers.\n"
PUBLIC = "# Cafeteria\n\nThe cafeteria opens at 11:30 and serves soup every day.\n"


@pytest.fixture
def world(private_and_public, extractive_only):
    general, _, user_b, ask = private_and_public(username="user-b", slug="b-private",
                                                 private_doc=("salaries.md", PRIVATE),
                                                 public_doc=("cafeteria.md", PUBLIC))
    scoped = ask("What does the B4 salary band start at?", "b-private")
    anywhere = ask("What does the B4 salary band start at for senior engineers?")
    assert "71,500" in json.dumps(scoped) and "71,500" in json.dumps(anywhere)
    return {"user": user_b, "general": general, "scoped": scoped, "anywhere": anywhere}


def _client_for(user, collections=()) -> Client:
    raw, prefix = api_key_generate()
    key = ApiKey.objects.create(name="k", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    key.collections.set(collections)
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def _answer_id(payload) -> str:
    return str(Message.objects.get(pk=payload["message_id"]).pk)


def test_a_narrowed_key_cannot_read_conversations_outside_its_collections(world):
    """user-b's general-only key gets 404 for the b-private conversation and its messages."""
    narrowed = _client_for(world["user"], [world["general"]])
    for payload in (world["scoped"], world["anywhere"]):
        conversation = narrowed.get(f"/api/v1/conversations/{payload['conversation_id']}")
        assert conversation.status_code == 404
        message = narrowed.get(f"/api/v1/chat/messages/{_answer_id(payload)}")
        assert message.status_code == 404 and b"71,500" not in message.content
    listed = narrowed.get("/api/v1/conversations").json()["results"]
    assert listed == []


def test_an_unnarrowed_key_reads_its_users_conversations(world):
    """The same user's key without collections reads both conversations, citations included."""
    full = _client_for(world["user"])
    for payload in (world["scoped"], world["anywhere"]):
        conversation = full.get(f"/api/v1/conversations/{payload['conversation_id']}")
        assert conversation.status_code == 200 and "71,500" in conversation.content.decode()
    assert len(full.get("/api/v1/conversations").json()["results"]) == 2


def test_models_lists_only_the_keys_collections(world):
    """/v1/models offers kb-general, not kb-b-private, to the general-only key."""
    narrowed = _client_for(world["user"], [world["general"]])
    ids = {m["id"] for m in narrowed.get("/v1/models").json()["data"]}
    assert ids == {"kb-general"}
    full = _client_for(world["user"])
    models = full.get("/v1/models").json()["data"]
    assert {"kb-general", "kb-b-private"} <= {m["id"] for m in models}


def test_citations_of_documents_no_longer_readable_are_dropped(world):
    """A citation of a document the caller can no longer read is not served back."""
    from kb.models import Document

    document_disable(document=Document.objects.get(original_filename="salaries.md"))
    full = _client_for(world["user"])
    body = full.get(f"/api/v1/chat/messages/{_answer_id(world['scoped'])}").json()
    assert body["citations"] == [] and body["cited"] == []


def test_a_keys_own_conversation_hides_once_it_cites_outside_the_key(world):
    """The key's conversation over every collection, continued on the web page with a
    b-private answer, is no longer readable with the general-only key."""
    raw, prefix = api_key_generate()
    key = ApiKey.objects.create(name="k", prefix=prefix, hashed_key=api_key_hash(raw),
                                user=world["user"])
    key.collections.set([world["general"]])
    narrowed = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    asked = narrowed.post("/api/v1/chat",
                          data=json.dumps({"message": "When does the cafeteria open?",
                                           "stream": False}),
                          content_type="application/json").json()
    url = f"/api/v1/conversations/{asked['conversation_id']}"
    assert narrowed.get(url).status_code == 200
    session = Client()
    session.force_login(world["user"])
    follow_up = {"message": "What does the B4 salary band start at?", "stream": False,
                 "conversation_id": asked["conversation_id"], "collection": "b-private"}
    response = session.post("/api/v1/chat", data=json.dumps(follow_up),
                            content_type="application/json")
    assert "71,500" in response.content.decode()
    hidden = narrowed.get(url)
    assert hidden.status_code == 404 and b"71,500" not in hidden.content
