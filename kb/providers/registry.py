"""Builds provider backends from settings.KB_PROVIDERS, lazily, once per process.

Like Django's CACHES: each entry names a BACKEND by dotted path and carries options.
Backends are cached per entry (the key includes the entry's options, so a changed
setting builds a new backend) so a model is loaded once, not per request.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from kb.providers.base import ChatBackend, EmbeddingBackend, RerankBackend

_cache: dict[tuple, Any] = {}
_lock = threading.Lock()


def _build(entry: dict, expected: type) -> Any:
    if not isinstance(entry, dict) or "BACKEND" not in entry:
        raise ImproperlyConfigured(f"A KB_PROVIDERS entry needs a BACKEND dotted path: {entry!r}")
    try:
        backend_class = import_string(entry["BACKEND"])
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"Cannot import provider backend {entry['BACKEND']}: {exc}"
        ) from exc
    if not issubclass(backend_class, expected):
        raise ImproperlyConfigured(f"{entry['BACKEND']} is not a {expected.__name__}.")
    options = {k: v for k, v in entry.items() if k not in {"BACKEND", "MODEL"}}
    return backend_class(model=entry.get("MODEL", ""), **options)


def _cached(cache_key: tuple, entry: dict, expected: type) -> Any:
    with _lock:
        backend = _cache.get(cache_key)
        if backend is None:
            backend = _cache[cache_key] = _build(entry, expected)
        return backend


def embedding_model_keys() -> list[str]:
    """Keys of every configured embedding model."""
    return list(settings.KB_PROVIDERS["embedding"])


def embedding_entry(key: str) -> dict:
    """The settings entry for one embedding model key."""
    try:
        return settings.KB_PROVIDERS["embedding"][key]
    except KeyError:
        known = ", ".join(embedding_model_keys())
        raise ImproperlyConfigured(
            f"Unknown embedding model {key!r}; configured: {known}."
        ) from None


def embedding_unavailable_reason(key: str) -> str | None:
    """Why the embedding model for key cannot work as configured, or None; builds nothing."""
    entry = embedding_entry(key)
    try:
        backend_class = import_string(entry["BACKEND"])
    except (ImportError, KeyError, TypeError) as exc:
        return f"its backend cannot be imported ({exc})"
    if not (isinstance(backend_class, type) and issubclass(backend_class, EmbeddingBackend)):
        return f"{entry['BACKEND']} is not an embedding backend"
    return backend_class.unavailable_reason(entry)


def embedding_backend(key: str) -> EmbeddingBackend:
    """The backend for an embedding model key (see KB_PROVIDERS['embedding'])."""
    entry = embedding_entry(key)
    return _cached(("embedding", key, repr(sorted(entry.items()))), entry, EmbeddingBackend)


def chat_backends() -> list[ChatBackend]:
    """The chat cascade, in order: primary, cheaper fallbacks, then the extractive answerer."""
    entries = settings.KB_PROVIDERS["chat"]
    if isinstance(entries, dict):
        entries = [entries]
    return [
        _cached(("chat", index, repr(sorted(entry.items()))), entry, ChatBackend)
        for index, entry in enumerate(entries)
    ]


def reranker_backend() -> RerankBackend | None:
    """The configured reranker, or None when reranking is off."""
    entry = settings.KB_PROVIDERS.get("reranker")
    if not entry:
        return None
    return _cached(("reranker", repr(sorted(entry.items()))), entry, RerankBackend)


def reranker_backend_for(entry: dict) -> RerankBackend:
    """A reranker from an explicit entry (used by kb_eval to compare rerankers)."""
    return _cached(("reranker", repr(sorted(entry.items()))), entry, RerankBackend)
