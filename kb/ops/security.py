"""Response headers that browsers enforce: a Content-Security-Policy for our own pages."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from kb.ops.middleware import MiddlewareResult, SyncAndAsyncMiddleware

# Our pages load only same-origin scripts and styles (nothing from a CDN), so the policy
# can be strict. The admin and Swagger UI ship inline scripts, so they keep Django's
# defaults (X-Frame-Options, nosniff, referrer policy) without a CSP.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_EXEMPT_PREFIXES = ("/admin/", "/api/docs/", "/api/schema/")


class ContentSecurityPolicyMiddleware(SyncAndAsyncMiddleware):
    """Adds the CSP header to HTML responses of our own pages (sync and async alike).

    Not a MiddlewareMixin: under ASGI that runs each hook in a thread, a hop before every
    async view (chat's stream) for what is only a header.
    """

    def __call__(self, request: HttpRequest) -> MiddlewareResult:
        if self.is_async:
            return self._acall(request)
        return self.process_response(request, self.get_response(request))

    async def _acall(self, request: HttpRequest):
        return self.process_response(request, await self.get_response(request))

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if (
            settings.KB_CONTENT_SECURITY_POLICY
            and "Content-Security-Policy" not in response
            and response.get("Content-Type", "").startswith("text/html")
            and not request.path.startswith(_EXEMPT_PREFIXES)
        ):
            response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response
