"""Golden sets: editors turn real questions into a collection's golden set from the Quality
screen, kb_eval --golden runs it, and it travels as a BEIR directory."""

from __future__ import annotations

import io
import json
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.test import Client

from chat.events import Started
from search import golden
from search.models import GoldenQuery, GoldenSet
from tests.chat.conftest import EXTRACTIVE_ENTRY, ask

pytestmark = pytest.mark.django_db

TOPICS = {
    "lighthouse.md": ("The Skerry Point lighthouse lamp is replaced after 400 hours.",
                      "How often is the lighthouse lamp replaced?"),
    "tides.md": ("The tide gauge at Pier 7 is calibrated every March by the harbour office.",
                 "When is the Pier 7 tide gauge calibrated?"),
    "ferry.md": ("The winter ferry timetable starts on the first Monday of November.",
                 "When does the winter ferry timetable start?"),
    "buoys.md": ("Mooring buoys are inspected by divers every spring before the season.",
                 "Who inspects the mooring buoys?"),
    "fuel.md": ("The fuel dock sells diesel only; petrol is sold at the marina shop.",
                "Where can I buy petrol?"),
}
EXTRA_QUESTIONS = [
    ("What is the lamp replacement interval at Skerry Point?", "lighthouse.md"),
    ("Which month is the tide gauge calibration?", "tides.md"),
    ("Is diesel sold at the fuel dock?", "fuel.md"),
    ("When do divers check the buoys?", "buoys.md"),
    ("First Monday of November: what begins then?", "ferry.md"),
]


@pytest.fixture
def harbour(collection, ingest_one):
    return {name: ingest_one(collection, name, f"# {name[:-3].title()}\n\n{text}\n")
            for name, (text, _) in TOPICS.items()}


@pytest.fixture
def asker(django_user_model, settings):
    """A chat user, answered by the extractive answerer alone (no model configured)."""
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [EXTRACTIVE_ENTRY]}
    return django_user_model.objects.create_user("asker", password="pw-asker-123")


@pytest.fixture
def editor(django_user_model) -> Client:
    account = django_user_model.objects.create_user("editor", password="pw-editor-11",
                                                    is_staff=True)
    account.user_permissions.add(*Permission.objects.filter(codename__in=[
        "view_message", "view_conversation", "view_document", "view_collection",
        "add_goldenquery", "view_goldenquery", "change_goldenquery"]))
    client = Client()
    client.force_login(account)
    return client


def test_an_editor_turns_ten_real_questions_into_a_golden_set_that_kb_eval_runs(
    harbour, collection, asker, editor
):
    session = Client()
    session.force_login(asker)
    questions = [(question, name) for name, (_, question) in TOPICS.items()] + EXTRA_QUESTIONS
    for question, _ in questions:
        (started,) = [e for e in ask(question, user=asker) if isinstance(e, Started)]
        assert session.put(f"/api/v1/chat/messages/{started.message_id}/feedback",
                           data=json.dumps({"rating": "down", "reason": "incomplete"}),
                           content_type="application/json").status_code == 200

    page = editor.get("/admin/quality/")
    links = {answer.question: answer.golden_add_url for answer in page.context["rated_down"]}
    assert len(links) == 10
    for question, name in questions:
        link = links[question]
        initial = parse_qs(urlsplit(link).query)
        assert initial["collection"] == [str(collection.pk)]
        # The editor keeps the question and picks the document that answers it.
        response = editor.post(link, {"collection": collection.pk, "question": question,
                                      "documents": [harbour[name].pk]})
        assert response.status_code == 302, response.content.decode()[:2000]
    assert GoldenQuery.objects.filter(collection=collection).count() == 10
    assert GoldenQuery.objects.exclude(source_message_id=None).count() == 10
    assert GoldenSet.objects.get(collection=collection).version == 10

    out = io.StringIO()
    call_command("kb_eval", "--golden", collection.slug, "--modes", "bm25,hybrid", stdout=out)
    report = out.getvalue()
    assert "golden set v10, 10 questions" in report
    hybrid = next(line for line in report.splitlines() if line.startswith("hybrid"))
    recall, mrr, _ = (float(value) for value in hybrid.split()[1:])
    assert recall >= 0.9 and mrr >= 0.7, report


def test_a_document_outside_the_collection_is_refused(harbour, collection, editor, ingest_one):
    from kb.services.collections import collection_get_or_create

    other = ingest_one(collection_get_or_create(slug="other"), "x.md", "# X\n\nElsewhere.\n")
    response = editor.post("/admin/search/goldenquery/add/", {
        "collection": collection.pk, "question": "Where?", "documents": [other.pk]})
    assert response.status_code == 200 and "not in" in response.content.decode()
    assert not GoldenQuery.objects.exists()


def test_export_and_import_as_beir(harbour, collection, tmp_path):
    for name, (_, question) in TOPICS.items():
        golden.golden_query_save(collection=collection, question=question,
                                 documents=[harbour[name]])
    assert golden.golden_set_export(collection=collection, path=tmp_path) == 5
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert {row["_id"] for row in corpus} == {str(d.pk) for d in harbour.values()}
    assert (tmp_path / "qrels" / "test.tsv").read_text().startswith("query-id\tcorpus-id\tscore")
    GoldenQuery.objects.all().delete()
    assert golden.golden_set_import(collection=collection, path=tmp_path) == (5, 0)
    assert GoldenQuery.objects.count() == 5


def test_a_collection_without_a_golden_set_says_how_to_make_one(collection):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no golden set yet"):
        call_command("kb_eval", "--golden", collection.slug, stdout=io.StringIO())
