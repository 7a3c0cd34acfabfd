"""The chat HTTP API: JSON and SSE answers, refusals, reading messages and conversations."""

from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import cache
from django.test import AsyncClient, Client

from chat.events import Started
from chat.models import Budget, Conversation, Message
from kb.usage.ledger import usage_record_create
from tests.chat.conftest import CITED_REPLY, ask, of_type
from tests.fakes.openai_server import Fault

pytestmark = pytest.mark.django_db

QUESTION = "How often is the database backed up?"


@pytest.fixture
def client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def post_chat(client: Client, body: dict, **extra):
    return client.post("/api/v1/chat", data=json.dumps(body), content_type="application/json",
                       **extra)


def parse_sse(text: str) -> list[tuple[str, object]]:
    """(event name, decoded data) per event; comments come back as ("comment", text)."""
    events: list[tuple[str, object]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(("comment", block))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def stream_chat(user, body: dict, **headers) -> tuple[object, str]:
    """POST through the ASGI handler with an AsyncClient; (response, whole body text)."""

    async def go():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.post("/api/v1/chat", body, content_type="application/json",
                                     headers=headers)
        if not response.streaming:
            return response, response.content.decode()
        parts = [chunk async for chunk in response.streaming_content]
        return response, b"".join(parts).decode()

    return async_to_sync(go)()


def names(events: list[tuple[str, object]]) -> list[str]:
    """Event names in order, with runs of deltas collapsed and comments dropped."""
    result: list[str] = []
    for name, _ in events:
        if name == "comment" or (result and name == result[-1] == "delta"):
            continue
        result.append(name)
    return result


# --- Streaming -------------------------------------------------------------------------------


def test_sse_stream_sends_meta_citations_deltas_done(corpus, generative, user):
    """The protocol the chat page reads, with headers that keep proxies out of the way."""
    response, body = stream_chat(user, {"message": QUESTION, "collection": "docs"},
                                 **{"Accept-Encoding": "gzip"})

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache" and response["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response
    events = parse_sse(body)
    assert names(events) == ["meta", "citations", "delta", "done"]
    meta, citations = events[0][1], events[1][1]
    assert set(meta) == {"conversation_id", "message_id", "mode", "notice", "answerable"}
    assert meta["mode"] == "generated" and meta["answerable"] is True
    assert citations["related"] == []
    assert set(citations["citations"][0]) == {"n", "chunk_id", "document_id", "document_title",
                                              "page", "heading_path", "text", "url"}
    assert "".join(data["text"] for name, data in events if name == "delta") == CITED_REPLY
    done = events[-1][1]
    assert done["status"] == "complete" and done["cited"] == [1] and done["invalid_citations"] == []
    assert done["answerable"] is True
    assert set(done["usage"]) == {"input_tokens", "output_tokens", "cost_usd", "model", "provider",
                                  "cache_hit"}
    assert done["message_id"] == meta["message_id"]


def test_sse_sends_heartbeats_while_the_model_is_silent(settings, corpus, generative, user):
    """A slow first token: ': ping' comments arrive before the answer."""
    settings.KB_CHAT_HEARTBEAT_SECONDS = 0.1
    generative.enqueue(Fault(first_token_delay=0.45))

    _, body = stream_chat(user, {"message": QUESTION, "collection": "docs"})

    assert ": ping\n\n" in body
    assert body.index(": ping") < body.index("event: meta")
    assert names(parse_sse(body)) == ["meta", "citations", "delta", "done"]


def test_sse_reports_an_upstream_cut_as_an_error_event(corpus, generative, user):
    generative.enqueue(Fault(cut_after_tokens=2))

    _, body = stream_chat(user, {"message": QUESTION, "collection": "docs"})

    events = parse_sse(body)
    assert names(events) == ["meta", "citations", "delta", "error"]
    assert events[-1][1]["code"] == "upstream_interrupted"


def test_sse_refusals_before_streaming_are_json(corpus, generative, user):
    """A budget refusal is a 429 JSON error with Retry-After, not an event stream."""
    Budget.objects.create(scope=Budget.Scope.USER, user=user, daily_token_limit=10)
    usage_record_create(kind="chat", provider="openai", model="gpt-4o-mini", input_tokens=20,
                        user=user)

    response, body = stream_chat(user, {"message": QUESTION, "collection": "docs"})

    assert response.status_code == 429 and int(response["Retry-After"]) > 0
    assert response["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "budget_exceeded"
    assert generative.requests == []


# --- Non-streaming and refusals --------------------------------------------------------------


def test_non_streaming_answer_is_one_json_object(client, corpus, generative):
    response = post_chat(client, {"message": QUESTION, "collection": "docs", "stream": False})

    assert response.status_code == 200
    data = response.json()
    assert set(data) >= {"conversation_id", "message_id", "answer", "mode", "notice", "citations",
                         "cited", "usage"}
    assert data["answer"] == CITED_REPLY and data["mode"] == "generated"
    assert data["cited"] == [1] and data["citations"][0]["n"] == 1
    assert Message.objects.get(pk=data["message_id"]).status == Message.Status.COMPLETE


def test_conversation_continues_with_its_id(client, corpus, generative):
    first = post_chat(client, {"message": QUESTION, "collection": "docs", "stream": False}).json()
    second = post_chat(client, {"message": "And restores?", "collection": "docs", "stream": False,
                                "conversation_id": first["conversation_id"]}).json()

    assert second["conversation_id"] == first["conversation_id"]
    assert Message.objects.filter(conversation_id=first["conversation_id"]).count() == 4


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "x" * 4001}, "message"),
        ({"message": "Hi", "conversation_id": "not-a-uuid"}, "conversation_id"),
        ({"message": "Hi", "collection": "no such slug!"}, "collection"),
        ({"message": "Hi", "stream": "maybe"}, "stream"),
    ],
)
def test_invalid_fields_are_400_with_field_messages(client, body, field):
    response = post_chat(client, body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid" and field in error["fields"]


def test_unknown_collection_is_a_400_field_error(client, corpus):
    response = post_chat(client, {"message": "Hi", "collection": "missing", "stream": False})

    assert response.status_code == 400
    assert "missing" in response.json()["error"]["fields"]["collection"][0]


def test_someone_elses_conversation_is_404(client, corpus, generative, django_user_model):
    other = django_user_model.objects.create_user("other", password="pw-other-123")
    events = ask(QUESTION, user=other)
    conversation_id = events[0].conversation_id

    response = post_chat(client, {"message": "Hi", "conversation_id": conversation_id})

    assert response.status_code == 404


def test_body_must_be_a_json_object(client):
    response = client.post("/api/v1/chat", data="[1, 2]", content_type="application/json")
    assert response.status_code == 400
    response = client.post("/api/v1/chat", data="{oops", content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "parse_error"


def test_anonymous_callers_are_401():
    response = post_chat(Client(), {"message": QUESTION})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_session_posts_need_a_csrf_token(corpus, generative, user):
    """The page's fetch sends X-CSRFToken; a forged cross-site post has none."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    body = {"message": QUESTION, "collection": "docs", "stream": False}

    refused = post_chat(client, body)
    client.get("/chat/")  # sets the csrftoken cookie, as the page does
    accepted = post_chat(client, body, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)

    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]["message"]
    assert accepted.status_code == 200


def test_api_keys_need_no_csrf_token(corpus, generative, api_key_pair):
    raw, key = api_key_pair
    client = Client(enforce_csrf_checks=True)

    response = post_chat(client, {"message": QUESTION, "collection": "docs", "stream": False},
                         HTTP_AUTHORIZATION=f"Bearer {raw}")

    assert response.status_code == 200
    conversation = Conversation.objects.get(pk=response.json()["conversation_id"])
    assert conversation.api_key == key and conversation.user == key.user


def test_a_bad_api_key_is_401(corpus):
    response = post_chat(Client(), {"message": QUESTION}, HTTP_AUTHORIZATION="Bearer kb_nope")
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Bearer"


def test_rate_limit_is_429_with_retry_after(settings, client, corpus, generative):
    settings.RATELIMIT_ENABLE = True
    settings.KB_RATELIMITS = {**settings.KB_RATELIMITS, "chat": "1/m"}
    cache.clear()
    body = {"message": QUESTION, "collection": "docs", "stream": False}

    first = post_chat(client, body)
    second = post_chat(client, body)

    assert first.status_code == 200
    assert second.status_code == 429 and int(second["Retry-After"]) > 0
    assert second.json()["error"]["code"] == "throttled"


def test_budget_exceeded_is_429_with_a_clear_message(client, corpus, generative, user):
    Budget.objects.create(scope=Budget.Scope.GLOBAL, daily_cost_limit_usd="0.0001")
    usage_record_create(kind="chat", provider="openai", model="gpt-4o", input_tokens=1000)

    response = post_chat(client, {"message": QUESTION, "stream": False})

    assert response.status_code == 429 and int(response["Retry-After"]) > 0
    assert "daily budget" in response.json()["error"]["message"]


# --- Reading back ----------------------------------------------------------------------------


def test_message_endpoint_returns_a_stored_answer(client, corpus, generative, user,
                                                  django_user_model):
    """The page reloads an answer after a lost connection; other users cannot see it."""
    data = post_chat(client, {"message": QUESTION, "collection": "docs", "stream": False}).json()

    response = client.get(f"/api/v1/chat/messages/{data['message_id']}")

    assert response.status_code == 200
    message = response.json()
    assert message["id"] == data["message_id"] and message["role"] == "assistant"
    assert message["conversation_id"] == data["conversation_id"]
    assert message["status"] == "complete" and message["content"] == CITED_REPLY
    assert message["citations"] == data["citations"]
    stranger = Client()
    stranger.force_login(django_user_model.objects.create_user("x", password="pw-x-12345"))
    assert stranger.get(f"/api/v1/chat/messages/{data['message_id']}").status_code == 404
    assert client.get(f"/api/v1/chat/messages/{uuid.uuid4()}").status_code == 404


def test_conversations_list_only_the_callers_own_paginated(client, corpus, generative, user,
                                                            django_user_model):
    other = django_user_model.objects.create_user("other", password="pw-other-123")
    ask(QUESTION, user=other)
    mine = [ask(q, user=user) for q in (QUESTION, "When do vacation days expire?")]

    listed = client.get("/api/v1/conversations", {"limit": 1}).json()

    assert listed["previous"] is None and listed["next"]
    (first,) = listed["results"]
    assert set(first) == {"id", "title", "updated_at", "shared", "owner"}
    assert first["id"] == of_type(mine[1], Started)[0].conversation_id
    assert first["title"] == "When do vacation days expire?"
    following = client.get(listed["next"]).json()
    assert [row["id"] for row in following["results"]] == [
        of_type(mine[0], Started)[0].conversation_id]
    assert following["next"] is None


def test_conversation_detail_has_its_messages_in_order(client, corpus, generative, user):
    conversation_id = ask(QUESTION, user=user)[0].conversation_id

    detail = client.get(f"/api/v1/conversations/{conversation_id}").json()

    assert detail["id"] == conversation_id and detail["title"] == QUESTION
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
    assert set(detail["messages"][1]) >= {"id", "role", "content", "status", "citations"}
    assert detail["messages"][1]["citations"][0]["n"] == 1
    assert client.get(f"/api/v1/conversations/{uuid.uuid4()}").status_code == 404


def test_read_endpoints_need_authentication():
    anonymous = Client()
    assert anonymous.get("/api/v1/conversations").status_code in {401, 403}
    assert anonymous.get(f"/api/v1/chat/messages/{uuid.uuid4()}").status_code in {401, 403}


# --- The page --------------------------------------------------------------------------------


def test_chat_page_redirects_anonymous_users_to_login():
    response = Client().get("/chat/")

    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/chat/"


def test_chat_page_offers_visible_collections(client, corpus):
    from kb.services.collections import collection_get_or_create

    collection_get_or_create(slug="empty", name="An empty one")

    response = client.get("/chat/")

    assert response.status_code == 200
    slugs = [c.slug for c in response.context["collections"]]
    assert slugs == sorted(slugs, key=lambda s: {"empty": "An empty one"}.get(s, s.title()))
    assert {"empty", "docs"} <= set(slugs)
    assert response.context["default_collection"] == "docs"  # the one with ready documents
    assert 'data-chat-url="/api/v1/chat"' in response.content.decode()
