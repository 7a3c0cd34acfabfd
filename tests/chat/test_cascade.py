"""The model cascade (chat.cascade): fallbacks, the circuit breaker, a cut mid-answer."""

from __future__ import annotations

import pytest

from chat import cascade
from chat.events import Done, Error, Meta, Started
from chat.models import AnswerCacheEntry, Message
from kb.models import UsageRecord
from tests.chat.conftest import (
    EXTRACTIVE_ENTRY,
    QUESTION,
    ask,
    chat_entry,
    chat_requests,
    chat_usage,
    kinds,
    of_type,
    text_of,
)
from tests.fakes.openai_server import Fault

pytestmark = pytest.mark.django_db


def test_rate_limited_primary_falls_back_to_the_next_model(settings, corpus, openai_server, user):
    """A 429 before the first token moves on to the fallback model, with a notice."""
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [
        chat_entry(openai_server, "gpt-4o"), chat_entry(openai_server, "gpt-4o-mini"),
        EXTRACTIVE_ENTRY,
    ]}
    openai_server.enqueue(Fault(status=429, retry_after=0))

    events = ask(QUESTION, user=user)

    meta = of_type(events, Meta)[0]
    assert meta.mode == "generated" and meta.notice == cascade.NOTICE_FALLBACK
    assert [r.body["model"] for r in chat_requests(openai_server)] == ["gpt-4o", "gpt-4o-mini"]
    failed, answered = chat_usage()
    assert (failed.model, failed.status) == ("gpt-4o", UsageRecord.Status.ERROR)
    assert "429" in failed.error and failed.output_tokens == 0
    assert (answered.model, answered.status) == ("gpt-4o-mini", UsageRecord.Status.OK)
    assert of_type(events, Done)[0].usage["model"] == "gpt-4o-mini"


def test_model_down_answers_extractively_with_a_notice(corpus, generative, user):
    """A 500 from the only model: the extractive answer, labelled as such, still cited."""
    generative.enqueue(Fault(status=500))

    events = ask(QUESTION, user=user)

    assert kinds(events) == ["Started", "Meta", "Citations", "Delta", "Done"]
    meta = of_type(events, Meta)[0]
    assert meta.mode == "extracted" and meta.notice == cascade.NOTICE_MODEL_DOWN
    answer = text_of(events)
    # The page labels the mode once; the text does not say it again.
    assert "not generated" not in answer.lower()
    assert "every night at 02:00 UTC" in answer and "[1]" in answer
    done = of_type(events, Done)[0]
    assert done.usage == {"input_tokens": done.usage["input_tokens"], "output_tokens":
                          done.usage["output_tokens"], "cost_usd": 0.0, "model": "extractive",
                          "provider": "extractive", "cache_hit": False}
    assert [r.provider for r in chat_usage()] == ["openai", "extractive"]
    # An extractive answer is free to redo; caching it would outlive the outage.
    assert not AnswerCacheEntry.objects.exists()


def test_open_circuit_skips_the_model_without_calling_it(settings, corpus, generative, user):
    """After N failures in a row the model is not even tried until the cooldown ends."""
    settings.KB_CIRCUIT_FAILURES = 2
    generative.enqueue(Fault(status=500), Fault(status=500))
    ask(QUESTION, user=user)
    ask("When do vacation days expire?", user=user)
    assert len(chat_requests(generative)) == 2

    events = ask("How long does a restore take?", user=user)

    assert len(chat_requests(generative)) == 2
    assert of_type(events, Meta)[0].mode == "extracted"


def test_cut_mid_stream_keeps_the_partial_answer_as_interrupted(corpus, generative, user):
    """Text already shown is not restarted elsewhere: the message is interrupted, an error
    follows."""
    generative.enqueue(Fault(cut_after_tokens=3))

    events = ask(QUESTION, user=user)

    assert kinds(events) == ["Started", "Meta", "Citations", "Delta", "Error"]
    assert of_type(events, Error)[0].code == "upstream_interrupted"
    partial = text_of(events)
    assert partial == "Backups run every"
    message = Message.objects.get(pk=of_type(events, Started)[0].message_id)
    assert message.status == Message.Status.INTERRUPTED and message.content == partial
    (record,) = chat_usage()
    assert record.status == UsageRecord.Status.ERROR and record.output_tokens > 0
    assert len(chat_requests(generative)) == 1  # no retry after text was shown
