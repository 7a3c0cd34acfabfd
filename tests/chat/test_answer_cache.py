"""The answer cache (chat.answer_cache, chat.signals) through the chat pipeline."""

from __future__ import annotations

import pytest

from chat import services
from chat.events import Citations, Done, Meta
from chat.models import AnswerCacheEntry, Message
from kb.models import Document
from kb.services.documents import document_disable, document_enable
from tests.chat.conftest import HANDBOOK, QUESTION, ask, chat_requests, chat_usage, of_type, text_of

pytestmark = pytest.mark.django_db


def test_exact_cache_hit_replays_the_answer_and_records_the_saving(corpus, generative, user):
    """The same question again: no upstream request, a cache-hit record with the saved cost."""
    first = ask(QUESTION, user=user)
    second = ask("  how often is the DATABASE backed up ", user=user)

    assert len(chat_requests(generative)) == 1
    assert text_of(second) == text_of(first)
    assert of_type(second, Citations)[0] == of_type(first, Citations)[0]
    done = of_type(second, Done)[0]
    assert done.usage["cache_hit"] is True and done.usage["cost_usd"] == 0.0
    assert of_type(second, Meta)[0].notice == services.NOTICE_CACHE_EXACT
    original, hit = chat_usage()
    assert hit.cache_hit and hit.cost_usd == 0
    assert hit.saved_cost_usd == original.cost_usd > 0
    assert AnswerCacheEntry.objects.get().hits == 1
    assert Message.objects.get(pk=done.message_id).cache_hit


def test_semantic_cache_hit_for_a_paraphrase(settings, corpus, generative, user, django_user_model):
    """A reworded question reuses the answer; the notice says so without quoting the
    earlier question, which may be another user's words."""
    other = django_user_model.objects.create_user("other-asker", password="pw-other-123")
    ask("How often is the database backed up?", user=other)
    events = ask("How frequently is the database backed up?", user=user)

    assert len(chat_requests(generative)) == 1
    assert of_type(events, Done)[0].usage["cache_hit"] is True
    notice = of_type(events, Meta)[0].notice
    assert "very similar question" in notice
    assert "How often" not in notice and "“" not in notice
    stored = Message.objects.get(pk=of_type(events, Done)[0].message_id)
    assert "How often" not in stored.notice
    assert chat_usage()[-1].saved_cost_usd > 0


def test_a_different_question_is_not_a_cache_hit(corpus, generative, user):
    """Sharing words is not enough: another question goes to the model."""
    ask("How often is the database backed up?", user=user)
    ask("How long is a database backup kept?", user=user)

    assert len(chat_requests(generative)) == 2


def test_disabling_a_source_document_invalidates_the_cache(corpus, generative, user):
    """Disable (and enable) bump the collection's version, so the old answer never matches."""
    ask(QUESTION, user=user)
    handbook = Document.objects.get(original_filename="handbook.md")
    document_disable(document=handbook)

    while_disabled = ask(QUESTION, user=user)
    document_enable(document=handbook)
    ask(QUESTION, user=user)

    assert services.NOTICE_NO_PASSAGES in of_type(while_disabled, Meta)[0].notice
    assert len(chat_requests(generative)) == 2
    # The stale entry went when the scope was next looked up; the new answer replaced it.
    entry = AnswerCacheEntry.objects.get()
    corpus.refresh_from_db()
    assert entry.kb_version == f"c{corpus.pk}@{corpus.updated_at.isoformat()}"


def test_reingesting_a_source_document_deletes_its_cache_entries(corpus, ingest_one, generative,
                                                                 user):
    """A new version of a cited document removes the answers that drew on it at once."""
    ask(QUESTION, user=user)
    assert AnswerCacheEntry.objects.count() == 1

    ingest_one(corpus, "handbook.md", HANDBOOK.replace("02:00 UTC", "03:00 UTC"))

    assert not AnswerCacheEntry.objects.exists()
    generative.chat_reply = "Backups run every night at 03:00 UTC [1]."
    events = ask(QUESTION, user=user)
    assert "03:00 UTC" in of_type(events, Citations)[0].citations[0]["text"]
    assert len(chat_requests(generative)) == 2
