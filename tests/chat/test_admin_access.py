"""The chat admin and the usage dashboard show an editor only what the document admin does."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from chat import selectors
from chat.models import AnswerCacheEntry, Conversation, Message

pytestmark = pytest.mark.django_db

SECRET = "# Nightjar merger\n\nProject Nightjar buys Harbour Tides for 40 million in May.\n"
PUBLIC = "# Cafeteria hours\n\nThe cafeteria opens at 11:30 and serves soup every day.\n"
MARKERS = ("Nightjar", "40 million", "merger.md")


@pytest.fixture
def world(django_user_model, private_and_public, generative):
    generative.chat_reply = "Here is the answer [1]."
    _, _, _, ask = private_and_public(username="user-a", slug="a-private",
                                      private_doc=("merger.md", SECRET),
                                      public_doc=("cafeteria.md", PUBLIC))
    secret_answers = [ask("How much does Project Nightjar pay for Harbour Tides?", "a-private"),
                      ask("When does the Nightjar merger close?")]
    public_answer = ask("When does the cafeteria open?", "general")
    assert any("40 million" in json.dumps(a) for a in secret_answers)
    editor = django_user_model.objects.create_user("editor", password="pw-editor-11", is_staff=True)
    editor.user_permissions.add(*Permission.objects.filter(codename__in=[
        "view_conversation", "view_message", "view_answercacheentry", "view_usagerecord",
        "view_document",
    ]))
    client = Client()
    client.force_login(editor)
    return {"editor": editor, "client": client, "secret": secret_answers, "public": public_answer}


def _leaks(html: str) -> list[str]:
    return [marker for marker in MARKERS if marker in html]


def test_chat_changelists_hide_answers_from_unreadable_collections(world):
    client = world["client"]
    for url in ("/admin/chat/conversation/", "/admin/chat/message/",
                "/admin/chat/answercacheentry/", "/admin/kb/usagerecord/"):
        response = client.get(url)
        assert response.status_code == 200 and _leaks(response.content.decode()) == [], url
    assert "cafeteria" in client.get("/admin/chat/message/").content.decode()


def test_chat_change_views_of_unreadable_rows_redirect(world):
    """/admin/chat/message/<id>/change/ and the others answer as if the row did not exist."""
    client = world["client"]
    for payload in world["secret"]:
        conversation = Conversation.objects.get(pk=payload["conversation_id"])
        message = Message.objects.get(pk=payload["message_id"])
        for url in (f"/admin/chat/conversation/{conversation.pk}/change/",
                    f"/admin/chat/message/{message.pk}/change/"):
            response = client.get(url)
            assert response.status_code == 302 and _leaks(response.content.decode()) == [], url
    entries = AnswerCacheEntry.objects.exclude(
        pk__in=selectors.answer_cache_entries_for_admin(user=world["editor"]).values("pk"))
    assert entries.exists()
    for entry in entries:
        assert client.get(f"/admin/chat/answercacheentry/{entry.pk}/change/").status_code == 302
    public = Message.objects.get(pk=world["public"]["message_id"])
    assert client.get(f"/admin/chat/message/{public.pk}/change/").status_code == 200


def test_usage_dashboard_lists_only_readable_documents(world, admin_client):
    """The most-cited documents name nothing from a collection the editor cannot read."""
    page = world["client"].get("/admin/usage/")
    assert page.status_code == 200 and _leaks(page.content.decode()) == []
    assert "merger" in admin_client.get("/admin/usage/").content.decode()
