"""ASGI entry point: uvicorn serves this, so chat streams run as async generators."""

import os
from collections.abc import Awaitable, Callable

import django
from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core.handlers import asgi, base
from django.http import HttpRequest, HttpResponseBase
from django.urls import Resolver404, get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")


class ASGIHandler(asgi.ASGIHandler):
    """Django's ASGI handler, with sync views' middleware chain entered once per request.

    Django builds the chain for async under ASGI, and then every hook of a MiddlewareMixin
    (all of Django's own middleware are) is a thread hop of its own: about fifteen a
    request, 3 of the 5 ms a health check took on the benchmark machine. Built for sync,
    the chain and a sync view (every DRF view) run in one hop.

    An async view (chat's streams) is not sent through that sync chain: there Django runs
    it through async_to_sync, from the request's thread back onto the event loop, and
    every sync_to_async call inside it (the chat's database work before the first token)
    crosses back and forth through that thread; the chat's p95 time to first token went
    over its goal (docs/CHAT.md). Each request's view is resolved first, and an async view gets
    Django's own async chain, on the event loop, as with the stock handler.
    """

    # Django's handlers set it in load_middleware; the stubs leave it out.
    _middleware_chain: Callable[[HttpRequest], Awaitable[HttpResponseBase]]

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=True)
        self._async_chain = self._middleware_chain
        # A second handler holds the sync chain with its own view, template-response and
        # exception middleware lists (load_middleware adapts each for its mode).
        sync_handler = base.BaseHandler()
        sync_handler.load_middleware(is_async=False)
        # Django's private attribute, which the stubs leave out.
        sync_chain = sync_handler._middleware_chain  # type: ignore[attr-defined]
        self._sync_chain = sync_to_async(sync_chain, thread_sensitive=True)
        self._middleware_chain = self._dispatch

    async def _dispatch(self, request: HttpRequest) -> HttpResponseBase:
        chain = self._async_chain if _serves_async_view(request) else self._sync_chain
        return await chain(request)


def _serves_async_view(request: HttpRequest) -> bool:
    """Whether the request's URL resolves to an async view (unknown URLs: no)."""
    try:
        match = get_resolver(getattr(request, "urlconf", None)).resolve(request.path_info)
    except Resolver404:
        return False
    return iscoroutinefunction(match.func)


# uvicorn imported this module first, so this process exists to serve requests. (`serve`
# prepares its own process; tests that serve the app in their process keep theirs.)
serving = not settings.configured
if serving:
    # Written before the settings load, as DJANGO_SETTINGS_MODULE above: they decide from
    # it what a web process gets (pooled connections, one torch thread; kb/settings.py).
    os.environ["KB_PROCESS_ROLE"] = "web"

django.setup(set_prefix=False)
django_application: asgi.ASGIHandler = ASGIHandler()

if serving:
    from kb.ops.web_process import query_embedding_warm_up_start, web_process_prepare

    web_process_prepare()
    query_embedding_warm_up_start()

if settings.KB_SERVE_STATIC:
    # One self-contained process serves its own CSS and JS; behind nginx, set
    # KB_SERVE_STATIC=false and let nginx serve collectstatic's output (docs/DEPLOY.md).
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    django_application = ASGIStaticFilesHandler(django_application)

from chat.mcp import mcp_mount  # noqa: E402  (needs the apps that django.setup() loads)

# /mcp is the MCP server (chat.mcp), beside Django; everything else is Django's.
application = mcp_mount(django_application)
