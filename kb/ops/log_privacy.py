"""Keep secrets and user content out of the logs.

- `text_fingerprint(text)`: what a log line carries instead of a question, prompt or
  answer, e.g. "sha256:1f0c2a9be4d7". Equal texts share a fingerprint, so a log reader
  can still tell that two requests asked the same thing, without reading it.
- `loggable_text(text)`: the fingerprint, plus the text itself only when
  `settings.KB_LOG_CONTENT` is true (off by default; meant for a developer's machine).
- `RedactingFilter`: a handler filter that rewrites every record on its way out: bearer
  tokens, our `kb_…` API keys, `sk-…` provider keys, passwords in URLs, and the literal
  values of the secrets in settings (SECRET_KEY, OPENAI_API_KEY, DATABASE_URL's password,
  KB_METRICS_TOKEN, every `api_key` in KB_PROVIDERS) become "[REDACTED]", in the message,
  in string extras and in the formatted traceback. A Django request passed as an extra
  (django.request does this for every 4xx/5xx) is reduced to "METHOD /path", because its
  repr carries the query string, i.e. the search query.

The filter is a last line of defence: code should log fingerprints, not content, and
never log credentials in the first place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

REDACTED = "[REDACTED]"
# Secrets shorter than this are not matched literally: redacting every "admin" or "1234"
# in the logs would hide more than it protects (the patterns below still apply).
MIN_SECRET_LENGTH = 8

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "Authorization: Bearer xyz", "'authorization': 'Bearer xyz'", "Bearer xyz" anywhere.
    (re.compile(r"(?i)\b(bearer|token|basic)(\s+|=)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + REDACTED),
    # Our API keys: kb_<8 hex>_<urlsafe random>.
    (re.compile(r"\bkb_[0-9a-f]{8}_[A-Za-z0-9_-]{16,}"), REDACTED),
    # OpenAI-style provider keys (sk-..., sk-proj-...).
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    # A shared conversation's link opens it for its readers: the token is a credential.
    (re.compile(r"(/chat/shared/)[^/\s?#]+"), r"\1" + REDACTED),
    # scheme://user:password@host -> scheme://user:[REDACTED]@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@"), r"\1" + REDACTED + "@"),
)


def text_fingerprint(text: str, *, length: int = 12) -> str:
    """A short, stable stand-in for user content in logs: "sha256:" + hex prefix."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest[:length]}"


def content_logging_enabled() -> bool:
    """Whether logs may carry questions, prompts and answers (KB_LOG_CONTENT, default off)."""
    from django.conf import settings

    return bool(getattr(settings, "KB_LOG_CONTENT", False))


def loggable_text(text: str, *, limit: int = 500) -> str:
    """The fingerprint of text, followed by the text itself only when content logging is on."""
    fingerprint = text_fingerprint(text)
    if not content_logging_enabled():
        return fingerprint
    shown = text if len(text) <= limit else text[:limit] + "…"
    return f"{fingerprint} {shown!r}"


def configured_secrets() -> list[str]:
    """The literal secret values in settings, longest first (so overlaps redact whole)."""
    from django.conf import settings

    values: list[str] = []
    for name in ("SECRET_KEY", "OPENAI_API_KEY", "KB_METRICS_TOKEN", "KB_ADMIN_PASSWORD"):
        values.append(str(getattr(settings, name, "") or ""))
    for url in (getattr(settings, "DATABASE_URL", ""), getattr(settings, "REDIS_URL", "")):
        if url:
            with contextlib.suppress(ValueError):  # a malformed URL has no password to hide
                values.append(urlsplit(str(url)).password or "")
    database = getattr(settings, "DATABASES", {}).get("default", {})
    values.append(str(database.get("PASSWORD") or ""))
    values.extend(_provider_keys(getattr(settings, "KB_PROVIDERS", {})))
    unique = {value for value in values if len(value) >= MIN_SECRET_LENGTH}
    return sorted(unique, key=len, reverse=True)


def _provider_keys(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).lower() in {"api_key", "token", "password"} and isinstance(value, str):
                yield value
            else:
                yield from _provider_keys(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _provider_keys(item)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """text with credentials replaced by "[REDACTED]"."""
    if not text:
        return text  # most ledger rows and log extras: nothing to scan
    for secret in configured_secrets() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


class RedactingFilter(logging.Filter):
    """Redact credentials from every record a handler emits (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            secrets = configured_secrets()
        except Exception:  # settings not configured yet (early startup): patterns only
            secrets = []
        message = record.getMessage()
        cleaned = redact(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        for key, value in list(vars(record).items()):
            if key in _RECORD_ATTRIBUTES or key.startswith("_"):
                continue
            if _is_request(value):
                setattr(record, key, f"{value.method} {value.path}")
            elif isinstance(value, str):
                setattr(record, key, redact(value, secrets))
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is redacted too.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        return True


def _is_request(value: object) -> bool:
    try:
        from django.http import HttpRequest
    except ImportError:  # pragma: no cover - Django is always installed here
        return False
    return isinstance(value, HttpRequest)
