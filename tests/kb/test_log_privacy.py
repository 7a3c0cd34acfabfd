"""kb.ops.log_privacy: fingerprints instead of content, and redaction of credentials."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from kb.ops.log_privacy import REDACTED, RedactingFilter, loggable_text, redact, text_fingerprint
from kb.ops.observability import JsonFormatter

QUESTION = "What is the vacation allowance for the night shift in Lisbon?"
SEARCH_QUERY = "confidential merger codename bluebird"
SECRET_KEY = "known-django-secret-key-7c1f0e9d2b"
DB_PASSWORD = "db-pass-known-4471"


def test_text_fingerprint_is_a_short_stable_sha256_prefix():
    """Same text, same fingerprint; the text itself cannot be read back from it."""
    import hashlib

    fingerprint = text_fingerprint(QUESTION)
    assert fingerprint == "sha256:" + hashlib.sha256(QUESTION.encode()).hexdigest()[:12]
    assert fingerprint == text_fingerprint(QUESTION)
    assert text_fingerprint(QUESTION + " ") != fingerprint
    assert text_fingerprint("\ud800 lone surrogate").startswith("sha256:")  # never raises


def test_loggable_text_shows_content_only_when_asked(settings):
    """KB_LOG_CONTENT=false (the default): the fingerprint only; true: fingerprint and text."""
    settings.KB_LOG_CONTENT = False
    assert loggable_text(QUESTION) == text_fingerprint(QUESTION)
    settings.KB_LOG_CONTENT = True
    assert loggable_text(QUESTION).startswith(text_fingerprint(QUESTION))
    assert QUESTION in loggable_text(QUESTION)


@pytest.mark.parametrize(("text", "leaked"), [
    ("Authorization: Bearer kb_0a1b2c3d_Zm9vYmFyYmF6cXV4cXV1eA", "kb_0a1b2c3d_Zm9vYmFy"),
    ("{'authorization': 'Bearer abcdefghijklmnop'}", "abcdefghijklmnop"),
    ("key kb_deadbeef_AAAAAAAAAAAAAAAAAAAAAAAA was revoked", "kb_deadbeef_AAAA"),
    ("Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz", "sk-proj-abcdefgh"),
    ("connect postgresql://kb:hunter2hunter2@db.example:5432/kb", "hunter2hunter2"),
    ("proxy at https://user:pa55word@proxy.internal/v1 failed", "pa55word"),
])
def test_redact_removes_credentials_by_shape(text, leaked):
    """Tokens, API keys, provider keys and URL passwords are redacted wherever they appear."""
    cleaned = redact(text, secrets=[])
    assert leaked not in cleaned
    assert REDACTED in cleaned


def test_redact_removes_the_configured_secret_values(settings):
    """SECRET_KEY, OPENAI_API_KEY, the database password and provider api_keys, literally."""
    settings.SECRET_KEY = SECRET_KEY
    settings.OPENAI_API_KEY = "plain-provider-key-without-prefix"
    settings.DATABASE_URL = f"postgresql://kb:{DB_PASSWORD}@db/kb"
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "chat": [
        {"BACKEND": "x", "MODEL": "m", "api_key": "another-provider-key-42"}]}
    text = (f"{SECRET_KEY} plain-provider-key-without-prefix {DB_PASSWORD} "
            "another-provider-key-42 short")
    assert redact(text) == f"{REDACTED} {REDACTED} {REDACTED} {REDACTED} short"


def test_the_filter_redacts_messages_args_extras_requests_and_tracebacks(settings, rf):
    """One record with a secret in each place a formatter reads from."""
    settings.SECRET_KEY = SECRET_KEY
    try:
        raise RuntimeError(f"boom with {SECRET_KEY}")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "key %s and %s",
                               (SECRET_KEY, "Bearer kb_0a1b2c3d_Zm9vYmFyYmF6cXV4cXV1eA"), exc_info)
    record.detail = f"postgresql://kb:{DB_PASSWORD}@db/kb"
    record.request = rf.get("/api/v1/search", {"query": SEARCH_QUERY})

    assert RedactingFilter().filter(record) is True

    output = logging.Formatter("%(message)s %(detail)s %(request)s").format(record)
    assert SECRET_KEY not in output and DB_PASSWORD not in output
    assert "kb_0a1b2c3d" not in output and SEARCH_QUERY.split()[0] not in output
    assert "RuntimeError" in output  # the traceback is kept, redacted
    assert record.request == "GET /api/v1/search"
    payload = json.loads(JsonFormatter().format(record))
    assert SECRET_KEY not in payload["message"] and DB_PASSWORD not in payload["detail"]
    assert payload["request"] == "GET /api/v1/search"


def test_the_json_formatter_writes_the_redacted_traceback(settings):
    """JsonFormatter writes the traceback the filter redacted, not a fresh one."""
    settings.SECRET_KEY = SECRET_KEY
    try:
        raise RuntimeError(f"boom with {SECRET_KEY}")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RedactingFilter().filter(record)
    payload = json.loads(JsonFormatter().format(record))
    assert "RuntimeError" in payload["exc_info"] and SECRET_KEY not in payload["exc_info"]
