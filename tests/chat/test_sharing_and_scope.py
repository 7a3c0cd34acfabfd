"""A conversation over several collections, and sharing one as a read-only page that opens
only for people who may read every collection it cites."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat.models import Conversation
from kb.services.collections import collection_get_or_create

pytestmark = pytest.mark.django_db

PRIVATE = "# Salary bands\n\nThe B4 salary band starts at 71,500 euros for senior engineers.\n"
PUBLIC = "# Cafeteria\n\nThe cafeteria opens at 11:30 and serves soup every day.\n"
OTHER = "# Parking\n\nThe parking garage closes at 22:00 on weekdays.\n"


@pytest.fixture
def world(private_and_public, ingest_one, extractive_only, django_user_model):
    general, private, owner, _ = private_and_public(
        username="owner", slug="salaries", private_doc=("salaries.md", PRIVATE),
        public_doc=("cafeteria.md", PUBLIC))
    facilities = collection_get_or_create(slug="facilities")
    ingest_one(facilities, "parking.md", OTHER)
    session = Client()
    session.force_login(owner)
    return {"owner": owner, "session": session, "private": private, "general": general}


def chat(session: Client, **body) -> dict:
    response = session.post("/api/v1/chat", data=json.dumps({"stream": False, **body}),
                            content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()


def cited_titles(answer: dict) -> set[str]:
    return {c["document_title"] for c in answer["citations"] if c["n"] in answer["cited"]}


def signed_in(django_user_model, username: str) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_user(username, password=f"pw-{username}"))
    return client


# --- Several collections -------------------------------------------------------------------


def test_a_question_over_two_collections_searches_both_and_no_other(world):
    answer = chat(world["session"], message="When does the parking garage close?",
                  collections=["general", "salaries"])
    assert "22:00" not in answer["answer"]  # parking.md is in facilities, not asked
    answer = chat(world["session"], message="What does the B4 salary band start at?",
                  collections=["general", "salaries"])
    assert "71,500" in answer["answer"]
    conversation = Conversation.objects.get(pk=answer["conversation_id"])
    assert conversation.collection is None
    assert {c.slug for c in conversation.collections.all()} == {"general", "salaries"}
    detail = world["session"].get(f"/api/v1/conversations/{conversation.pk}").json()
    assert detail["collections"] == ["general", "salaries"]


def test_one_collection_in_the_list_is_a_single_collection_conversation(world):
    answer = chat(world["session"], message="When does the cafeteria open?",
                  collections=["general"])
    conversation = Conversation.objects.get(pk=answer["conversation_id"])
    assert conversation.collection.slug == "general"
    assert not conversation.collections.exists()


@pytest.mark.parametrize("collections, field", [
    (["general", "nope"], "collections"),
    (["general", "salaries", "Not a slug!"], "collections"),
])
def test_an_unknown_or_malformed_collection_is_a_400_naming_the_field(world, collections, field):
    response = world["session"].post(
        "/api/v1/chat", data=json.dumps({"message": "Hi?", "stream": False,
                                         "collections": collections}),
        content_type="application/json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_a_collection_the_caller_cannot_read_is_refused_like_an_unknown_one(world,
                                                                          django_user_model):
    outsider = signed_in(django_user_model, "outsider")
    response = outsider.post(
        "/api/v1/chat", data=json.dumps({"message": "B4 band?", "stream": False,
                                         "collections": ["general", "salaries"]}),
        content_type="application/json")
    assert response.status_code == 400
    assert "salaries" in json.dumps(response.json()["error"]["fields"])


# --- Sharing -------------------------------------------------------------------------------


@pytest.fixture
def shared(world):
    """A conversation citing the restricted collection, shared by its owner: its page path."""
    answer = chat(world["session"], message="What does the B4 salary band start at?",
                  collection="salaries")
    assert cited_titles(answer)
    pk = answer["conversation_id"]
    response = world["session"].post(f"/api/v1/conversations/{pk}/share")
    assert response.status_code == 200
    url = response.json()["share_url"]
    assert url.startswith("http://testserver/chat/shared/")
    return {"pk": pk, "path": url.removeprefix("http://testserver")}


def test_the_owner_sees_the_shared_page_read_only(world, shared):
    page = world["session"].get(shared["path"])
    assert page.status_code == 200
    html = page.content.decode()
    assert "71,500" in html and "Read-only" in html
    assert 'data-testid="question-input"' not in html


def test_someone_who_may_read_every_cited_collection_sees_it(world, shared, django_user_model):
    colleague = django_user_model.objects.create_user("colleague", password="pw-colleague")
    world["private"].allowed_users.add(colleague)
    client = Client()
    client.force_login(colleague)
    page = client.get(shared["path"])
    assert page.status_code == 200
    assert "71,500" in page.content.decode()


def test_someone_who_cannot_read_a_cited_collection_gets_a_403_without_the_text(
    shared, django_user_model
):
    page = signed_in(django_user_model, "outsider").get(shared["path"])
    assert page.status_code == 403
    assert "71,500" not in page.content.decode()


def test_an_anonymous_visitor_is_sent_to_sign_in(shared):
    page = Client().get(shared["path"])
    assert page.status_code == 302
    assert page["Location"].startswith("/accounts/login/")


def test_sharing_twice_keeps_the_link_and_unsharing_retires_it(world, shared):
    path = f"/api/v1/conversations/{shared['pk']}/share"
    again = world["session"].post(path).json()["share_url"]
    assert again.endswith(shared["path"])
    assert world["session"].delete(path).status_code == 204
    assert world["session"].get(shared["path"]).status_code == 404
    renewed = world["session"].post(path).json()["share_url"]
    assert not renewed.endswith(shared["path"])
    listed = world["session"].get("/api/v1/conversations").json()
    rows = listed["results"] if isinstance(listed, dict) else listed
    assert [row["shared"] for row in rows if row["id"] == shared["pk"]] == [True]


def test_someone_elses_conversation_cannot_be_shared(shared, django_user_model):
    stranger = signed_in(django_user_model, "stranger")
    assert stranger.post(f"/api/v1/conversations/{shared['pk']}/share").status_code == 404
    assert stranger.delete(f"/api/v1/conversations/{shared['pk']}/share").status_code == 404


def test_an_unknown_token_is_a_404_that_says_what_happened(world, settings):
    settings.DEBUG = False
    page = world["session"].get("/chat/shared/not-a-token/")
    assert page.status_code == 404
    assert "not shared any more" in page.content.decode()


def test_share_tokens_are_redacted_from_log_lines():
    """A share token opens the conversation for its readers: no log line keeps it."""
    from kb.ops.log_privacy import redact

    assert redact("GET /chat/shared/Zx9-token_1/ 200", []) == "GET /chat/shared/[REDACTED]/ 200"
    assert redact("Not Found: /chat/shared/abc?x=1", []) == "Not Found: /chat/shared/[REDACTED]?x=1"


# --- Reading others' conversations, as the conversation admin does -------------------------


def test_a_holder_of_view_conversation_reads_what_the_admin_would_show(world, django_user_model):
    from django.contrib.auth.models import Permission

    public = chat(world["session"], message="When does the cafeteria open?", collection="general")
    private = chat(world["session"], message="What does the B4 salary band start at?",
                   collection="salaries")
    auditor = django_user_model.objects.create_user("auditor", password="pw-auditor")
    auditor.user_permissions.add(Permission.objects.get(codename="view_conversation"))
    client = Client()
    client.force_login(auditor)

    assert client.get("/api/v1/conversations").json()["results"] == []  # none of their own
    listed = client.get("/api/v1/conversations", {"owner": "any"}).json()["results"]
    assert {row["id"] for row in listed} == {public["conversation_id"]}
    assert listed[0]["owner"] == "owner"
    detail = client.get(f"/api/v1/conversations/{public['conversation_id']}")
    assert detail.status_code == 200 and "11:30" in json.dumps(detail.json())
    assert client.get(f"/api/v1/conversations/{private['conversation_id']}").status_code == 404
    renamed = client.patch(f"/api/v1/conversations/{public['conversation_id']}",
                           data=json.dumps({"title": "Mine now"}),
                           content_type="application/json")
    assert renamed.status_code == 404  # reading is not owning


def test_owner_any_needs_the_permission(world, django_user_model):
    response = signed_in(django_user_model, "curious").get("/api/v1/conversations",
                                                           {"owner": "any"})
    assert response.status_code == 403
    response = world["session"].get("/api/v1/conversations", {"owner": "everyone"})
    assert response.status_code == 400 and "owner" in response.json()["error"]["fields"]


def test_losing_access_to_one_of_several_collections_hides_the_conversation(world):
    answer = chat(world["session"], message="What does the B4 salary band start at?",
                  collections=["general", "salaries"])
    world["private"].allowed_users.remove(world["owner"])
    listed = world["session"].get("/api/v1/conversations").json()["results"]
    assert answer["conversation_id"] not in {row["id"] for row in listed}
    assert world["session"].get(
        f"/api/v1/conversations/{answer['conversation_id']}").status_code == 404
