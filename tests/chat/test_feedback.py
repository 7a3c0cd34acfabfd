"""Feedback on answers: one vote per person and answer, kept with the answer's citations and
the retrieval evidence it was given; through the chat API and the /v1 extension field."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat.events import Started
from chat.models import AnswerFeedback, Message
from tests.chat.conftest import ask

pytestmark = pytest.mark.django_db

QUESTION = "How often is the database backed up?"


@pytest.fixture
def session(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def answer_id(corpus, extractive_only, user) -> str:
    (started,) = [e for e in ask(QUESTION, user=user) if isinstance(e, Started)]
    return started.message_id


def put(client: Client, answer_id: str, body: dict):
    return client.put(f"/api/v1/chat/messages/{answer_id}/feedback", data=json.dumps(body),
                      content_type="application/json")


def test_the_answer_keeps_what_retrieval_gave_it(answer_id):
    retrieval = Message.objects.get(pk=answer_id).retrieval
    assert retrieval["query"] == QUESTION and retrieval["mode"] == "hybrid"
    assert retrieval["hits"] and {"chunk_id", "document_id", "score"} <= set(retrieval["hits"][0])
    assert retrieval["answerability"]["answerable"] is True
    assert 0.0 <= retrieval["answerability"]["probability"] <= 1.0


def test_a_vote_is_set_changed_read_and_withdrawn(session, answer_id):
    down = put(session, answer_id, {"rating": "down", "reason": "outdated",
                                    "comment": "Backups moved to 03:00 in May."})
    assert down.status_code == 200 and down.json()["reason"] == "outdated"
    up = put(session, answer_id, {"rating": "up"})
    assert up.status_code == 200
    (vote,) = AnswerFeedback.objects.all()
    assert (vote.rating, vote.reason, vote.comment) == ("up", "", "")
    path = f"/api/v1/chat/messages/{answer_id}/feedback"
    assert session.get(path).json()["rating"] == "up"
    conversation = Message.objects.get(pk=answer_id).conversation_id
    detail = session.get(f"/api/v1/conversations/{conversation}").json()
    assert [m["feedback"] for m in detail["messages"]] == [None, {
        "rating": "up", "reason": "", "comment": ""}]
    assert session.delete(path).status_code == 204
    assert session.get(path).status_code == 404
    assert not AnswerFeedback.objects.exists()


@pytest.mark.parametrize("body, field", [
    ({}, "rating"), ({"rating": "meh"}, "rating"),
    ({"rating": "down", "reason": "boring"}, "reason"),
    ({"rating": "down", "comment": "x" * 4001}, "comment"),
])
def test_a_malformed_vote_is_a_400(session, answer_id, body, field):
    response = put(session, answer_id, body)
    assert response.status_code == 400 and field in response.json()["error"]["fields"]


def test_only_ones_own_answers_can_be_rated(answer_id, django_user_model):
    stranger = Client()
    stranger.force_login(django_user_model.objects.create_user("stranger"))
    assert put(stranger, answer_id, {"rating": "down"}).status_code == 404
    question = Message.objects.get(pk=answer_id).conversation.messages.get(role="user")
    owner = Client()
    owner.force_login(Message.objects.get(pk=answer_id).conversation.user)
    assert put(owner, str(question.pk), {"rating": "down"}).status_code == 404
    assert not AnswerFeedback.objects.exists()
