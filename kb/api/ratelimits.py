"""Per-user and per-API-key rate limits (django-ratelimit), shared by search and chat."""

from __future__ import annotations

import math
import re

from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage
from rest_framework.exceptions import Throttled
from rest_framework.request import Request

from kb.models import ApiKey

# django-ratelimit's rate syntax, which reads it with `re.match` (a prefix) and has no public
# parser: N/ then an optional multiplier and unit, the unit seconds when absent ("10/5m").
_RATE = re.compile(r"(\d+)/(\d*)([smhd])?")
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 60 * 60, "d": 24 * 60 * 60}


def caller_key(group: str, request: HttpRequest | Request) -> str:
    """Limit API keys separately from their owners, users by id, anonymous callers by IP."""
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiKey):
        return f"key:{auth.pk}"
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"ip:{request.META.get('REMOTE_ADDR', '')}"


def rate_limit_enforce(request: HttpRequest | Request, *, group: str) -> None:
    """Count this request against its group's limit; raise a 429 with Retry-After past it."""
    auth = getattr(request, "auth", None)
    # A key may carry its own limit (set in the admin), which replaces the default.
    rate = (auth.rate_limit if isinstance(auth, ApiKey) and auth.rate_limit
            else settings.KB_RATELIMITS[group])
    usage = get_usage(request, group=f"kb.{group}", key=caller_key, rate=rate, increment=True)
    if usage is not None and usage["should_limit"]:
        raise Throttled(
            wait=max(1, math.ceil(usage["time_left"])),
            detail=f"Rate limit for {group} reached ({rate}). "
            "Retry after the number of seconds in Retry-After.",
        )


def rate_limit_parse(rate: str) -> tuple[int, int]:
    """(requests, seconds) of a rate such as 600/m, read as django-ratelimit reads it;
    ValueError for a rate it would fail on."""
    match = _RATE.match(rate)
    if match is None:
        raise ValueError(f"Not a rate: {rate!r}; use N/s, N/m, N/h or N/d, e.g. 600/m.")
    count, multiplier, unit = match.groups()
    return int(count), _PERIOD_SECONDS[unit or "s"] * int(multiplier or 1)
