"""Secrets never reach the logs; questions and answers appear only as fingerprints.

The policy (docs/RELIABILITY.md, "Logs"): log lines carry `sha256:<12 hex>` fingerprints
of questions, prompts and answers (kb.ops.log_privacy.text_fingerprint), never the text,
unless KB_LOG_CONTENT=true; LOG_LEVEL=DEBUG alone does not log content. Credentials
(API keys, bearer tokens, provider keys, SECRET_KEY, passwords in URLs) never appear,
whatever the level: kb.ops.log_privacy.RedactingFilter on the console handler is the last
line of defence.

The helpers' own tests are in tests/kb/test_log_privacy.py. These end-to-end tests run a
real chat (whose upstream misbehaves: it answers 401 and echoes the provider key, and its
base URL carries a proxy password) and real searches
(one of them rate limited, which makes django.request log the request) with known
secrets in settings, and read what the production handler (settings.LOGGING's console
handler: its filters, the JSON and the plain formatter) would have written.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils.module_loading import import_string

from kb.models import ApiKey
from kb.ops.log_privacy import RedactingFilter, text_fingerprint
from kb.ops.observability import JsonFormatter
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.collections import collection_get_or_create
from tests.fakes.openai_server import FakeOpenAIServer, Fault

QUESTION = "What is the vacation allowance for the night shift in Lisbon?"
SEARCH_QUERY = "confidential merger codename bluebird"
SECRET_KEY = "known-django-secret-key-7c1f0e9d2b"
OPENAI_KEY = "sk-live-KNOWNprovider0123456789abcdef"
DB_PASSWORD = "db-pass-known-4471"
PROXY_PASSWORD = "proxy-pass-known-9921"
HANDBOOK = """# Handbook

## Vacation

Night shift staff in Lisbon receive 27 vacation days per year. Requests go to the team lead.
"""


# --- End to end: what a real chat and real searches put in the logs -------------------------


def production_handler(stream: io.StringIO, formatter: logging.Formatter,
                       *, extra_filters: tuple = ()) -> logging.Handler:
    """A StreamHandler built like settings.LOGGING's console handler (its filters, in order)."""
    handler = logging.StreamHandler(stream)
    config = django_settings.LOGGING
    for name in config["handlers"]["console"].get("filters", []):
        spec = dict(config["filters"][name])
        factory = spec.pop("()")
        handler.addFilter(import_string(factory)(**spec) if isinstance(factory, str)
                          else factory(**spec))
    for extra in extra_filters:
        handler.addFilter(extra)
    handler.setFormatter(formatter)
    handler.setLevel(logging.INFO)
    return handler


@pytest.fixture
def logged(settings, django_user_model, caplog, ingest_one):
    """Run one chat and two searches; return (records seen by caplog, {"json": text,
    "plain": text, "json+filter": text} as written by the production handler at INFO,
    the answer, the raw API key)."""
    from tests.chat.conftest import EXTRACTIVE_ENTRY

    settings.SECRET_KEY = SECRET_KEY
    settings.OPENAI_API_KEY = OPENAI_KEY
    settings.DATABASE_URL = f"postgresql://kb:{DB_PASSWORD}@db.example:5432/kb"
    settings.KB_LOG_CONTENT = False
    settings.RATELIMIT_ENABLE = True
    settings.KB_RATELIMITS = {**settings.KB_RATELIMITS, "search": "1/m"}
    from django.core.cache import cache

    cache.clear()
    collection = collection_get_or_create(slug="docs")
    assert ingest_one(collection, "handbook.md", HANDBOOK).status == "ready"
    user = django_user_model.objects.create_user("privacy", password="pw-privacy-123")
    raw_key, prefix = api_key_generate()
    ApiKey.objects.create(name="k", prefix=prefix, hashed_key=api_key_hash(raw_key), user=user)

    streams = {name: io.StringIO() for name in ("json", "plain", "json+filter")}
    handlers = [
        production_handler(streams["json"], JsonFormatter()),
        production_handler(streams["plain"], logging.Formatter(
            django_settings.LOGGING["formatters"]["plain"]["format"])),
        production_handler(streams["json+filter"], JsonFormatter(),
                           extra_filters=(RedactingFilter(),)),
    ]
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    caplog.set_level(logging.INFO)
    try:
        with FakeOpenAIServer(chat_reply="Night shift staff get 27 days [1].") as upstream:
            # A misbehaving compatible server: 401, echoing the key it was sent.
            upstream.enqueue(Fault(status=401, message=f"Incorrect API key provided: {OPENAI_KEY}"))
            base_url = upstream.base_url.replace("http://", f"http://proxy:{PROXY_PASSWORD}@")
            settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [
                {"BACKEND": "kb.providers.openai.OpenAIChat", "MODEL": "gpt-4o-mini",
                 "base_url": base_url, "api_key": OPENAI_KEY, "max_attempts": 1,
                 "first_token_timeout": 5.0, "timeout": 10.0},
                EXTRACTIVE_ENTRY,
            ]}
            client = Client(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
            answer = client.post("/api/v1/chat", content_type="application/json",
                                 data=json.dumps({"message": QUESTION, "stream": False}))
            assert answer.status_code == 200, answer.content
            first = client.get("/api/v1/search", {"query": SEARCH_QUERY})
            limited = client.get("/api/v1/search", {"query": SEARCH_QUERY})
            assert (first.status_code, limited.status_code) == (200, 429)
            assert len(upstream.requests) == 1
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(previous_level)
        cache.clear()
    answer_text = answer.json()["answer"]
    records = list(caplog.records)  # the setup phase's records: this fixture's requests
    outputs = {name: stream.getvalue() for name, stream in streams.items()}
    return records, outputs, answer_text, raw_key


SECRETS = [SECRET_KEY, OPENAI_KEY, DB_PASSWORD, PROXY_PASSWORD]


@pytest.mark.django_db
def test_log_messages_never_contain_the_question_or_the_answer(logged):
    """At INFO, with KB_LOG_CONTENT off, no record's message has the raw question, search
    query or answer: the code logs fingerprints, not content (checked before any filter)."""
    records, _, answer_text, _ = logged
    messages = "\n".join(record.getMessage() for record in records)
    assert messages, "the requests logged nothing at all"
    for content in (QUESTION, SEARCH_QUERY, answer_text):
        assert content not in messages


@pytest.mark.django_db
def test_with_the_redacting_filter_no_secret_or_content_is_written(logged):
    """The production handler plus RedactingFilter: no secret, no key, no content, in JSON."""
    _, outputs, answer_text, raw_key = logged
    output = outputs["json+filter"]
    assert "POST /api/v1/chat" in output
    for value in [*SECRETS, raw_key, QUESTION, SEARCH_QUERY, answer_text]:
        assert value not in output, value


@pytest.mark.django_db
def test_the_production_log_config_writes_no_secret_or_content(logged):
    """settings.LOGGING's console handler: neither the upstream's echoed key, the proxy
    password in the base URL, nor (JSON) the search query inside django.request's
    `request` extra reach the output."""
    _, outputs, answer_text, raw_key = logged
    for name in ("json", "plain"):
        for value in [*SECRETS, raw_key, QUESTION, SEARCH_QUERY, answer_text]:
            assert value not in outputs[name], (name, value)


@pytest.mark.django_db
def test_the_question_fingerprint_is_logged(logged):
    """An answer's log line names its question by fingerprint, so requests can be correlated."""
    records, _, _, _ = logged
    messages = "\n".join(record.getMessage() for record in records)
    assert text_fingerprint(QUESTION) in messages
