"""Shared fixtures: the real embedded Postgres, the real local model, inline tasks."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_settings(settings, tmp_path):
    """Tasks run inline, uploads go to a temporary media root, rate limits stay out of the way.

    Login throttling (django-axes) is off too: its backend refuses the test client's
    `login()`, which authenticates without a request, and tests that sign in many times
    must not lock each other out. tests/kb/test_login_throttling.py turns it back on.
    """
    settings.KB_TASKS_SYNC = True
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.RATELIMIT_ENABLE = False
    settings.AXES_ENABLED = False


@pytest.fixture
def collection(db):
    from kb.services.collections import collection_get_or_create

    return collection_get_or_create(slug="docs", name="Docs")


@pytest.fixture
def ingest(db, django_capture_on_commit_callbacks):
    """Upload files through the real service and run their ingestion inline."""
    from kb.services.uploads import documents_upload

    def _ingest(collection, filename: str, data: bytes | str, **kwargs):
        if isinstance(data, str):
            data = data.encode()
        with django_capture_on_commit_callbacks(execute=True):
            outcomes = documents_upload(
                collection=collection, filename=filename, data=data, **kwargs
            )
        for outcome in outcomes:
            if outcome.document is not None:
                outcome.document.refresh_from_db()
        return outcomes

    return _ingest


@pytest.fixture
def ingest_one(ingest):
    """Ingest one file and return its Document."""

    def _ingest_one(collection, filename: str, data: bytes | str, **kwargs):
        (outcome,) = ingest(collection, filename, data, **kwargs)
        return outcome.document

    return _ingest_one
