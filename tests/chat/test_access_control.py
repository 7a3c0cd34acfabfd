"""No leaks through chat: answers, citations, the OpenAI-compatible API and both caches."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from chat.models import AnswerCacheEntry
from kb.models import ApiKey
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create

pytestmark = pytest.mark.django_db

SECRET = ("# Merger plans\n\nProject Nightjar is the codename of the acquisition of Harbour "
          "Tides. The Nightjar deal closes in May for 40 million.\n")
PUBLIC = ("# Tide tables\n\nThe harbour publishes tide tables every Monday. Project Nightjar "
          "is not described in this document.\n")
QUESTION = "What is Project Nightjar and when does the deal close?"
PARAPHRASE = "When does the Project Nightjar deal close and what is it?"


@pytest.fixture
def world(django_user_model, ingest_one, generative):
    # The fake model always gives this reply; what matters is which passages back it.
    generative.chat_reply = "Project Nightjar is an acquisition [1]."
    public = collection_get_or_create(slug="public")
    board = collection_get_or_create(slug="board")
    board.is_public = False
    board.save()
    group = Group.objects.create(name="board")
    board.allowed_groups.add(group)
    member = django_user_model.objects.create_user("member", password="pw-member-11")
    member.groups.add(group)
    outsider = django_user_model.objects.create_user("outsider", password="pw-outsider-1")
    secret = ingest_one(board, "merger.md", SECRET)
    ingest_one(public, "tides.md", PUBLIC)
    return {"member": member, "outsider": outsider, "secret": secret}


def ask(user, question: str, collection: str | None = None) -> tuple[int, dict]:
    client = Client()
    client.force_login(user)
    body = {"message": question, "stream": False,
            **({"collection": collection} if collection else {})}
    response = client.post("/api/v1/chat", data=json.dumps(body), content_type="application/json")
    return response.status_code, response.json()


def leaked(payload: dict, secret) -> bool:
    """Whether the private document reached the caller: cited, or quoted in a passage."""
    return any(
        c.get("document_id") == secret.pk or "40 million" in c.get("text", "")
        for c in payload.get("citations", [])
    )


def test_member_gets_the_answer_outsider_does_not(world):
    status, member_answer = ask(world["member"], QUESTION)
    assert status == 200 and leaked(member_answer, world["secret"])

    status, outsider_answer = ask(world["outsider"], QUESTION)
    assert status == 200 and not leaked(outsider_answer, world["secret"])


def test_exact_and_semantic_caches_never_serve_a_private_answer(world):
    """The member's cached answer (built from the private document) is not served to the
    outsider, neither for the same question nor for a paraphrase."""
    ask(world["member"], QUESTION)
    assert AnswerCacheEntry.objects.exists()

    _, answer = ask(world["outsider"], QUESTION)
    assert not answer["usage"]["cache_hit"] and not leaked(answer, world["secret"])
    # The paraphrase may hit the outsider's own entry, never the member's.
    _, answer = ask(world["outsider"], PARAPHRASE)
    assert not leaked(answer, world["secret"])


def test_outsider_cannot_name_the_private_collection(world):
    status, body = ask(world["outsider"], QUESTION, collection="board")
    assert status == 400 and "collection" in json.dumps(body)


def test_openai_compatible_endpoint_respects_collection_access(world):
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="o", prefix=prefix, hashed_key=api_key_hash(raw),
                          user=world["outsider"])
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")

    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert "kb-public" in models and "kb-board" not in models
    response = client.post("/v1/chat/completions", data=json.dumps(
        {"model": "kb-board", "messages": [{"role": "user", "content": QUESTION}]}),
        content_type="application/json")
    assert response.status_code == 404
    response = client.post("/v1/chat/completions", data=json.dumps(
        {"model": "kb-public", "messages": [{"role": "user", "content": QUESTION}]}),
        content_type="application/json")
    assert response.status_code == 200
    assert all(c["document_id"] != world["secret"].pk for c in response.json().get("citations", []))
