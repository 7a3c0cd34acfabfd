"""The editors' Quality screen: answers rated down and not covered, with what they
retrieved; unanswered questions grouped by meaning; the most and never cited documents."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from chat.events import Started
from kb.services.collections import collection_get_or_create
from tests.chat.conftest import ask

pytestmark = pytest.mark.django_db

NOT_COVERED = ["How do I bake sourdough bread at home?",
               "What is a good recipe for sourdough bread?",
               "Who won the football world cup in 1998?"]


@pytest.fixture
def world(corpus, extractive_only, user, ingest_one):
    ingest_one(collection_get_or_create(slug="archive"), "old.md",
               "# Old memo\n\nThe canteen moved to the third floor in 2019.\n")
    (started,) = [e for e in ask("How often is the database backed up?", user=user)
                  if isinstance(e, Started)]
    session = Client()
    session.force_login(user)
    vote = session.put(f"/api/v1/chat/messages/{started.message_id}/feedback",
                       data=json.dumps({"rating": "down", "reason": "outdated",
                                        "comment": "Backups run at 03:00 since May."}),
                       content_type="application/json")
    assert vote.status_code == 200
    for question in NOT_COVERED:
        ask(question, user=user)
    return started.message_id


@pytest.fixture
def editor(django_user_model) -> Client:
    editor = django_user_model.objects.create_user("editor", password="pw-editor-11",
                                                   is_staff=True)
    editor.user_permissions.add(*Permission.objects.filter(codename__in=[
        "view_message", "view_conversation", "view_document", "view_collection"]))
    client = Client()
    client.force_login(editor)
    return client


def test_a_thumbs_down_shows_with_what_was_retrieved(world, editor):
    page = editor.get("/admin/quality/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "How often is the database backed up?" in html
    assert "Backups run at 03:00 since May." in html and "outdated" in html
    assert "handbook" in html.lower()  # the retrieved document, linked
    assert 'data-testid="rated-down-count">1<' in html


def test_questions_not_covered_are_listed_and_grouped_by_meaning(world, editor):
    page = editor.get("/admin/quality/")
    topics = page.context["topics"]
    assert page.context["not_covered"] and {a.question for a in page.context["not_covered"]} \
        == set(NOT_COVERED)
    sourdough = [t for t in topics if any("sourdough" in q for q in t.questions)]
    assert [t.size for t in sourdough] == [2]
    assert any(t.questions == [NOT_COVERED[2]] for t in topics)


def test_most_and_never_cited_documents(world, editor):
    page = editor.get("/admin/quality/")
    (cited,) = page.context["most_cited"]
    assert "handbook" in cited.title.lower() and cited.answers == 1
    assert [d.original_filename for d in page.context["never_cited"]] == ["old.md"]


def test_the_collection_filter_and_the_csv(world, editor):
    archive = editor.get("/admin/quality/", {"collection": "archive"})
    assert archive.context["rated_down"] == [] and archive.context["not_covered"] == []
    exported = editor.get("/admin/quality/", {"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(exported.content.decode())))
    assert [row["kind"] for row in rows].count("not_covered") == 3
    (down,) = [row for row in rows if row["kind"] == "rated_down"]
    assert down["reason"] == "outdated" and "handbook" in down["retrieved"].lower()


def test_the_screen_needs_the_message_view_permission(world, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw-staff-111",
                                                  is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get("/admin/quality/").status_code == 403
    assert Client().get("/admin/quality/").status_code == 302


def test_the_report_over_the_api(world, django_user_model):
    from kb.models import Collection
    from tests.kb.test_management_api import client_for, user_with

    api, _ = client_for(user_with(django_user_model, "auditor", "view_message"))
    report = api.get("/api/v1/quality/").json()
    (down,) = report["rated_down"]
    assert down["question"] == "How often is the database backed up?"
    assert down["reason"] == "outdated" and down["retrieved"]
    assert {a["question"] for a in report["not_covered"]} == set(NOT_COVERED)
    assert api.get("/api/v1/quality/", {"start": "someday"}).status_code == 400
    narrowed, _ = client_for(user_with(django_user_model, "scoped", "view_message"),
                             collections=[Collection.objects.get(slug="docs")])
    assert narrowed.get("/api/v1/quality/").status_code == 403
    nobody, _ = client_for(user_with(django_user_model, "nobody"))
    assert nobody.get("/api/v1/quality/").status_code == 403


def test_the_chat_admin_links_an_answer_to_the_golden_set(world, editor, django_user_model):
    from django.contrib.auth.models import Permission

    from chat.models import Message

    page = editor.get(f"/admin/chat/message/{world}/change/")
    assert page.status_code == 200 and "golden set" not in page.content.decode()
    curator = django_user_model.objects.get(username="editor")
    curator.user_permissions.add(Permission.objects.get(codename="add_goldenquery"))
    html = editor.get(f"/admin/chat/message/{world}/change/").content.decode()
    assert "Add its question to the golden set" in html
    assert "question=How+often+is+the+database+backed+up%3F" in html
    assert Message.objects.get(pk=world).role == "assistant"
