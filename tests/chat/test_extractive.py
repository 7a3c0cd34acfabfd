"""The extractive answerer: no network, no weights, always an answer with citations."""

from __future__ import annotations

import asyncio

import pytest

from chat import prompts
from chat.prompts import Passage
from kb.providers.base import ChatBackend, ChatDelta, ChatUsage
from kb.providers.extractive import LEAD, NO_PASSAGES, ExtractiveChat, select_sentences, stem


@pytest.fixture(autouse=True)
def _isolated_settings():
    """Override the Django settings fixture: these tests need no database."""


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """Override the chat conftest's fixture: nothing here touches settings."""


BACKUPS = (
    "# Backups\n"
    "The database is backed up every night at 02:00 UTC. Backups are kept for 30 days.\n"
    "- Restores take about ten minutes for a 10 GB database.\n"
    "Our office has a nice view of the river."
)
UPLOADS = "Uploaded PDF files are limited to 50 MB each. Zip archives are unpacked into documents."


def run(question: str, texts: list[str], **kwargs) -> list[ChatDelta | ChatUsage]:
    passages = [Passage(chunk_id=i, document_id=i, document_title=f"Doc {i}", text=text)
                for i, text in enumerate(texts, start=1)]
    prompt = prompts.prompt_build(question=question, passages=passages,
                                  count_tokens=ExtractiveChat().count_tokens, context_tokens=10_000)

    async def collect():
        return [item async for item in ExtractiveChat().stream(prompt.messages, **kwargs)]

    return asyncio.run(collect())


def answer_of(items) -> str:
    return "".join(item.text for item in items if isinstance(item, ChatDelta))


def test_is_a_non_generative_local_backend():
    backend = ExtractiveChat(model="extractive")
    assert isinstance(backend, ChatBackend)
    assert (backend.generative, backend.remote, backend.provider_name) == (False, False, "extractive")


def test_quotes_the_matching_sentences_with_their_citations():
    """The lead line, then the best sentences, each followed by its passage number."""
    answer = answer_of(run("How often is the database backed up?", [BACKUPS, UPLOADS]))

    lines = answer.split("\n")
    assert lines[0] == LEAD and lines[1] == ""
    assert "The database is backed up every night at 02:00 UTC. [1]" in lines
    assert all(line.endswith(("[1]", "[2]")) for line in lines[2:])
    assert "nice view" not in answer.split("\n")[2]  # the best sentence comes from the match


def test_streams_word_by_word_then_one_usage():
    """Many small deltas that join to the answer, then a counted, free usage item."""
    items = run("What is the PDF upload limit?", [BACKUPS, UPLOADS])

    deltas = [item for item in items if isinstance(item, ChatDelta)]
    assert len(deltas) > 10 and all(len(d.text.split()) == 1 for d in deltas)
    usage = items[-1]
    assert isinstance(usage, ChatUsage) and sum(isinstance(i, ChatUsage) for i in items) == 1
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.model == "extractive" and usage.finish_reason == "stop"
    assert "limited to 50 MB each. [2]" in answer_of(items)


def test_picks_three_to_five_sentences_in_reading_order():
    """Several matching sentences: at most four are quoted, ordered by passage then position."""
    text = " ".join(f"Backups of server {i} run every night at {i}:00." for i in range(1, 10))

    picked = select_sentences("When do backups run every night?", [(1, text), (2, text + " Extra.")])

    assert 3 <= len(picked) <= 5
    assert picked == sorted(picked, key=lambda pair: (pair[0], text.find(pair[1])))


def test_stemming_lets_word_forms_meet():
    assert stem("indexing") == stem("indexes") == stem("index")
    assert stem("policies") == "policy"
    pairs = select_sentences("restoring backups", [(1, "A restore is simple to do now. Nothing else here today.")])
    assert pairs[0][1].startswith("A restore")


def test_without_any_overlap_the_top_passages_open_the_answer():
    """No shared word: the first sentences of the best passages, still cited."""
    answer = answer_of(run("Qwertyuiop zxcvbnm?", [BACKUPS, UPLOADS]))

    assert "[1]" in answer and "[2]" in answer


def test_without_passages_says_so():
    async def collect():
        from kb.providers.base import ChatMessage

        messages = [ChatMessage(role="user", content="Just a question")]
        return [item async for item in ExtractiveChat().stream(messages)]

    assert answer_of(asyncio.run(collect())) == f"{LEAD}\n\n{NO_PASSAGES}"


def test_max_tokens_bounds_the_answer():
    items = run("How often is the database backed up?", [BACKUPS, UPLOADS], max_tokens=5)

    assert len(answer_of(items).split()) <= 5


def test_a_document_cannot_forge_citations_to_other_passages():
    """"…approved by the board [2]." in passage 1 is quoted as passage 1 only: the
    document's own [2] and [3] do not become links to passages 2 and 3."""
    forged = "The annual budget was approved by the board [2]. The budget covers hiring [3]."
    answer = answer_of(run("Who approved the annual budget?", [forged, UPLOADS, BACKUPS]))

    assert "approved by the board" in answer
    assert "[2]" not in answer and "[3]" not in answer
    assert prompts.citations_check(answer, passage_count=3).cited == [1]
