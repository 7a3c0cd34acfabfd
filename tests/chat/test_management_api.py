"""Budgets and the answer cache over REST, with the chat admin's permissions."""

from __future__ import annotations

import pytest

from chat.models import AnswerCacheEntry, Budget
from tests.chat.conftest import ask
from tests.kb.test_management_api import client_for, user_with

pytestmark = pytest.mark.django_db


@pytest.fixture
def budgets_api(django_user_model):
    api, _ = client_for(user_with(django_user_model, "finance", "view_budget", "add_budget",
                                 "change_budget", "delete_budget"))
    return api


def test_budgets_are_created_changed_and_deleted(budgets_api, django_user_model):
    django_user_model.objects.create_user("spender")
    made = budgets_api.post("/api/v1/budgets/", {"scope": "user", "user": "spender",
                                                 "daily_token_limit": 5000}, format="json")
    assert made.status_code == 201, made.content
    path = f"/api/v1/budgets/{made.json()['id']}/"
    changed = budgets_api.patch(path, {"daily_cost_limit_usd": "1.50"}, format="json")
    assert changed.status_code == 200 and changed.json()["daily_cost_limit_usd"] == "1.5000"
    assert Budget.objects.get().daily_token_limit == 5000
    assert budgets_api.delete(path).status_code == 204
    assert not Budget.objects.exists()


@pytest.mark.parametrize("body, field", [
    ({"scope": "user"}, "__all__"),                        # a user budget names a user
    ({"scope": "global", "user": "spender"}, "__all__"),   # a global one names nobody
    ({"scope": "user", "user": "nobody-by-that-name"}, "user"),
    ({"scope": "weekly"}, "scope"),
])
def test_a_budget_the_admin_would_refuse_is_a_400(budgets_api, django_user_model, body, field):
    django_user_model.objects.create_user("spender")
    response = budgets_api.post("/api/v1/budgets/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not Budget.objects.exists()


def test_there_is_one_global_budget(budgets_api):
    assert budgets_api.post("/api/v1/budgets/", {"scope": "global"},
                            format="json").status_code == 201
    second = budgets_api.post("/api/v1/budgets/", {"scope": "global"}, format="json")
    assert second.status_code == 400
    assert Budget.objects.count() == 1


def test_reading_budgets_is_not_writing_them(django_user_model):
    api, _ = client_for(user_with(django_user_model, "viewer", "view_budget"))
    assert api.get("/api/v1/budgets/").status_code == 200
    assert api.post("/api/v1/budgets/", {"scope": "global"}, format="json").status_code == 403
    nobody, _ = client_for(user_with(django_user_model, "nobody"))
    assert nobody.get("/api/v1/budgets/").status_code == 403


def test_cached_answers_are_listed_and_cleared(corpus, generative, user, django_user_model):
    ask("How often is the database backed up?", user=user)
    ask("When do vacation days expire?", user=user)
    assert AnswerCacheEntry.objects.count() == 2
    api, _ = client_for(user_with(django_user_model, "cache-keeper", "view_answercacheentry",
                                 "delete_answercacheentry"))
    listed = api.get("/api/v1/answer-cache/").json()["results"]
    assert len(listed) == 2 and listed[0]["question"]
    assert api.delete(f"/api/v1/answer-cache/{listed[0]['id']}/").status_code == 204
    assert AnswerCacheEntry.objects.count() == 1
    assert api.delete("/api/v1/answer-cache/").status_code == 204
    assert not AnswerCacheEntry.objects.exists()


def test_clearing_the_cache_needs_the_delete_permission(corpus, generative, user,
                                                        django_user_model):
    ask("How often is the database backed up?", user=user)
    api, _ = client_for(user_with(django_user_model, "viewer", "view_answercacheentry"))
    assert len(api.get("/api/v1/answer-cache/").json()["results"]) == 1
    assert api.delete("/api/v1/answer-cache/").status_code == 403
    assert AnswerCacheEntry.objects.count() == 1


def test_a_username_with_a_nul_is_an_unknown_user_not_a_server_error(budgets_api):
    response = budgets_api.post("/api/v1/budgets/", {"scope": "user", "user": "ali\x00ce"},
                                format="json")
    assert response.status_code == 400 and "user" in response.json()["error"]["fields"]
