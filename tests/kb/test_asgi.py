"""The ASGI application enters the middleware chain once per request for sync views, and
runs async views (chat's streams) on the event loop through Django's async chain."""

from __future__ import annotations

import asyncio

import httpx
from django.conf import settings
from django.test import override_settings
from django.utils.deprecation import MiddlewareMixin

from kb.asgi import ASGIHandler
from kb.middleware import HooksOnEventLoop


class ModeProbe(MiddlewareMixin):
    """Records whether Django called it in async mode (a thread hop per hook) or sync."""

    modes: list[bool] = []

    def process_request(self, request):
        ModeProbe.modes.append(self.async_mode)


async def _get(app, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
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


class LoopProbe(HooksOnEventLoop):
    """Records whether its hooks ran on the event loop (no thread hop) or in a thread."""

    on_loop: list[bool] = []

    def process_request(self, request):
        LoopProbe.on_loop.append(_running_loop())

    def process_response(self, request, response):
        LoopProbe.on_loop.append(_running_loop())
        return response


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "tests.kb.test_asgi.LoopProbe"])
def test_io_free_middleware_hooks_run_on_the_event_loop_before_an_async_view():
    LoopProbe.on_loop.clear()

    response = asyncio.run(_get(ASGIHandler(), "/api/v1/chat", method="POST"))

    assert response.status_code == 401
    assert LoopProbe.on_loop == [True, True]
    # Django's security, clickjacking and request-id headers are still set on that path.
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Request-ID"]
