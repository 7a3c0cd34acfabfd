"""Chat fixtures: a small ingested corpus, a fake OpenAI server wired into the cascade."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from kb.models import ApiKey, UsageRecord
from kb.services.api_keys import api_key_generate, api_key_hash
from tests.fakes.openai_server import FakeOpenAIServer

HANDBOOK = """# Operations handbook

## Backups

The database is backed up every night at 02:00 UTC. Backups are kept for 30 days in the
object store, encrypted with the operations key.

To restore a backup, run the restore command with the date of the backup. A restore of a
10 GB database takes about ten minutes.

## Uploads

Uploaded PDF files are limited to 50 MB each. Zip archives are unpacked, and every member
of the archive becomes its own document.

## Vacation

Employees receive 25 vacation days per year. Unused vacation days expire at the end of
March of the following year. Requests for vacation go to the team lead two weeks ahead.
"""

# A reply that cites the first passage, as a well-behaved model would.
CITED_REPLY = "Backups run every night at 02:00 UTC [1]. They are kept for 30 days [1]."
QUESTION = "How often is the database backed up?"


def chat_entry(server: FakeOpenAIServer, model: str = "gpt-4o-mini", **options: Any) -> dict:
    """A KB_PROVIDERS chat entry for an OpenAIChat talking to the fake server."""
    return {
        "BACKEND": "kb.providers.openai.OpenAIChat",
        "MODEL": model,
        "base_url": server.base_url,
        "api_key": "sk-test",
        # One attempt and short timeouts: the cascade, not the backend, is under test.
        "max_attempts": options.pop("max_attempts", 1),
        "first_token_timeout": options.pop("first_token_timeout", 5.0),
        "timeout": options.pop("timeout", 10.0),
        **options,
    }


EXTRACTIVE_ENTRY = {"BACKEND": "kb.providers.extractive.ExtractiveChat", "MODEL": "extractive"}


@pytest.fixture(autouse=True)
def _fresh_breakers(settings):
    """Each test starts with every circuit closed and predictable chat settings."""
    from chat import circuit

    settings.KB_CIRCUIT_FAILURES = 3
    settings.KB_CIRCUIT_COOLDOWN_SECONDS = 30.0
    settings.KB_CHAT_HEARTBEAT_SECONDS = 10.0
    settings.KB_BUDGET_GLOBAL_DAILY_TOKENS = 0
    settings.KB_BUDGET_USER_DAILY_TOKENS = 0
    settings.KB_BUDGET_API_KEY_DAILY_TOKENS = 0
    circuit.breakers_reset()
    yield
    circuit.breakers_reset()


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(chat_reply=CITED_REPLY) as server:
        yield server


@pytest.fixture
def generative(settings, openai_server) -> FakeOpenAIServer:
    """The cascade: the fake OpenAI model first, then the extractive answerer."""
    settings.KB_PROVIDERS = {
        **settings.KB_PROVIDERS, "chat": [chat_entry(openai_server), EXTRACTIVE_ENTRY],
    }
    return openai_server


@pytest.fixture
def extractive_only(settings) -> None:
    """No model configured: the extractive answerer alone, as on a fresh offline install."""
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [EXTRACTIVE_ENTRY]}


@pytest.fixture
def corpus(collection, ingest_one):
    """The docs collection with the handbook ingested for real (one document keeps it fast)."""
    handbook = ingest_one(collection, "handbook.md", HANDBOOK)
    assert handbook.status == "ready"
    return collection


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("asker", password="pw-asker-123")


@pytest.fixture
def api_key_pair(user) -> tuple[str, ApiKey]:
    """A real key for `user`, made the way the admin makes one: (raw key, row)."""
    raw, prefix = api_key_generate()
    key = ApiKey.objects.create(name="test", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    return raw, key


def run_events(**kwargs: Any) -> list:
    """Every event of one answer_stream run, collected from sync test code."""
    from chat.services import answer_stream

    async def collect() -> list:
        return [event async for event in answer_stream(**kwargs)]

    return async_to_sync(collect)()


def ask(question: str, *, user, collection: str | None = "docs", conversation_id=None,
        api_key=None, **kwargs: Any) -> list:
    """answer_stream's events for one question."""
    return run_events(question=question, conversation_id=conversation_id,
                      collection_slug=collection, user=user, api_key=api_key, **kwargs)


def chat_requests(server: FakeOpenAIServer) -> list:
    """The chat completion requests the fake server received."""
    return server.requests_to("/v1/chat/completions")


def chat_usage() -> list[UsageRecord]:
    """The chat rows of the usage ledger, oldest first."""
    return list(UsageRecord.objects.filter(kind=UsageRecord.Kind.CHAT).order_by("created_at"))


def of_type(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def text_of(events: list) -> str:
    from chat.events import Delta

    return "".join(event.text for event in of_type(events, Delta))


def kinds(events: list) -> list[str]:
    """Event class names in order, consecutive deltas collapsed into one."""
    names: list[str] = []
    for event in events:
        name = type(event).__name__
        if not (names and name == names[-1] == "Delta"):
            names.append(name)
    return names


Asker = Callable[..., list]


@pytest.fixture
def private_and_public(django_user_model, ingest_one):
    """A public "general" collection and a restricted one readable by one user, each with a
    document ingested for real; returns them, the user and `ask` through the chat API as that
    user (stream off)."""
    import json

    from django.test import Client

    from kb.services.collections import collection_get_or_create

    def _make(*, username: str, slug: str, private_doc: tuple[str, str],
              public_doc: tuple[str, str]):
        general = collection_get_or_create(slug="general")
        private = collection_get_or_create(slug=slug)
        private.is_public = False
        private.save()
        user = django_user_model.objects.create_user(username, password=f"pw-{username}-11")
        private.allowed_users.add(user)
        ingest_one(private, *private_doc)
        ingest_one(general, *public_doc)
        session = Client()
        session.force_login(user)

        def ask(question: str, collection: str | None = None) -> dict:
            body = {"message": question, "stream": False,
                    **({"collection": collection} if collection else {})}
            response = session.post("/api/v1/chat", data=json.dumps(body),
                                    content_type="application/json")
            assert response.status_code == 200, response.content
            return response.json()

        return general, private, user, ask

    return _make
