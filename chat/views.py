"""The chat page: server-rendered shell; chat/static/chat/chat.js talks to chat.api."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from chat import selectors
from chat.api import MAX_MESSAGE_CHARS


@login_required
def chat_page(request: HttpRequest) -> HttpResponse:
    """GET /chat/: the chat UI, with the collections the user may ask about."""
    collections = list(selectors.collections_for_chat(user=request.user))
    return render(request, "chat/chat.html", {
        "collections": collections,
        "default_collection": selectors.default_collection_slug(
            collections=collections,
            last_used=selectors.conversation_last_collection_slug(user=request.user),
        ),
        "max_message_chars": MAX_MESSAGE_CHARS,
    })
