"""Response headers that browsers enforce: a Content-Security-Policy for our own pages."""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

# Our pages load only same-origin scripts and styles (nothing from a CDN), so the policy
# can be strict. The admin and Swagger UI ship inline scripts, so they keep Django's
# defaults (X-Frame-Options, nosniff, referrer policy) without a CSP.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_EXEMPT_PREFIXES = ("/admin/", "/api/docs/", "/api/schema/")


class ContentSecurityPolicyMiddleware:
    """Adds the CSP header to HTML responses of our own pages."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable):
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if iscoroutinefunction(self.get_response):
            return self._acall(request)
        return self._apply(request, self.get_response(request))

    async def _acall(self, request: HttpRequest):
        return self._apply(request, await self.get_response(request))

    def _apply(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if (
            settings.KB_CONTENT_SECURITY_POLICY
            and "Content-Security-Policy" not in response
            and response.get("Content-Type", "").startswith("text/html")
            and not request.path.startswith(_EXEMPT_PREFIXES)
        ):
            response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response
