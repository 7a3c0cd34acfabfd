"""Django's I/O-free middleware, with their hooks run on the event loop under ASGI.

Under ASGI Django runs every hook of a MiddlewareMixin in a thread (sync_to_async), in
case it touches the database: about a third of a millisecond each, a dozen of them
before an async view (chat's stream) starts. The hooks of these classes only read and
write headers and cookies, so they are called directly. The session, message and
message middleware may read or save the session, so they keep Django's hops.
"""

from __future__ import annotations

from django.contrib.auth.middleware import (
    AuthenticationMiddleware as DjangoAuthenticationMiddleware,
)
from django.http import HttpRequest, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware as DjangoXFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware as DjangoCommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware as DjangoCsrfViewMiddleware
from django.middleware.security import SecurityMiddleware as DjangoSecurityMiddleware
from django.utils.deprecation import MiddlewareMixin


class HooksOnEventLoop(MiddlewareMixin):
    """A MiddlewareMixin whose process_request/process_response do no I/O.

    (process_view, where a class has one, is adapted by Django's handler as before.)
    """

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class AuthenticationMiddleware(HooksOnEventLoop, DjangoAuthenticationMiddleware):
    """Sets request.user and request.auser lazily: the session is read on first use."""


class SecurityMiddleware(HooksOnEventLoop, DjangoSecurityMiddleware):
    pass


class CommonMiddleware(HooksOnEventLoop, DjangoCommonMiddleware):
    pass


class CsrfViewMiddleware(HooksOnEventLoop, DjangoCsrfViewMiddleware):
    """CSRF_USE_SESSIONS is off (kb.settings): the token lives in a cookie, not the session."""


class XFrameOptionsMiddleware(HooksOnEventLoop, DjangoXFrameOptionsMiddleware):
    pass
