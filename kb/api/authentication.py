"""API-key authentication: `Authorization: Bearer kb_...`, stored only as a sha256."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.http import HttpRequest
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from kb.models import ApiKey
from kb.services.api_keys import api_key_hash


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Authenticates `Authorization: Bearer <key>`; request.auth is the ApiKey row."""

    keyword = "Bearer"

    def authenticate(self, request: HttpRequest | Request) -> tuple[User, ApiKey] | None:
        # DRF's views pass a Request; chat's plain Django views pass their HttpRequest.
        # It reads only request.META, which an HttpRequest has too; the stubs ask for a Request.
        raw_header = authentication.get_authorization_header(request)  # type: ignore[arg-type]
        header = raw_header.decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != self.keyword.lower():
            return None
        raw_key = raw_key.strip()
        if not raw_key:
            raise exceptions.AuthenticationFailed("Empty API key.")
        key = (
            ApiKey.objects.select_related("user")
            .filter(hashed_key=api_key_hash(raw_key), revoked_at__isnull=True)
            .first()
        )
        if key is None or not key.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        now = timezone.now()
        # One write a minute at most: a hot key must not turn every read into a write.
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword
