"""The access matrix: every path a user, editor or key can reach × every role, from one table.

ROUTES names every URL pattern of the site (walked from the resolver) with the paths that
exercise it and what each role gets; ADMIN_MODELS does the same for every model in
admin.site._registry. A new URL pattern or a newly registered model without a row fails
test_every_route_and_admin_model_has_a_row. Each case also checks for leaks: the body
must not contain a marker of data the role may not read, whatever the status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import URLResolver, get_resolver
from django.utils import timezone

from chat.models import AnswerCacheEntry, Budget, Conversation, Message
from chat.services import conversation_share
from kb.models import ApiKey, Chunk, EmbeddingModel, UsageRecord
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create
from kb.services.documents import document_disable
from search.golden import golden_query_save
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.django_db

ROLES = ("superuser", "editor", "user", "narrowed_key", "revoked_key", "deactivated_key",
         "deactivated_user", "anonymous")
KEY_ROLES = ("narrowed_key", "revoked_key", "deactivated_key")

# What each role may read. A: user-a's a-private; B: user-b's b-private; D: a disabled
# document in the public collection, which only the editors' admin may show.
MARKERS = {
    "A": ("Nightjar", "Harbour Tides", "a-private"),
    "B": ("Quokka", "71,500", "b-private"),
    "D": ("Wombat",),
}
READS = {
    "superuser": {"A", "B", "D"},
    "editor": {"D"},
    "user": {"B"},  # user-b, signed in
}

A_DOC = "# Nightjar merger\n\nProject Nightjar buys Harbour Tides in May; the board approved it.\n"
B_DOC = "# Quokka salary bands\n\nThe Quokka band starts at 71,500 euros for senior engineers.\n"
PUBLIC_DOC = "# Cafeteria hours\n\nThe cafeteria opens at 11:30 and serves soup every day.\n"
DISABLED_DOC = "# Wombat travel policy\n\nThe retired Wombat policy paid business class.\n"

EDITOR_PERMISSIONS = [
    "view_collection", "add_document", "view_document", "change_document", "view_usagerecord",
    "add_apikey", "view_apikey", "change_apikey", "view_conversation", "view_message",
    "view_answercacheentry",
]


@dataclass(frozen=True)
class Case:
    role: str
    route: str
    path: str
    expected: frozenset[int]


def _expect(**by_role) -> dict[str, frozenset[int]]:
    """Statuses per role: `keys`, `others` and `staff` set groups; a role's own name wins.

    A deactivated user's session is no session at all, so that role gets what anonymous gets.
    """
    result = {}
    for role in ROLES:
        group = ("keys" if role in KEY_ROLES else "staff" if role in {"superuser", "editor"}
                 else None)
        if role == "deactivated_user" and "anonymous" in by_role:
            role_value = by_role["anonymous"]
        else:
            role_value = by_role.get(role)
        value = role_value if role_value is not None else by_role.get(group, by_role.get("others"))
        assert value is not None, f"no expectation for {role}"
        result[role] = frozenset(value if isinstance(value, set | frozenset) else {value})
    return result


ALL_200 = _expect(others=200)
# HTML pages behind a login: the key roles send no session, so they are anonymous there.
LOGIN_PAGE = _expect(superuser=200, editor=200, user=200, others=302)
ADMIN_ONLY = _expect(superuser=200, editor=200, others=302)
# The APIs: a bearer key or a session; bad keys 401, nobody 401.
API_READ = _expect(others=200, revoked_key=401, deactivated_key=401, anonymous=401)
API_HIDDEN = _expect(others=404, revoked_key=401, deactivated_key=401, anonymous=401)
API_EDITORS_ONLY = _expect(staff=200, others=404, revoked_key=401, deactivated_key=401,
                           anonymous=401)
API_POST = _expect(others=405, revoked_key=401, deactivated_key=401, anonymous=401)
# The editor holds "Can view" of the usage ledger and the cache, not of budgets.
API_OPERATORS = _expect(staff=200, others=403, revoked_key=401, deactivated_key=401,
                        anonymous=401)
API_SUPERUSER_ONLY = _expect(superuser=200, others=403, revoked_key=401, deactivated_key=401,
                             anonymous=401)
# "Can view embedding model", which only the superuser holds here.
API_MODEL_READERS = _expect(superuser=200, others=403, revoked_key=401, deactivated_key=401,
                            anonymous=401)

# Non-admin routes: route -> [(path template, expectations)]. Templates name world ids.
ROUTES: dict[str, list[tuple[str, dict]]] = {
    "": [("/", ALL_200)],
    "healthz": [("/healthz", ALL_200)],
    "readyz": [("/readyz", ALL_200)],
    # The test client calls from 127.0.0.1, which KB_METRICS_ALLOWED_IPS admits by default.
    "metrics": [("/metrics", ALL_200)],
    "admin/usage/": [("/admin/usage/", ADMIN_ONLY),
                     ("/admin/usage/?format=csv", ADMIN_ONLY)],
    # Public, but a bad key is still refused rather than ignored.
    "api/schema/": [("/api/schema/", _expect(others=200, revoked_key=401, deactivated_key=401))],
    "api/docs/": [("/api/docs/", _expect(others=200, revoked_key=401, deactivated_key=401))],
    "api/v1/collections/": [("/api/v1/collections/", API_READ)],
    "api/v1/collections/<slug:slug>/": [
        ("/api/v1/collections/general/", API_READ),
        ("/api/v1/collections/a-private/", _expect(superuser=200, others=404, revoked_key=401,
                                                   deactivated_key=401, anonymous=401)),
    ],
    "api/v1/documents/": [("/api/v1/documents/", API_READ),
                          ("/api/v1/documents/?status=disabled", API_READ)],
    "api/v1/documents/<int:pk>/": [
        ("/api/v1/documents/{doc_a}/", _expect(superuser=200, others=404, revoked_key=401,
                                                deactivated_key=401, anonymous=401)),
        ("/api/v1/documents/{doc_b}/", _expect(superuser=200, user=200, others=404,
                                                revoked_key=401, deactivated_key=401,
                                                anonymous=401)),
        ("/api/v1/documents/{doc_public}/", API_READ),
        # Editors see a disabled document, as in the admin: they are the ones to enable it.
        ("/api/v1/documents/{doc_disabled}/", API_EDITORS_ONLY),
    ],
    # The admin's document actions and the caller's keys: writes (test_write_access_matrix);
    # a GET is refused by method once the caller is known.
    "api/v1/documents/<int:pk>/disable/": [("/api/v1/documents/{doc_public}/disable/", API_POST)],
    "api/v1/documents/<int:pk>/enable/": [("/api/v1/documents/{doc_disabled}/enable/", API_POST)],
    "api/v1/documents/<int:pk>/reprocess/": [
        ("/api/v1/documents/{doc_public}/reprocess/", API_POST)],
    "api/v1/documents/<int:pk>/replace/": [("/api/v1/documents/{doc_public}/replace/", API_POST)],
    "api/v1/keys/": [("/api/v1/keys/", API_READ)],
    "api/v1/keys/<int:pk>/": [
        ("/api/v1/keys/{key_editor}/", _expect(staff=200, others=404, revoked_key=401,
                                               deactivated_key=401, anonymous=401))],
    "api/v1/chunks/": [("/api/v1/chunks/", API_READ)],
    "api/v1/chunks/<int:pk>/": [
        ("/api/v1/chunks/{chunk_a}/", _expect(superuser=200, others=404, revoked_key=401,
                                               deactivated_key=401, anonymous=401)),
        ("/api/v1/chunks/{chunk_disabled}/", API_EDITORS_ONLY),
    ],
    # Words of every document but none of the markers: the response echoes the query.
    "api/v1/search": [("/api/v1/search?query=board+approved+senior+engineers+retired+business"
                       "+class+cafeteria+soup&k=20", API_READ)],
    "chat/": [("/chat/", LOGIN_PAGE)],
    "api/v1/chat": [("/api/v1/chat", _expect(others=405))],
    "api/v1/chat/messages/<uuid:pk>": [
        ("/api/v1/chat/messages/{answer_b_private}",
         _expect(user=200, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
        ("/api/v1/chat/messages/{answer_b_general}",
         _expect(user=200, narrowed_key=200, others=404, revoked_key=401, deactivated_key=401,
                 anonymous=401)),
        ("/api/v1/chat/messages/{answer_a_private}", API_HIDDEN),
    ],
    # Nobody has voted on it: 404 for the ones who may vote, as for those who may not.
    "api/v1/chat/messages/<uuid:pk>/feedback": [
        ("/api/v1/chat/messages/{answer_b_general}/feedback", API_HIDDEN)],
    "admin/quality/": [("/admin/quality/", ADMIN_ONLY)],
    "api/v1/conversations": [("/api/v1/conversations", API_READ),
                             ("/api/v1/conversations?owner=any", API_OPERATORS)],
    # The owner, and (read-only) whoever the conversation admin shows it to.
    "api/v1/conversations/<uuid:pk>": [
        ("/api/v1/conversations/{conversation_b_private}",
         _expect(superuser=200, user=200, others=404, revoked_key=401, deactivated_key=401,
                 anonymous=401)),
        ("/api/v1/conversations/{conversation_b_anywhere}",
         _expect(superuser=200, user=200, others=404, revoked_key=401, deactivated_key=401,
                 anonymous=401)),
        ("/api/v1/conversations/{conversation_b_general}",
         _expect(staff=200, user=200, narrowed_key=200, others=404, revoked_key=401,
                 deactivated_key=401, anonymous=401)),
        # The editor reads others' conversations as the admin shows them: not this one.
        ("/api/v1/conversations/{conversation_a_private}",
         _expect(superuser=200, others=404, revoked_key=401, deactivated_key=401,
                 anonymous=401)),
    ],
    "api/v1/conversations/<uuid:pk>/export": [
        ("/api/v1/conversations/{conversation_b_general}/export",
         _expect(user=200, narrowed_key=200, others=404, revoked_key=401, deactivated_key=401,
                 anonymous=401)),
        ("/api/v1/conversations/{conversation_a_private}/export?as=json", API_HIDDEN),
    ],
    "api/v1/conversations/<uuid:pk>/share": [
        ("/api/v1/conversations/{conversation_b_general}/share", API_POST)],
    # A shared conversation opens for people who may read every collection it cites.
    "chat/shared/<str:token>/": [
        ("/chat/shared/{share_b_private}/", _expect(superuser=200, user=200, editor=403,
                                                    others=302)),
        ("/chat/shared/{share_a_private}/", _expect(superuser=200, staff=403, user=403,
                                                    others=302)),
        ("/chat/shared/not-a-share-token/", _expect(staff=404, user=404, others=302)),
    ],
    "api/v1/embedding-models/": [("/api/v1/embedding-models/", API_MODEL_READERS)],
    "api/v1/embedding-models/<slug:key>/": [
        ("/api/v1/embedding-models/{embedding_model_key}/", API_MODEL_READERS)],
    "api/v1/embedding-models/<slug:key>/activate/": [
        ("/api/v1/embedding-models/{embedding_model_key}/activate/", API_POST)],
    "api/v1/embedding-models/<slug:key>/cancel/": [
        ("/api/v1/embedding-models/{embedding_model_key}/cancel/", API_POST)],
    "api/v1/embedding-models/<slug:key>/drop-vectors/": [
        ("/api/v1/embedding-models/{embedding_model_key}/drop-vectors/", API_POST)],
    "api/v1/quality/": [("/api/v1/quality/", API_OPERATORS)],
    "api/v1/golden-queries/": [("/api/v1/golden-queries/", API_SUPERUSER_ONLY)],
    "api/v1/golden-queries/<int:pk>/": [("/api/v1/golden-queries/{golden_a}/",
                                         API_SUPERUSER_ONLY)],
    # The admin's ledger, budgets and cache: model permissions, and no narrowed key.
    "api/v1/usage/": [("/api/v1/usage/", API_OPERATORS)],
    "api/v1/usage/report/": [("/api/v1/usage/report/", API_OPERATORS)],
    "api/v1/budgets/": [("/api/v1/budgets/", API_SUPERUSER_ONLY)],
    "api/v1/budgets/<int:pk>/": [("/api/v1/budgets/{budget}/", API_SUPERUSER_ONLY)],
    "api/v1/answer-cache/": [("/api/v1/answer-cache/", API_OPERATORS)],
    "api/v1/answer-cache/<int:pk>/": [
        ("/api/v1/answer-cache/{cache_a}/", _expect(superuser=200, editor=404, others=403,
                                                     revoked_key=401, deactivated_key=401,
                                                     anonymous=401))],
    # Key-only endpoints: a session is not enough.
    "v1/chat/completions": [("/v1/chat/completions", _expect(others=405))],
    "v1/models": [("/v1/models", _expect(narrowed_key=200, others=401))],
    "documents/<int:pk>/": [
        ("/documents/{doc_a}/", _expect(superuser=200, editor=404, user=404, others=302)),
        ("/documents/{doc_b}/", _expect(superuser=200, editor=404, user=200, others=302)),
        ("/documents/{doc_public}/", LOGIN_PAGE),
        ("/documents/{doc_disabled}/", _expect(superuser=404, editor=404, user=404, others=302)),
    ],
    # The admin's own pages (its model pages come from ADMIN_MODELS).
    "admin/": [("/admin/", ADMIN_ONLY)],
    "admin/login/": [("/admin/login/", _expect(superuser=302, editor=302, others=200))],
    "admin/logout/": [("/admin/logout/", _expect(staff=405, others=302))],
    "admin/password_change/": [("/admin/password_change/", ADMIN_ONLY)],
    "admin/password_change/done/": [("/admin/password_change/done/", ADMIN_ONLY)],
    "admin/autocomplete/": [
        ("/admin/autocomplete/?app_label=kb&model_name=document&field_name=collection"
         "&term=private", ADMIN_ONLY),
    ],
    "admin/jsi18n/": [("/admin/jsi18n/", ADMIN_ONLY)],
    "admin/^(?P<app_label>auth|django_q|axes|kb|search|chat)/$": [
        ("/admin/kb/", ADMIN_ONLY), ("/admin/chat/", ADMIN_ONLY),
        ("/admin/search/", _expect(superuser=200, editor=404, others=302)),
        ("/admin/auth/", _expect(superuser=200, editor=404, others=302)),
        ("/admin/django_q/", _expect(superuser=200, editor=404, others=302)),
        ("/admin/axes/", _expect(superuser=200, editor=404, others=302)),
    ],
    # The chat users' sign-in page: signed-in users are sent on to the chat.
    "accounts/login/": [("/accounts/login/", _expect(superuser=302, editor=302, user=302,
                                                     others=200))],
    "accounts/logout/": [("/accounts/logout/", _expect(others=405))],
    "favicon.ico": [("/favicon.ico", _expect(others=301))],
    "admin/(?P<url>.*)$": [("/admin/no-such-page/", _expect(staff=404, others=302))],
    "admin/r/<path:content_type_id>/<path:object_id>/": [
        # Redirects to the document's source page, which applies the reader's access.
        ("/admin/r/{document_content_type}/{doc_a}/", _expect(others=302)),
    ],
    "admin/kb/document/upload/": [("/admin/kb/document/upload/", ADMIN_ONLY)],
    "admin/kb/document/progress/": [
        ("/admin/kb/document/progress/?ids={doc_a},{doc_public}", ADMIN_ONLY),
    ],
    "admin/kb/embeddingmodel/<int:pk>/activate-override/": [
        ("/admin/kb/embeddingmodel/{embedding_model}/activate-override/",
         _expect(superuser=200, editor=403, others=302)),
    ],
    "admin/kb/embeddingmodel/reembed/": [
        ("/admin/kb/embeddingmodel/reembed/", _expect(superuser=200, editor=403, others=302)),
    ],
    "admin/auth/user/<id>/password/": [
        ("/admin/auth/user/{user_a}/password/", _expect(superuser=200, editor=403, others=302)),
    ],
}

# Each registered model: (object ids the change views open, expectations for superuser and
# editor per view). Non-staff roles are always sent to the login page (302).
# Views: changelist, add, change, history, delete, redirect (<id>/ -> <id>/change/).
_NO_PERM = {"changelist": 403, "add": 403, "change": 403, "history": 403, "delete": 403,
            "redirect": 302}
_FULL = {"changelist": 200, "add": 200, "change": 200, "history": 200, "delete": 200,
         "redirect": 302}
_READ_ONLY = {**_FULL, "add": 403, "delete": 200}
# An object outside the editor's collections: the admin acts as if it did not exist.
_HIDDEN = {"changelist": 200, "add": 403, "change": 302, "history": 302, "delete": 403,
           "redirect": 302}
ADMIN_MODELS: dict[str, list[tuple[str, dict, dict]]] = {
    # Outside the editor's collections: its history redirects as if it did not exist.
    "search.goldenquery": [("{golden_a}", _FULL, {**_NO_PERM, "history": 302})],
    "auth.group": [("{group}", _FULL, _NO_PERM)],
    "auth.user": [("{user_a}", _FULL, _NO_PERM)],
    # No task rows exist: history finds no object and redirects before checking permissions.
    "django_q.schedule": [("0", {**_FULL, "change": 302, "history": 302, "delete": 302},
                           {**_NO_PERM, "history": 302})],
    "django_q.success": [("0", {**_FULL, "add": 403, "change": 302, "history": 302,
                                "delete": 302}, {**_NO_PERM, "history": 302})],
    "django_q.failure": [("0", {**_FULL, "add": 403, "change": 302, "history": 302,
                                "delete": 302}, {**_NO_PERM, "history": 302})],
    "django_q.ormq": [("0", {**_FULL, "add": 403, "change": 302, "history": 302,
                             "delete": 302}, {**_NO_PERM, "history": 302})],
    "kb.collection": [("{collection_a}", _FULL, {**_HIDDEN}),
                      ("{collection_general}", _FULL,
                       {**_HIDDEN, "change": 200, "history": 200})],
    "kb.document": [("{doc_a}", {**_FULL, "add": 403}, _HIDDEN),
                    ("{doc_public}", {**_FULL, "add": 403},
                     {**_HIDDEN, "change": 200, "history": 200}),
                    ("{doc_disabled}", {**_FULL, "add": 403},
                     {**_HIDDEN, "change": 200, "history": 200})],
    "kb.embeddingmodel": [("{embedding_model}", {**_FULL, "add": 403, "delete": 403},
                           _NO_PERM)],
    "kb.usagerecord": [("{usage_a}", _READ_ONLY, _HIDDEN),
                       ("{usage_plain}", _READ_ONLY, {**_HIDDEN, "change": 200, "history": 200})],
    "kb.apikey": [("{key_root}", _FULL, {**_HIDDEN, "add": 200}),
                  ("{key_editor}", _FULL, {**_HIDDEN, "add": 200, "change": 200,
                                           "history": 200})],
    "chat.budget": [("{budget}", _FULL, _NO_PERM)],
    "chat.conversation": [("{conversation_a_private}", _READ_ONLY, _HIDDEN),
                          ("{conversation_a_anywhere}", _READ_ONLY, _HIDDEN),
                          ("{conversation_b_general}", _READ_ONLY,
                           {**_HIDDEN, "change": 200, "history": 200})],
    "chat.message": [("{answer_a_private}", _READ_ONLY, _HIDDEN),
                     ("{answer_a_anywhere}", _READ_ONLY, _HIDDEN),
                     ("{answer_b_general}", _READ_ONLY, {**_HIDDEN, "change": 200,
                                                         "history": 200})],
    "chat.answercacheentry": [("{cache_a}", _READ_ONLY, _HIDDEN)],
    # django-axes' login records (no rows exist): superusers only, never added by hand.
    "axes.accessattempt": [("0", {**_FULL, "add": 403, "change": 302, "history": 302,
                                  "delete": 302}, {**_NO_PERM, "history": 302})],
    "axes.accesslog": [("0", {**_FULL, "add": 403, "change": 302, "history": 302,
                              "delete": 302}, {**_NO_PERM, "history": 302})],
    "axes.accessfailurelog": [("0", {**_FULL, "add": 403, "change": 302, "history": 302,
                                     "delete": 302}, {**_NO_PERM, "history": 302})],
}
_ADMIN_VIEWS = {"changelist": "", "add": "add/", "change": "<path:object_id>/change/",
                "history": "<path:object_id>/history/", "delete": "<path:object_id>/delete/",
                "redirect": "<path:object_id>/"}


def _routes(resolver=None, prefix: str = ""):
    for pattern in (resolver or get_resolver()).url_patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern)


def _route_of_admin_model(route: str) -> str | None:
    """The model label of an admin model route (admin/kb/document/add/ -> kb.document)."""
    parts = route.split("/")
    labels = {f"{m._meta.app_label}.{m._meta.model_name}" for m in admin.site._registry}
    if len(parts) >= 4 and parts[0] == "admin" and f"{parts[1]}.{parts[2]}" in labels:
        return f"{parts[1]}.{parts[2]}"
    return None


def cases() -> list[tuple[str, str, str, dict]]:
    """(role, route, path template, expectation) for every row; the whole matrix."""
    rows = []
    for route, entries in ROUTES.items():
        for template, expected in entries:
            rows += [(role, route, template, expected[role]) for role in ROLES]
    for model in admin.site._registry:
        label = f"{model._meta.app_label}.{model._meta.model_name}"
        app, name = label.split(".")
        for object_id, superuser, editor in ADMIN_MODELS.get(label, []):
            for view, suffix in _ADMIN_VIEWS.items():
                if view in {"changelist", "add"} and object_id != ADMIN_MODELS[label][0][0]:
                    continue  # one changelist and add page per model
                path = f"/admin/{app}/{name}/{suffix.replace('<path:object_id>', object_id)}"
                by_role = _expect(superuser=superuser[view], editor=editor[view], others=302)
                rows += [(role, f"admin/{app}/{name}/{suffix}", path, by_role[role])
                         for role in ROLES]
    return rows


def test_every_route_and_admin_model_has_a_row():
    """A new URL pattern or a newly registered admin model fails here until it gets a row."""
    covered = {route for _, route, _, _ in cases()}
    missing_models = sorted(
        f"{m._meta.app_label}.{m._meta.model_name}" for m in admin.site._registry
        if f"{m._meta.app_label}.{m._meta.model_name}" not in ADMIN_MODELS
    )
    assert missing_models == []
    missing = []
    for route in _routes():
        model = _route_of_admin_model(route)
        if model is not None and route.removeprefix(f"admin/{model.replace('.', '/')}/") in (
                set(_ADMIN_VIEWS.values())):
            continue  # generated from ADMIN_MODELS for every registered model
        if route not in covered:
            missing.append(route)
    assert missing == []


@pytest.fixture
def world(django_user_model, ingest_one, settings):
    with FakeOpenAIServer(chat_reply="Here is the answer [1].") as server:
        settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [{
            "BACKEND": "kb.providers.openai.OpenAIChat", "MODEL": "gpt-4o-mini",
            "base_url": server.base_url, "api_key": "sk-test", "max_attempts": 1,
        }]}
        yield _build_world(django_user_model, ingest_one)


def _build_world(django_user_model, ingest_one) -> dict:
    general = collection_get_or_create(slug="general")
    collection_a = collection_get_or_create(slug="a-private")
    collection_b = collection_get_or_create(slug="b-private")
    root = django_user_model.objects.create_superuser("root", password="pw-root-1111")
    editor = django_user_model.objects.create_user("editor", password="pw-editor-11", is_staff=True)
    editor.user_permissions.add(*Permission.objects.filter(codename__in=EDITOR_PERMISSIONS))
    user_a = django_user_model.objects.create_user("user-a", password="pw-user-a-11")
    user_b = django_user_model.objects.create_user("user-b", password="pw-user-b-11")
    gone = django_user_model.objects.create_user("gone", password="pw-gone-11111")
    for collection, reader in ((collection_a, user_a), (collection_b, user_b)):
        collection.is_public = False
        collection.save()
        collection.allowed_users.add(reader)
    doc_a = ingest_one(collection_a, "nightjar.md", A_DOC)
    doc_b = ingest_one(collection_b, "quokka.md", B_DOC)
    doc_public = ingest_one(general, "cafeteria.md", PUBLIC_DOC)
    doc_disabled = ingest_one(general, "wombat.md", DISABLED_DOC)
    document_disable(document=doc_disabled)

    def ask(user, question, collection=None) -> tuple[str, str]:
        client = Client()
        client.force_login(user)
        body = {"message": question, "stream": False,
                **({"collection": collection} if collection else {})}
        response = client.post("/api/v1/chat", data=json.dumps(body),
                               content_type="application/json")
        assert response.status_code == 200, response.content
        return response.json()["conversation_id"], response.json()["message_id"]

    ids = {}
    for name, user, question, collection in (
        ("a_private", user_a, "What does Project Nightjar buy?", "a-private"),
        ("a_anywhere", user_a, "When does the Nightjar deal with Harbour Tides close?", None),
        ("b_private", user_b, "Where does the Quokka salary band start?", "b-private"),
        ("b_anywhere", user_b, "What is the Quokka band for senior engineers?", None),
        ("b_general", user_b, "When does the cafeteria open?", "general"),
    ):
        ids[f"conversation_{name}"], ids[f"answer_{name}"] = ask(user, question, collection)

    def key(user, name, collections=()):
        raw, prefix = api_key_generate()
        row = ApiKey.objects.create(name=name, prefix=prefix, hashed_key=api_key_hash(raw),
                                    user=user)
        row.collections.set(collections)
        return raw, row

    narrowed, _ = key(user_b, "general only", [general])
    revoked, revoked_row = key(user_a, "revoked")
    ApiKey.objects.filter(pk=revoked_row.pk).update(revoked_at=timezone.now())
    deactivated, _ = key(gone, "left the company")
    gone_session = _session(gone)  # signed in before the account was deactivated
    gone.is_active = False
    gone.save()
    _, key_root = key(root, "root's key")
    _, key_editor = key(editor, "editor's key")
    cache_a = AnswerCacheEntry.objects.filter(collection=collection_a).first()
    assert cache_a is not None
    usage_a = UsageRecord.objects.create(kind=UsageRecord.Kind.EMBEDDING, provider="local",
                                         document=doc_a)
    usage_plain = UsageRecord.objects.create(kind=UsageRecord.Kind.SEARCH, provider="kb")
    from django.contrib.contenttypes.models import ContentType

    world = {
        **ids,
        "clients": {
            "superuser": _session(root), "editor": _session(editor), "user": _session(user_b),
            "narrowed_key": Client(HTTP_AUTHORIZATION=f"Bearer {narrowed}"),
            "revoked_key": Client(HTTP_AUTHORIZATION=f"Bearer {revoked}"),
            "deactivated_key": Client(HTTP_AUTHORIZATION=f"Bearer {deactivated}"),
            "deactivated_user": gone_session,
            "anonymous": Client(),
        },
        "doc_a": doc_a.pk, "doc_b": doc_b.pk, "doc_public": doc_public.pk,
        "doc_disabled": doc_disabled.pk,
        "chunk_a": Chunk.objects.filter(document=doc_a).first().pk,
        "chunk_disabled": Chunk.objects.filter(document=doc_disabled).first().pk,
        "collection_a": collection_a.pk, "collection_general": general.pk,
        "user_a": user_a.pk, "group": Group.objects.create(name="readers").pk,
        "embedding_model": EmbeddingModel.objects.get(is_active=True).pk,
        "embedding_model_key": EmbeddingModel.objects.get(is_active=True).key,
        "golden_a": golden_query_save(collection=collection_a, question="What does Nightjar buy?",
                                      documents=[doc_a]).pk,
        "share_a_private": conversation_share(
            conversation=Conversation.objects.get(pk=ids["conversation_a_private"])).share_token,
        "share_b_private": conversation_share(
            conversation=Conversation.objects.get(pk=ids["conversation_b_private"])).share_token,
        "usage_a": usage_a.pk, "usage_plain": usage_plain.pk,
        "key_root": key_root.pk, "key_editor": key_editor.pk,
        "budget": Budget.objects.create(scope=Budget.Scope.USER, user=user_a,
                                        daily_token_limit=1000).pk,
        "cache_a": cache_a.pk,
        "document_content_type": ContentType.objects.get(app_label="kb", model="document").pk,
    }
    assert Message.objects.get(pk=ids["answer_a_private"]).cited
    assert Conversation.objects.count() == 5
    return world


def _session(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _leaks(role: str, body: str) -> list[str]:
    readable = READS.get(role, set())
    return [marker for secret, markers in MARKERS.items() if secret not in readable
            for marker in markers if marker in body]


@pytest.mark.slow
def test_access_matrix(world):
    """Every (role, path) gets its expected status and shows nothing the role may not read."""
    failures = []
    matrix = cases()
    for role, _route, template, expected in matrix:
        path = template.format(**world)
        response = world["clients"][role].get(path)
        body = b"".join(response.streaming_content) if response.streaming else response.content
        text = body.decode("utf-8", "replace")
        status_ok = response.status_code in expected
        leaks = _leaks(role, text)
        if not status_ok or leaks:
            failures.append(f"{role:16} {path:70} {response.status_code} "
                            f"(expected {sorted(expected)}) leaks={leaks}")
    print(f"access matrix: {len(matrix)} cases")
    assert failures == [], "\n".join(failures)


# The writes, each in a transaction rolled back after it: (method, path, statuses by role).
# The editor holds change_document but not delete_document; user-b (and the narrowed key,
# which is user-b's) may read the public collection but holds neither.
WRITES = [
    # No body: the permission is checked first, then the (missing) fields.
    ("post", "/api/v1/collections/",
     _expect(superuser=400, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("patch", "/api/v1/collections/general/",
     _expect(superuser=200, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/collections/a-private/?force=true",
     _expect(superuser=204, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/collections/general/",
     _expect(superuser=409, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("post", "/api/v1/documents/{doc_public}/disable/",
     _expect(staff=200, user=403, narrowed_key=403, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    ("post", "/api/v1/documents/{doc_a}/disable/",
     _expect(superuser=200, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("post", "/api/v1/documents/{doc_disabled}/enable/",
     _expect(staff=200, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("post", "/api/v1/documents/{doc_public}/reprocess/",
     _expect(staff=202, user=403, narrowed_key=403, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    # No file: the permission is checked first.
    ("post", "/api/v1/documents/{doc_public}/replace/",
     _expect(staff=400, user=403, narrowed_key=403, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    # No body: nothing to change, once the permission is checked.
    ("patch", "/api/v1/documents/{doc_public}/",
     _expect(staff=200, user=403, narrowed_key=403, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    ("patch", "/api/v1/documents/{doc_a}/",
     _expect(superuser=200, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/documents/{doc_public}/",
     _expect(superuser=204, editor=403, user=403, narrowed_key=403, revoked_key=401,
             deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/documents/{doc_b}/",
     _expect(superuser=204, editor=404, user=403, narrowed_key=404, revoked_key=401,
             deactivated_key=401, anonymous=401)),
    # Only the owner; with no body a rename is a 400 (the conversation was found first).
    ("patch", "/api/v1/conversations/{conversation_b_general}",
     _expect(user=400, narrowed_key=400, others=404, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    ("delete", "/api/v1/conversations/{conversation_b_private}",
     _expect(user=204, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("post", "/api/v1/conversations/{conversation_b_general}/share",
     _expect(user=200, narrowed_key=200, others=404, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    ("delete", "/api/v1/conversations/{conversation_a_private}/share",
     _expect(others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("post", "/api/v1/embedding-models/{embedding_model_key}/cancel/",
     _expect(superuser=200, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    # The active model's vectors serve search: refused (400) even to the superuser.
    ("post", "/api/v1/embedding-models/{embedding_model_key}/drop-vectors/",
     _expect(superuser=400, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("post", "/api/v1/embedding-models/",
     _expect(superuser=400, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    # Only the asker votes; with no body the vote is a 400 once the answer is found.
    ("put", "/api/v1/chat/messages/{answer_b_general}/feedback",
     _expect(user=400, narrowed_key=400, others=404, revoked_key=401, deactivated_key=401,
             anonymous=401)),
    ("post", "/api/v1/budgets/",
     _expect(superuser=400, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/budgets/{budget}/",
     _expect(superuser=204, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/golden-queries/{golden_a}/",
     _expect(superuser=204, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/answer-cache/",
     _expect(superuser=204, others=403, revoked_key=401, deactivated_key=401, anonymous=401)),
    # No body: nothing to change, once the key is found among the caller's.
    ("patch", "/api/v1/keys/{key_editor}/",
     _expect(staff=200, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/keys/{key_editor}/",
     _expect(staff=204, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
    ("delete", "/api/v1/keys/{key_root}/",
     _expect(superuser=204, others=404, revoked_key=401, deactivated_key=401, anonymous=401)),
]


@pytest.mark.slow
def test_write_access_matrix(world):
    """Every role × the management writes: the admin's permissions plus collection access."""
    from django.db import transaction

    failures = []
    for method, template, expected in WRITES:
        for role in ROLES:
            path = template.format(**world)
            with transaction.atomic():
                response = getattr(world["clients"][role], method)(path)
                transaction.set_rollback(True)
            leaks = _leaks(role, response.content.decode("utf-8", "replace"))
            if response.status_code not in expected[role] or leaks:
                failures.append(f"{role:16} {method.upper():6} {path:50} {response.status_code} "
                                f"(expected {sorted(expected[role])}) leaks={leaks}")
    assert failures == [], "\n".join(failures)
