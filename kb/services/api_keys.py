"""API keys: created here (admin and kb_apikey); only their hash is stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from django.contrib.auth.models import User
from django.db import transaction

from kb.models import ApiKey, Collection
from kb.selectors import collections_visible

API_KEY_PREFIX = "kb_"


def api_key_hash(raw_key: str) -> str:
    """The stored form of a key: keys are long random strings, so one sha256 is enough."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_generate() -> tuple[str, str]:
    """A new raw key and its public prefix (shown in the admin to tell keys apart)."""
    prefix = secrets.token_hex(4)
    return f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}", prefix


class ApiKeyError(ValueError):
    """A key that cannot be created as asked (an unknown or unreadable collection)."""


@transaction.atomic
def api_key_create(
    *,
    user: User,
    name: str,
    collections: Sequence[Collection] | None = None,
    rate_limit: str = "",
    api_key: ApiKey | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for user, narrowed to collections if given; returns it and the raw key.

    Only the key's sha256 is stored: the raw key returned here is the one chance to show it.
    `api_key` is an unsaved row to fill in instead of a new one (the admin's form, which
    saves its many-to-many fields itself afterwards).
    """
    collections = list(collections or [])
    visible = set(collections_visible(user=user).values_list("pk", flat=True))
    unreadable = [collection.slug for collection in collections if collection.pk not in visible]
    if unreadable:
        raise ApiKeyError(f"{user.get_username()} may not read: {', '.join(unreadable)}.")
    raw_key, prefix = api_key_generate()
    api_key = api_key or ApiKey()
    api_key.user, api_key.name, api_key.rate_limit = user, name, rate_limit
    api_key.prefix, api_key.hashed_key = prefix, api_key_hash(raw_key)
    api_key.save()
    if collections:
        api_key.collections.set(collections)
    return api_key, raw_key


@transaction.atomic
def api_key_update(
    *, api_key: ApiKey, name: str | None = None, rate_limit: str | None = None,
    collections: Sequence[Collection] | None = None,
) -> ApiKey:
    """Rename a key, change its own rate limit, or narrow it to other collections (None
    leaves a field as it is; an empty list of collections widens it to all its user may
    read). The caller checks the grant (kb.api.key_access.api_key_grant_check)."""
    if name is not None:
        api_key.name = name
    if rate_limit is not None:
        api_key.rate_limit = rate_limit
    api_key.save(update_fields=["name", "rate_limit"])
    if collections is not None:
        api_key.collections.set(collections)
    return api_key
