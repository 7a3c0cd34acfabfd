"""The chat page: server-rendered shell; chat/static/chat/chat.js talks to chat.api."""

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from chat import selectors
from chat.api import MAX_MESSAGE_CHARS, ConversationSerializer


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


@login_required
def shared_conversation_page(request: HttpRequest, token: str) -> HttpResponse:
    """GET /chat/shared/<token>/: a shared conversation, read-only, for its owner and for
    people who may read every collection it cites (403 for others; 404 if not shared)."""
    conversation = selectors.shared_conversation_get(token=token)
    if conversation is None:
        raise Http404("This conversation is not shared, or no longer.")
    if not selectors.shared_conversation_readable(conversation=conversation,
                                                  viewer=request.user):
        return render(request, "chat/shared_denied.html", status=403)
    data = ConversationSerializer(
        conversation, context={"user": request.user, "api_key": None}
    ).data
    return render(request, "chat/shared.html", {
        "conversation": conversation,
        "conversation_data": data,
        "is_owner": conversation.user_id == request.user.pk,
    })
