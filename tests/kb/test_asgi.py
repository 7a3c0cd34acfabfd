"""The ASGI application enters the middleware chain once per request for sync views, and
runs async views (chat's streams) on the event loop through Django's async chain."""

from __future__ import annotations

import asyncio

import httpx
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.http import HttpResponse
from django.test import RequestFactory, override_settings
from django.utils.deprecation import MiddlewareMixin

from kb.asgi import ASGIHandler


class ModeProbe(MiddlewareMixin):
    """Records whether Django called it in async mode (a thread hop per hook) or sync."""

    modes: list[bool] = []

    def process_request(self, request):
        ModeProbe.modes.append(self.async_mode)


async def _get(app, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver") as client:
        return await client.request(method, path)


@override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "tests.kb.test_asgi.ModeProbe"])
def test_django_middleware_run_in_sync_mode_under_asgi():
    ModeProbe.modes.clear()

    response = asyncio.run(_get(ASGIHandler(), "/healthz"))

    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert ModeProbe.modes == [False]
    assert response.headers["X-Request-ID"]


@override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "tests.kb.test_asgi.ModeProbe"])
def test_an_async_view_runs_on_the_event_loop_not_through_async_to_sync(monkeypatch):
    """The chat stream's view is awaited on the loop: no async_to_sync from a request thread,
    whose every later sync_to_async call would cross threads twice (the TTFT regression)."""
    from django.core.handlers import base

    bridged = []
    real = base.async_to_sync
    monkeypatch.setattr(base, "async_to_sync", lambda view: bridged.append(view) or real(view))
    ModeProbe.modes.clear()

    response = asyncio.run(_get(ASGIHandler(), "/api/v1/chat", method="POST"))

    assert response.status_code == 401  # the async view answered: no credentials
    assert bridged == []
    assert ModeProbe.modes == [True]


@override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "tests.kb.test_asgi.ModeProbe"])
def test_an_unknown_path_gets_the_sync_chain():
    ModeProbe.modes.clear()

    response = asyncio.run(_get(ASGIHandler(), "/no-such-page"))

    assert response.status_code == 404
    assert ModeProbe.modes == [False]



def test_the_content_security_policy_middleware_adds_no_thread_hop_before_an_async_view():
    """Its hook only sets a header, so it runs on the event loop (no sync_to_async)."""
    from kb.ops.security import ContentSecurityPolicyMiddleware

    async def view(request):
        return HttpResponse("<p>hi</p>", content_type="text/html")

    middleware = ContentSecurityPolicyMiddleware(view)
    response = asyncio.run(middleware(RequestFactory().get("/chat/")))

    assert iscoroutinefunction(middleware)
    assert response["Content-Security-Policy"].startswith("default-src 'self'")
