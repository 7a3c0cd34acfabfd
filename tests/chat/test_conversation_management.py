"""The caller's conversations over the API: rename, delete with their messages, export as
Markdown or JSON; nobody else's."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat.models import Conversation, Message
from tests.chat.conftest import ask, of_type

pytestmark = pytest.mark.django_db

QUESTION = "How often is the database backed up?"


@pytest.fixture
def client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def conversation_id(corpus, generative, user) -> str:
    from chat.events import Started

    return of_type(ask(QUESTION, user=user), Started)[0].conversation_id


def test_rename(client, conversation_id):
    active = Conversation.objects.get(pk=conversation_id).updated_at
    response = client.patch(f"/api/v1/conversations/{conversation_id}",
                            data=json.dumps({"title": "  Backups  "}),
                            content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["title"] == "Backups"
    renamed = Conversation.objects.get(pk=conversation_id)
    # A rename is not activity: the conversation keeps its place in the history.
    assert (renamed.title, renamed.updated_at) == ("Backups", active)


@pytest.mark.parametrize("body", [{}, {"title": ""}, {"title": "x" * 201}, {"title": None}])
def test_a_bad_title_is_a_400(client, conversation_id, body):
    response = client.patch(f"/api/v1/conversations/{conversation_id}", data=json.dumps(body),
                            content_type="application/json")
    assert response.status_code == 400
    assert "title" in response.json()["error"]["fields"]


def test_delete_takes_the_messages_with_it(client, conversation_id):
    assert Message.objects.filter(conversation_id=conversation_id).count() == 2
    assert client.delete(f"/api/v1/conversations/{conversation_id}").status_code == 204
    assert not Conversation.objects.filter(pk=conversation_id).exists()
    assert not Message.objects.filter(conversation_id=conversation_id).exists()
    assert client.get(f"/api/v1/conversations/{conversation_id}").status_code == 404


def test_markdown_export_has_each_turn_and_the_cited_sources(client, conversation_id):
    response = client.get(f"/api/v1/conversations/{conversation_id}/export")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"] == (
        f'attachment; filename="conversation-{conversation_id}.md"')
    text = response.content.decode()
    assert text.startswith(f"# {QUESTION}\n")
    assert "## Question" in text and "## Answer" in text and "Sources:" in text
    assert "(http://testserver/documents/" in text  # the source links are absolute


def test_json_export_is_the_conversation_with_its_messages(client, conversation_id):
    response = client.get(f"/api/v1/conversations/{conversation_id}/export?as=json")
    assert response.status_code == 200
    body = json.loads(response.content)
    assert body["id"] == conversation_id
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    assert client.get(f"/api/v1/conversations/{conversation_id}/export?as=pdf").status_code == 400


def test_someone_elses_conversation_cannot_be_renamed_deleted_or_exported(
    conversation_id, django_user_model
):
    other = Client()
    other.force_login(django_user_model.objects.create_user("other", password="pw-other-123"))
    path = f"/api/v1/conversations/{conversation_id}"
    assert other.patch(path, data=json.dumps({"title": "Mine"}),
                       content_type="application/json").status_code == 404
    assert other.delete(path).status_code == 404
    assert other.get(path + "/export").status_code == 404
    assert Conversation.objects.get(pk=conversation_id).title == QUESTION


def test_a_rename_with_a_stale_if_match_is_a_412(client, conversation_id):
    path = f"/api/v1/conversations/{conversation_id}"
    etag = client.get(path)["ETag"]
    assert client.patch(path, data=json.dumps({"title": "One"}), content_type="application/json",
                        HTTP_IF_MATCH=etag).status_code == 200
    stale = client.patch(path, data=json.dumps({"title": "Two"}),
                         content_type="application/json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412
    assert Conversation.objects.get(pk=conversation_id).title == "One"
