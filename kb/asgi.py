"""ASGI entry point: uvicorn serves this, so chat streams run as async generators."""

import os

import django
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.handlers import asgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")


class ASGIHandler(asgi.ASGIHandler):
    """Django's ASGI handler, with the middleware chain entered once per request.

    Django builds the chain for async under ASGI, and then every hook of a MiddlewareMixin
    (all of Django's own middleware are) is a thread hop of its own: about fifteen a
    request, 3 of the 5 ms a health check took on the benchmark machine. Built for sync,
    the chain and a sync view (every DRF view) run in one hop. Async views (chat's
    streams) are run on the event loop through async_to_sync, and their bodies are still
    streamed by the ASGI handler, outside the chain.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)
        self._middleware_chain = sync_to_async(self._middleware_chain, thread_sensitive=True)


# uvicorn imported this module first, so this process exists to serve requests. (`serve`
# prepares its own process; tests that serve the app in their process keep theirs.)
serving = not settings.configured

django.setup(set_prefix=False)
application = ASGIHandler()

if serving:
    from kb.web_process import web_process_prepare

    web_process_prepare()

if os.environ.get("KB_SERVE_STATIC", "true").lower() in {"1", "true", "yes", "on"}:
    # One self-contained process serves its own CSS and JS; behind nginx, set
    # KB_SERVE_STATIC=false and let nginx serve collectstatic's output (docs/DEPLOY.md).
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)
