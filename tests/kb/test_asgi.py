"""The ASGI application enters the middleware chain once per request."""

from __future__ import annotations

import asyncio

import httpx
from django.conf import settings
from django.test import override_settings
from django.utils.deprecation import MiddlewareMixin

from kb.asgi import ASGIHandler


class ModeProbe(MiddlewareMixin):
    """Records whether Django called it in async mode (a thread hop per hook) or sync."""

    modes: list[bool] = []

    def process_request(self, request):
        ModeProbe.modes.append(self.async_mode)


async def _get(app, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        return await client.get(path)


@override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, "tests.kb.test_asgi.ModeProbe"])
def test_django_middleware_run_in_sync_mode_under_asgi():
    ModeProbe.modes.clear()

    response = asyncio.run(_get(ASGIHandler(), "/healthz"))

    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert ModeProbe.modes == [False]
    assert response.headers["X-Request-ID"]
