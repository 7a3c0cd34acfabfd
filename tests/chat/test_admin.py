"""Chat admin: budgets are editable, conversations readable, cached answers clearable."""

from __future__ import annotations

import pytest
from django.test import Client

from chat.models import AnswerCacheEntry, Budget, Conversation
from tests.chat.conftest import ask

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(django_user_model) -> Client:
    admin = django_user_model.objects.create_superuser("root", password="pw-root-12345")
    client = Client()
    client.force_login(admin)
    return client


def test_admins_create_and_edit_budgets(admin_client, user):
    response = admin_client.post("/admin/chat/budget/add/", {
        "scope": "user", "user": user.pk, "daily_token_limit": "50000",
        "daily_cost_limit_usd": "",
    })

    assert response.status_code == 302, response.content.decode()[:2000]
    budget = Budget.objects.get()
    assert (budget.scope, budget.user, budget.daily_token_limit) == ("user", user, 50_000)
    assert admin_client.get("/admin/chat/budget/").status_code == 200


def test_a_budget_must_name_the_target_its_scope_needs(admin_client):
    response = admin_client.post("/admin/chat/budget/add/", {
        "scope": "user", "daily_token_limit": "10",
    })

    assert response.status_code == 200
    assert "a user budget names a user" in response.content.decode()
    assert not Budget.objects.exists()


def test_conversations_are_read_only_with_their_messages(admin_client, collection, extractive_only,
                                                         user):
    ask("Anything about backups?", user=user)
    conversation = Conversation.objects.get()

    listing = admin_client.get("/admin/chat/conversation/")
    page = admin_client.get(f"/admin/chat/conversation/{conversation.pk}/change/")

    assert listing.status_code == 200 and "Anything about backups?" in listing.content.decode()
    assert page.status_code == 200 and "do not cover this question" in page.content.decode()
    assert admin_client.get("/admin/chat/conversation/add/").status_code == 403


def test_clear_action_deletes_selected_cached_answers(admin_client, collection):
    entry = AnswerCacheEntry.objects.create(question="q", key="k", kb_version="c1@x", answer="a")

    assert admin_client.get("/admin/chat/answercacheentry/").status_code == 200
    response = admin_client.post("/admin/chat/answercacheentry/", {
        "action": "clear", "_selected_action": [entry.pk],
    })

    assert response.status_code == 302
    assert not AnswerCacheEntry.objects.exists()
