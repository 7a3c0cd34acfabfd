"""Two HTTP conventions of the management API: Idempotency-Key on creates and uploads, and
ETag / If-Match on updates.

- **Idempotency-Key.** A client that retries a POST (after a timeout, say) sends the same
  key, and gets the first answer again, marked `Idempotent-Replayed: true`, instead of a
  second collection, key or upload. Keys are per caller (API key, or user), kept for
  KB_IDEMPOTENCY_TTL_SECONDS in the cache (Redis where REDIS_URL is set, so every web
  process sees them). The same key with a different request is a 422; while the first
  request is still running, a 409.
- **ETag / If-Match.** GET of a collection or a conversation carries an ETag of what an
  update can change; a PATCH with If-Match that no longer matches is a 412, so two editors
  cannot overwrite each other silently. Without If-Match a PATCH applies, as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.core.files.uploadedfile import UploadedFile
from drf_spectacular.utils import OpenApiParameter
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from kb.api.ratelimits import caller_key

HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY = OpenApiParameter(
    HEADER, str, OpenApiParameter.HEADER,
    description="Send the same value when retrying: the first answer comes back again "
                "(Idempotent-Replayed: true) instead of a second creation.")
IF_MATCH = OpenApiParameter(
    "If-Match", str, OpenApiParameter.HEADER,
    description="The ETag you read: if it changed since, the update is refused (412).")
MAX_KEY_LENGTH = 255
# The first request may take this long before a retry is no longer told to wait (409).
_IN_PROGRESS_SECONDS = 300


class IdempotencyConflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "idempotency_in_progress"
    default_detail = ("A request with this Idempotency-Key is still being processed; retry "
                      "it when that one has finished.")


class IdempotencyKeyReused(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"
    default_detail = ("This Idempotency-Key was used for a different request; use a new key "
                      "for a new request.")


class PreconditionFailed(APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_code = "precondition_failed"
    default_detail = ("It changed since you read it (If-Match does not match its ETag): read "
                      "it again and reapply your change.")


def idempotent(request: Request, produce: Callable[[], Response]) -> Response:
    """produce()'s response, or the one stored for this caller's Idempotency-Key."""
    key = request.headers.get(HEADER, "")
    if not key:
        return produce()
    if len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationError({HEADER: [f"At most {MAX_KEY_LENGTH} printable characters."]})
    scope = hashlib.sha256(
        f"{caller_key('idempotency', request)}\x00{key}".encode()).hexdigest()
    stored_key, lock_key = f"kb:idempotency:{scope}", f"kb:idempotency:{scope}:lock"
    fingerprint = _fingerprint(request)
    stored = cache.get(stored_key)
    if stored is None:
        if not cache.add(lock_key, 1, timeout=_IN_PROGRESS_SECONDS):
            raise IdempotencyConflict()
        try:
            response = produce()
            # A server error or a rate limit is worth retrying for real: not remembered.
            if response.status_code < 500 and response.status_code != 429:
                cache.set(stored_key, {
                    "fingerprint": fingerprint, "status": response.status_code,
                    "data": response.data, "location": response.get("Location"),
                }, timeout=settings.KB_IDEMPOTENCY_TTL_SECONDS)
            return response
        finally:
            cache.delete(lock_key)
    if stored["fingerprint"] != fingerprint:
        raise IdempotencyKeyReused()
    headers = {"Idempotent-Replayed": "true"}
    if stored["location"]:
        headers["Location"] = stored["location"]
    return Response(stored["data"], status=stored["status"], headers=headers)


def _fingerprint(request: Request) -> str:
    """The request's method, path, query and body (files by name, size and content)."""
    digest = hashlib.sha256(f"{request.method} {request.get_full_path()}".encode())
    data = request.data
    if isinstance(data, Mapping):
        items: list[Any] = []
        for name in sorted(data):
            values = data.getlist(name) if hasattr(data, "getlist") else [data[name]]
            items.append([name, [_value_digest(value) for value in values]])
        for name in sorted(request.FILES):
            items.append([name, [_value_digest(f) for f in request.FILES.getlist(name)]])
        digest.update(json.dumps(items, default=str).encode())
    else:
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _value_digest(value: object) -> object:
    if isinstance(value, UploadedFile):
        content = hashlib.sha256()
        for part in value.chunks():
            content.update(part)
        value.seek(0)
        return [value.name, value.size, content.hexdigest()]
    return value


def etag_of(fields: Mapping[str, Any]) -> str:
    """A strong ETag of the fields an update may change."""
    body = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def if_match_check(request: Request, current_etag: Callable[[], str]) -> None:
    """412 when the request carries If-Match and none of its tags is the current one (the
    current ETag is only computed when there is an If-Match to compare it with)."""
    header = request.headers.get("If-Match")
    if header is None:
        return
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    if "*" not in tags and current_etag() not in tags:
        raise PreconditionFailed()
