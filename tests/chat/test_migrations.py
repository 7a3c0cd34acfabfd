"""Data migrations of the chat app."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


def test_stored_semantic_cache_notices_lose_the_earlier_question():
    """Notices written before the fix quoted another user's question; the migration drops it."""
    migration = importlib.import_module("chat.migrations.0002_message_answerable_semantic_notice")
    conversation = Conversation.objects.create(title="t")
    message = Message.objects.create(
        conversation=conversation, role=Message.Role.ASSISTANT,
        notice="This answer was given before to a very similar question (“What is user-a's "
               "salary?”) over the same documents. Keyword results only.",
    )

    migration.notices_unquote(apps, None)

    message.refresh_from_db()
    assert message.notice == ("This answer was given before to a very similar question over the "
                              "same documents. Keyword results only.")
