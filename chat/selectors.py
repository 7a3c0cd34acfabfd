"""Reads for chat: a caller's conversations and messages, collections offered on the page."""

from __future__ import annotations

import uuid

from django.db.models import Exists, OuterRef, QuerySet

from chat.models import Conversation, Message
from kb.models import Collection, Document
from kb.providers.base import ChatMessage
from search.selectors import collections_visible_to


def conversation_list(*, user) -> QuerySet[Conversation]:
    """The user's conversations, most recently active first."""
    if not getattr(user, "is_authenticated", False):
        return Conversation.objects.none()
    return Conversation.objects.filter(user=user).order_by("-updated_at")


def conversation_get(*, user, pk: uuid.UUID) -> Conversation | None:
    """One of the user's conversations, with its collection, or None."""
    return conversation_list(user=user).select_related("collection").filter(pk=pk).first()


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    """A conversation's messages in the order they were written."""
    return Message.objects.filter(conversation=conversation).order_by("created_at")


def message_get(*, user, pk: uuid.UUID) -> Message | None:
    """A message of one of the user's conversations, or None."""
    if not getattr(user, "is_authenticated", False):
        return None
    return Message.objects.filter(pk=pk, conversation__user=user).first()


def conversation_history(*, conversation: Conversation, turns: int) -> list[ChatMessage]:
    """The last `turns` questions and their complete answers, oldest first."""
    if turns <= 0:
        return []
    rows = list(
        Message.objects.filter(conversation=conversation)
        .exclude(role=Message.Role.ASSISTANT, status__in=[Message.Status.ERROR, Message.Status.STREAMING])
        .exclude(content="")
        .order_by("-created_at")
        .values_list("role", "content")[: turns * 2]
    )
    return [ChatMessage(role=role, content=content) for role, content in reversed(rows)]


def collections_for_chat(*, user) -> QuerySet[Collection]:
    """Collections the user may ask about, by name, each flagged `has_ready` if searchable."""
    ready = Document.objects.filter(collection=OuterRef("pk"), status=Document.Status.READY)
    return (
        Collection.objects.filter(collections_visible_to(user=user))
        .annotate(has_ready=Exists(ready))
        .order_by("name")
    )


def conversation_last_collection_slug(*, user) -> str | None:
    """The collection of the user's most recently active conversation, if any."""
    return (
        conversation_list(user=user).exclude(collection=None)
        .values_list("collection__slug", flat=True).first()
    )


def default_collection_slug(*, collections: list[Collection], last_used: str | None = None) -> str:
    """The collection the chat page starts on: the last one used if still offered, else the
    first with ready documents, else demo."""
    if last_used and any(collection.slug == last_used for collection in collections):
        return last_used
    for collection in collections:
        if getattr(collection, "has_ready", False):
            return collection.slug
    slugs = [collection.slug for collection in collections]
    if "demo" in slugs:
        return "demo"
    return slugs[0] if slugs else ""
