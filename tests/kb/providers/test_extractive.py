"""The extractive answerer: no network, no weights, always an answer with citations.

Its prompts are built by chat.prompts, as the chat builds them: the passages' text is
what the answerer quotes from.
"""

from __future__ import annotations

import asyncio

import pytest

from chat import prompts
from chat.prompts import Passage
from kb.providers.base import ChatBackend, ChatDelta, ChatMessage, ChatUsage, Prompt
from kb.providers.extractive import NO_PASSAGES, ExtractiveChat, select_sentences, stem


@pytest.fixture(autouse=True)
def _isolated_settings():
    """Override the Django settings fixture: these tests need no database."""


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
        return [item async for item in ExtractiveChat().stream(prompt.prompt, **kwargs)]

    return asyncio.run(collect())


def answer_of(items) -> str:
    return "".join(item.text for item in items if isinstance(item, ChatDelta))


def test_is_a_non_generative_local_backend():
    backend = ExtractiveChat(model="extractive")
    assert isinstance(backend, ChatBackend)
    assert (backend.generative, backend.remote, backend.provider_name) == (
        False, False, "extractive")


def test_quotes_the_matching_sentences_with_their_citations():
    """The best sentences, each paragraph followed by its passage number; no lead line (the
    page labels extracted answers once) and no off-topic padding."""
    answer = answer_of(run("How often is the database backed up?", [BACKUPS, UPLOADS]))

    assert "not generated" not in answer.lower()
    assert answer.startswith("The database is backed up every night at 02:00 UTC.")
    assert answer.split("\n\n")[0].endswith("[1]")
    assert "nice view" not in answer and "Zip archives" not in answer


def test_streams_word_by_word_then_one_usage():
    """Many small deltas that join to the answer, then a counted, free usage item."""
    items = run("What is the PDF upload limit?", [BACKUPS, UPLOADS])

    deltas = [item for item in items if isinstance(item, ChatDelta)]
    assert len(deltas) >= 8 and all(len(d.text.split()) == 1 for d in deltas)
    usage = items[-1]
    assert isinstance(usage, ChatUsage) and sum(isinstance(i, ChatUsage) for i in items) == 1
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.model == "extractive" and usage.finish_reason == "stop"
    assert "limited to 50 MB each. [2]" in answer_of(items)


def test_picks_at_most_four_units_in_reading_order():
    """Several matching sentences: at most four are quoted, ordered by passage then position."""
    text = " ".join(f"Backups of server {i} run every night at {i}:00." for i in range(1, 10))

    picked = select_sentences("When do backups run every night?",
                              [(1, text), (2, text + " Extra.")])

    assert 1 <= len(picked) <= 4
    assert picked == sorted(picked, key=lambda pair: (pair[0], text.find(pair[1])))


def test_stemming_lets_word_forms_meet():
    assert stem("indexing") == stem("indexes") == stem("index")
    assert stem("policies") == "policy"
    pairs = select_sentences("restoring backups",
                             [(1, "A restore is simple to do now. Nothing else here today.")])
    assert pairs[0][1].startswith("A restore")


def test_without_any_overlap_the_top_passage_opens_the_answer():
    """No shared word (the chat's answerability check normally stops this earlier): the
    first sentence of the best passage, still cited."""
    answer = answer_of(run("Qwertyuiop zxcvbnm?", [BACKUPS, UPLOADS]))

    assert answer.endswith("[1]") and "[2]" not in answer


def test_without_passages_says_so():
    async def collect():
        prompt = Prompt(messages=[ChatMessage(role="user", content="Just a question")],
                        question="Just a question")
        return [item async for item in ExtractiveChat().stream(prompt)]

    assert answer_of(asyncio.run(collect())) == NO_PASSAGES


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


DRF_CURSOR = """CursorPagination

The cursor-based pagination presents an opaque "cursor" indicator that the client may use \
to page through the result set.

To enable the CursorPagination style globally, use the following configuration:

REST_FRAMEWORK = {
    'DEFAULT_PAGINATION_CLASS': 'rest_framework.pagination.CursorPagination',
    'PAGE_SIZE': 100
}

cursor_query_param = A string value indicating the name of the "cursor" query parameter. \
Defaults to 'cursor'.

ordering = This should be a string, or list of strings, indicating the field against which \
the cursor based pagination will be applied. Defaults to '-created'."""


def test_a_short_sentence_is_quoted_with_the_one_it_completes():
    """"Defaults to 'cursor'." alone answers nothing: it comes with the sentence it completes."""
    answer = answer_of(run("What is the name of the cursor query parameter?",
                           [UPLOADS, DRF_CURSOR]))

    assert ("cursor_query_param = A string value indicating the name of the \"cursor\" "
            "query parameter. Defaults to 'cursor'." in answer)
    assert not answer.startswith("Defaults")
    assert "PDF" not in answer


def test_code_blocks_are_quoted_whole_with_their_introduction():
    """A code block is one unit, fenced and never cut, and comes with the sentence that
    introduces it."""
    answer = answer_of(run("How do I enable cursor pagination globally?", [DRF_CURSOR]))

    assert "use the following configuration: [1]" in answer
    fenced = answer.split("```\n", 1)[1].split("\n```", 1)[0]
    assert fenced == (
        "REST_FRAMEWORK = {\n"
        "    'DEFAULT_PAGINATION_CLASS': 'rest_framework.pagination.CursorPagination',\n"
        "    'PAGE_SIZE': 100\n"
        "}"
    )


def test_citations_are_numbered_in_order_of_appearance():
    """The answer's markers, renumbered 1..n as they appear; the passages follow."""
    text, order = prompts.citations_renumber("First [3]. Then [1, 3]. Bad [9].", passage_count=3)

    assert text == "First [1]. Then [2, 1]. Bad [9]."
    assert order == [3, 1, 2]


PUMPS = (
    "# Pump room\n"
    "If a pump fails to start, do not press the start button repeatedly. Record the alarm "
    "code shown on the control panel and call the duty engineer on extension 4471. Leave the "
    "pump isolated until the engineer arrives.\n"
    "The pump room was refitted in 2019. Its floor drains into the sump under the stairs. "
    "Visitors are shown the pumps on open days. The old pumps are kept in the museum."
)


def test_an_instruction_comes_with_the_steps_that_follow_it():
    """"If a pump fails to start, do not …" opens a procedure: the steps after it in the same
    paragraph (which do not repeat the question's words) are quoted with it, and the next
    paragraph is not."""
    answer = answer_of(run("What should I do if a pump fails to start?", [PUMPS]))

    assert answer.startswith("If a pump fails to start, do not press the start button repeatedly. "
                             "Record the alarm code shown on the control panel and call the duty "
                             "engineer on extension 4471. Leave the pump isolated until the "
                             "engineer arrives. [1]")
    assert "refitted" not in answer and "museum" not in answer


def test_a_statement_does_not_bring_its_paragraph():
    """Only instructions pull in what follows: a plain statement is quoted alone."""
    answer = answer_of(run("When was the pump room refitted?", [PUMPS]))

    assert answer.startswith("The pump room was refitted in 2019.")
    assert "museum" not in answer and "4471" not in answer
