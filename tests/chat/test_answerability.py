"""The chat says "the documents do not cover it" when retrieval evidence is too weak."""

from __future__ import annotations

from pathlib import Path

import pytest

from chat import prompts, services
from chat.answerability import answerability_assess, answerability_probability
from chat.events import Citations, Delta, Done, Meta
from chat.models import Message
from kb.models import UsageRecord
from kb.selectors import SYSTEM
from search.services import SearchParams, search
from tests.chat.conftest import ask, of_type, text_of

pytestmark = pytest.mark.django_db

DEMO = Path(__file__).resolve().parents[2] / "fixtures" / "demo"
OUT_OF_SCOPE = ["zxqv blorptang", "Capital of Mongolia?"]
IN_SCOPE = ["How are duplicate uploads handled?", "Which endpoint lists the collections as models?"]


@pytest.fixture
def demo(collection, ingest_one):
    """The demo documents, ingested for real into the docs collection."""
    for path in sorted(DEMO.glob("*.md")):
        assert ingest_one(collection, path.name, path.read_bytes()).status == "ready"
    return collection


def decide(question: str):
    result = search(params=SearchParams(query=question, k=8, collections=("docs",)), user=SYSTEM,
                    record_usage=False)
    return answerability_assess(result=result)


@pytest.mark.parametrize("question", OUT_OF_SCOPE)
def test_out_of_scope_questions_are_not_covered(demo, question):
    """Nonsense and general knowledge over the demo documents: vector search finds
    neighbours, but the evidence says they do not answer."""
    decision = decide(question)
    assert not decision.answerable, decision.describe()


@pytest.mark.parametrize("question", IN_SCOPE)
def test_questions_the_documents_answer_are_covered(demo, question):
    decision = decide(question)
    assert decision.answerable, decision.describe()


@pytest.mark.parametrize("question", OUT_OF_SCOPE)
def test_extractive_answer_says_not_covered_and_lists_related_sources(demo, extractive_only, user,
                                                                      question):
    """The answer says plainly the documents do not cover it; the closest passages come as
    related, never as citations; meta and done say answerable: false."""
    events = ask(question, user=user)

    assert "do not cover" in text_of(events)
    meta, citations, done = (of_type(events, Meta)[0], of_type(events, Citations)[0],
                             of_type(events, Done)[0])
    assert meta.answerable is False and done.answerable is False
    assert citations.citations == [] and 1 <= len(citations.related) <= services.RELATED_COUNT
    documents = [c["document_id"] for c in citations.related]
    assert len(documents) == len(set(documents)), "each related document is listed once"
    assert [c["n"] for c in citations.related] == list(range(1, len(documents) + 1))
    assert "[1]" not in text_of(events) and done.cited == []
    stored = Message.objects.get(pk=done.message_id)
    assert stored.answerable is False and stored.cited == []


def test_a_language_model_is_not_asked_when_not_covered(demo, generative, user):
    """The LLM path gets the same decision: no upstream call is made (or paid for), and the
    message records that no model answered."""
    events = ask("Capital of Mongolia?", user=user)

    assert generative.requests_to("/v1/chat/completions") == []
    assert not UsageRecord.objects.filter(kind=UsageRecord.Kind.CHAT).exists()
    assert "do not cover" in text_of(events)
    stored = Message.objects.get(pk=of_type(events, Done)[0].message_id)
    assert stored.answerable is False and stored.provider == "" and stored.model == ""


def test_a_covered_question_reaches_the_language_model(demo, generative, user):
    events = ask(IN_SCOPE[0], user=user)

    # Asked (on a loaded machine the fake may time out; the attempt is what counts here).
    assert UsageRecord.objects.filter(kind=UsageRecord.Kind.CHAT, provider="openai").exists()
    assert of_type(events, Meta)[0].answerable is True
    assert Message.objects.get(pk=of_type(events, Done)[0].message_id).answerable is True
    assert of_type(events, Delta)


def test_api_and_stored_message_expose_answerable_and_related(demo, extractive_only, user, client):
    """API clients see answerable: false, and the related passages apart from citations,
    in the JSON answer and when the message is read back."""
    client.force_login(user)
    answer = client.post("/api/v1/chat",
                         {"message": "zxqv blorptang", "collection": "docs", "stream": False},
                         content_type="application/json").json()
    assert answer["answerable"] is False and answer["citations"] == [] and answer["related"]
    assert "do not cover" in answer["answer"]

    stored = client.get(f"/api/v1/chat/messages/{answer['message_id']}").json()
    assert stored["answerable"] is False and stored["citations"] == [] and stored["related"]


def test_sse_meta_and_done_events_say_answerable_false():
    from chat.sse import sse_event

    meta = sse_event(Meta(conversation_id="c", message_id="m", mode="extracted", notice=None,
                          answerable=False))
    done = sse_event(Done(message_id="m", status="complete", usage={}, cited=[],
                          invalid_citations=[], answerable=False))
    assert meta.startswith("event: meta\n") and '"answerable": false' in meta
    assert done.startswith("event: done\n") and '"answerable": false' in done


def test_probability_without_a_vector_leg_uses_coverage_alone():
    assert answerability_probability(coverage=0.9, top_similarity=None, agreement=0.0) == 1.0
    assert answerability_probability(coverage=0.1, top_similarity=None, agreement=0.0) == 0.0


def test_related_passages_name_each_document_once():
    """Several close passages of one document give one related chip, its best passage; the
    next document's passage takes the freed place."""
    def passage(chunk_id: int, document_id: int, title: str) -> prompts.Passage:
        return prompts.Passage(chunk_id=chunk_id, document_id=document_id, document_title=title,
                               text=f"passage {chunk_id}")

    ranked = [passage(1, 10, "Composting at Home"), passage(2, 10, "Composting at Home"),
              passage(3, 11, "Street trees"), passage(4, 10, "Composting at Home"),
              passage(5, 12, "Bike lanes"), passage(6, 13, "Parks")]
    assert [p.chunk_id for p in services._one_per_document(ranked)] == [1, 3, 5, 6]


@pytest.mark.parametrize("follow_up", OUT_OF_SCOPE)
def test_an_off_topic_follow_up_is_not_covered(demo, extractive_only, user, follow_up):
    """After a question the documents answer, nonsense or general knowledge in the same
    conversation is still "not covered": searched with the question before it, it finds
    that topic again, but none of its own words are in those passages."""
    from chat.events import Started

    first = ask(IN_SCOPE[0], user=user)
    assert of_type(first, Done)[0].answerable is True
    conversation_id = of_type(first, Started)[0].conversation_id

    events = ask(follow_up, user=user, conversation_id=conversation_id)

    assert "do not cover" in text_of(events)
    assert of_type(events, Done)[0].answerable is False


def test_a_short_follow_up_keeps_the_topic_before_it(demo, extractive_only, user):
    """A follow-up with fewer than two words of its own is decided on the combined search."""
    from chat.events import Started

    first = ask(IN_SCOPE[0], user=user)
    conversation_id = of_type(first, Started)[0].conversation_id

    events = ask("And for PDFs?", user=user, conversation_id=conversation_id)

    assert of_type(events, Done)[0].answerable is True, text_of(events)
